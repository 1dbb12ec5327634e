"""The instruction-following eval: shipped cases, IFEval verdicts, statistics, real runs."""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.cli import main
from app.domain import Layout
from app.eval import checks
from app.eval.cases import FIRST_IDS, load_cases, load_recall_probes, stratified_sample
from app.eval.report import CaseResult, EvalReport, wilson
from app.eval.runner import (
    HISTORY_FIRST,
    LAYOUTS,
    NO_COMMIT,
    SYSTEM_FIRST,
    EvalConfig,
    default_threads,
    evaluate,
)
from app.eval.runner import run_eval as run_eval_on
from app.session.chat_session import ChatSession
from app.storage import migrations
from app.storage.records import EvalRate
from app.storage.store import Store

# A reply that follows and one that breaks each instruction id the shipped cases use,
# with the kwargs of one of its cases (hand-made: what the checker must accept or refuse).
HAND_MADE: dict[str, tuple[dict, str, str]] = {
    "change_case:english_lowercase": (
        {},
        "the moon is a rocky world that circles the earth.",
        "The moon is a rocky world that circles the Earth.",
    ),
    "change_case:english_capital": (
        {},
        "THE MOON IS A ROCKY WORLD THAT CIRCLES THE EARTH.",
        "THE MOON IS A ROCKY WORLD that circles the earth.",
    ),
    "punctuation:no_comma": (
        {},
        "Bread needs flour and water. It also needs time.",
        "Bread needs flour, water, and time.",
    ),
    "startend:quotation": (
        {},
        '"Tides come from the pull of the Moon."',
        'Tides come from the pull of the Moon."',
    ),
    "startend:end_checker": (
        {"end_phrase": "Hope this helps."},
        "Water them every morning. Hope this helps.",
        "Hope this helps. Water them every morning.",
    ),
    "keywords:existence": (
        {"keywords": ["river"]},
        "A river carries the salt to the sea.",
        "Rain carries the salt to the sea.",
    ),
    "keywords:forbidden_words": (
        {"forbidden_words": ["bike", "bicycle"]},
        "Cycling to work keeps people fit.",
        "A bike keeps people fit.",
    ),
    "length_constraints:number_words": (
        {"num_words": 30, "relation": "less than"},
        "Bees carry pollen from flower to flower.",
        " ".join(["word"] * 30),
    ),
    "length_constraints:number_sentences": (
        {"num_sentences": 3, "relation": "less than"},
        "Sleep repairs the body. It also sorts memories.",
        "Sleep repairs the body. It sorts memories. It saves energy. It helps growth.",
    ),
    "detectable_format:json_format": (
        {},
        '```json\n{"answer": "Coffee comes from Ethiopia."}\n```',
        'Here it is: {"answer": "Coffee comes from Ethiopia."}',
    ),
    "detectable_format:number_bullet_lists": (
        {"num_bullets": 3},
        "* Oil the chain\n* Wipe it dry\n* Check the tension",
        "* Oil the chain\n* Wipe it dry",
    ),
    "detectable_content:postscript": (
        {"postscript_marker": "P.S."},
        "Visit the library on Mondays.\n\nP.S. It is quieter then.",
        "Visit the library on Mondays. It is quieter then.",
    ),
    "detectable_format:title": (
        {},
        "<<Rainbows>>\nLight bends in raindrops.",
        "Rainbows\nLight bends in raindrops.",
    ),
}


def _small_config(**changes: object) -> EvalConfig:
    base = {"cases": 4, "turns": 2, "probes": 1, "max_tokens": 24, "n_ctx": 2048}
    base.update(changes)
    return EvalConfig(**base)  # type: ignore[arg-type]


# -- the shipped cases ------------------------------------------------------------------


def test_shipped_cases_cover_the_required_instructions_over_multi_turn_chats() -> None:
    cases = load_cases()
    ids = Counter(case.instruction_ids[0] for case in cases)
    assert len(cases) >= 60
    assert len(ids) >= 10
    assert set(FIRST_IDS) <= set(ids)
    assert len({case.id for case in cases}) == len(cases)
    for case in cases:
        checks.validate(case.instruction_ids, case.kwargs)  # raises on a bad id or kwargs
        assert len(case.turns) >= 3
    for probe in load_recall_probes():
        assert probe.answer in probe.turns[0]  # stated in the first turn...
        assert probe.answer not in probe.turns[-1]  # ...and asked, not repeated, in the last


@pytest.mark.parametrize("instruction_id", sorted(HAND_MADE))
def test_verdicts_on_hand_made_replies(instruction_id: str) -> None:
    kwargs, passing, failing = HAND_MADE[instruction_id]
    assert checks.follows([instruction_id], [kwargs], passing)
    assert not checks.follows([instruction_id], [kwargs], failing)
    assert not checks.follows([instruction_id], [kwargs], "   ")  # an empty reply never passes


def test_every_instruction_id_of_the_cases_has_hand_made_replies() -> None:
    assert {case.instruction_ids[0] for case in load_cases()} == set(HAND_MADE)


def test_a_case_with_an_unknown_id_or_wrong_kwargs_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown IFEval instruction id"):
        checks.validate(["style:pirate"], [{}])
    with pytest.raises(ValueError, match="number_words"):
        checks.validate(["length_constraints:number_words"], [{"words": 3}])
    with pytest.raises(ValueError, match="NLTK data"):
        checks.validate(["change_case:capital_word_frequency"], [{}])


def test_recall_is_scored_exactly() -> None:
    assert checks.recalls("4817", "Your locker code is 4817.")
    assert checks.recalls("Porto", "you were born in porto")
    assert not checks.recalls("4817", "Your locker code is 48170.")
    assert not checks.recalls("314", "I do not know your room number.")


def test_a_small_sample_covers_the_first_ids_and_every_id_before_repeats() -> None:
    cases = load_cases()
    ids = {case.instruction_ids[0] for case in cases}
    four = stratified_sample(cases, 4, seed=0)
    assert [case.instruction_ids[0] for case in four] == list(FIRST_IDS)
    one_each = stratified_sample(cases, len(ids), seed=3)
    assert {case.instruction_ids[0] for case in one_each} == ids
    more = stratified_sample(cases, len(ids) + 5, seed=3)
    assert max(Counter(c.instruction_ids[0] for c in more).values()) == 2
    assert len({case.id for case in more}) == len(more)
    assert stratified_sample(cases, 4, seed=0) == four  # the seed makes it reproducible
    other_seeds = {tuple(c.id for c in stratified_sample(cases, 4, seed=s)) for s in range(6)}
    assert len(other_seeds) > 1


# -- statistics --------------------------------------------------------------------------


def test_wilson_interval_matches_the_textbook_values() -> None:
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)


@given(st.integers(min_value=1, max_value=5000), st.data())
def test_the_interval_always_holds_the_rate(total: int, data: st.DataObject) -> None:
    followed = data.draw(st.integers(min_value=0, max_value=total))
    low, high = wilson(followed, total)
    assert 0.0 <= low <= followed / total <= high <= 1.0


def _result(layout: str, case: str, turn: int, followed: bool, reply: str = "r") -> CaseResult:
    return CaseResult(layout, case, ("punctuation:no_comma",), ({},), turn, reply, followed)


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=40))
def test_a_rate_is_the_mean_of_its_verdicts(verdicts: list[tuple[bool, bool]]) -> None:
    report = EvalReport(
        model={}, layouts=(SYSTEM_FIRST, HISTORY_FIRST), turns=2, seed=0, max_tokens=8
    )
    for index, (first, second) in enumerate(verdicts):
        report.results.append(_result(SYSTEM_FIRST, f"c{index}", 2, first))
        report.results.append(_result(HISTORY_FIRST, f"c{index}", 2, second, reply="other"))
        report.results.append(_result(SYSTEM_FIRST, f"c{index}", 1, not first))  # not scored
    data = report.as_dict()
    for position, name in enumerate((SYSTEM_FIRST, HISTORY_FIRST)):
        expected = [pair[position] for pair in verdicts]
        summary = data["layouts"][name]
        assert summary["cases"] == len(expected)
        assert summary["followed"] == sum(expected)
        assert summary["rate"] == sum(expected) / len(expected)
        assert summary["ci95"][0] <= summary["rate"] <= summary["ci95"][1]
    agreement = data["agreement"][f"{SYSTEM_FIRST} vs {HISTORY_FIRST}"]
    assert agreement["same_verdict"] == sum(a == b for a, b in verdicts) / len(verdicts)
    assert agreement["same_reply"] == 0.0


# -- real runs -----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_small_eval_on_the_real_model(model_path: Path) -> None:
    started = time.monotonic()
    seen = []
    report = run_eval_on(_small_config(model_path=model_path), on_result=seen.append)
    elapsed = time.monotonic() - started
    assert elapsed < 240  # loose (a loaded machine); the goal is under 2 minutes
    data = json.loads(report.to_json())
    assert set(data) >= {"model", "layouts", "results", "recall"}
    assert data["model"]["file"] == model_path.name
    assert list(data["layouts"]) == list(LAYOUTS)
    cases = load_cases()
    by_id = {case.id: case for case in cases}
    instruction_results = [r for r in data["results"] if not r["probe"]]
    assert len(instruction_results) == 4 * 2 * len(LAYOUTS)
    assert {r["instruction_ids"][0] for r in instruction_results} == set(FIRST_IDS)
    for row in instruction_results:  # every stored verdict is the checker's on its reply
        case = by_id[row["case"]]
        assert row["kwargs"] == list(case.kwargs)
        assert row["followed"] == checks.follows(case.instruction_ids, case.kwargs, row["reply"])
    for name, summary in data["layouts"].items():
        scored = [
            r["followed"] for r in instruction_results if r["layout"] == name and r["turn"] == 2
        ]
        assert summary["cases"] == 4
        assert summary["rate"] == sum(scored) / 4
        assert summary["ci95"][0] <= summary["rate"] <= summary["ci95"][1]
    probe = load_recall_probes()[0]
    probes = [r for r in data["results"] if r["probe"]]
    assert [r["layout"] for r in probes] == list(LAYOUTS)
    for name in LAYOUTS:
        (row,) = [r for r in probes if r["layout"] == name]
        assert data["recall"][name] == float(checks.recalls(probe.answer, row["reply"]))
    # Turn 1 is the same prompt in history-first with and without commit: same greedy reply.
    assert data["agreement_first_turn"][f"{HISTORY_FIRST} vs {NO_COMMIT}"]["same_reply"] == 1.0
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    assert seen[-1].done == seen[-1].total


@pytest.mark.slow
def test_no_commit_keeps_each_block_in_front_of_its_message(store: Store, make_engine) -> None:
    """history-first-no-commit: the next prompt holds every earlier block, and the replies'
    cells are reused as generated (nothing before them recomputed)."""
    config = _small_config(cases=1, turns=3, probes=0, layouts=(HISTORY_FIRST, NO_COMMIT))
    engine: ChatSession = make_engine(store, n_threads=default_threads())
    report = evaluate(engine, config)
    assert len(report.results) == 6
    block = stratified_sample(load_cases(), 1, seed=0)[0].instructions
    chats = {chat.name.rsplit(" ", 1)[-1]: chat for chat in store.chats()}
    assert {chat.layout for chat in chats.values()} == {Layout.HISTORY_FIRST}
    no_commit, committed = chats[NO_COMMIT], chats[HISTORY_FIRST]
    assert engine.rendered_prompt(no_commit.id, "next").count(block) == 4  # 3 old + the new
    assert engine.rendered_prompt(committed.id, "next").count(block) == 1
    rows = store.metrics(no_commit.id)
    assert len(rows) == 3
    for before, after in itertools.pairwise(rows):
        # The reply's cells stay as generated: the next turn reuses all of the last prompt.
        assert after.data["reused_tokens"] >= before.data["prompt_tokens"]
        assert after.data["commit_tokens"] == 0


@pytest.mark.slow
def test_the_eval_command_prints_and_writes_json(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval.json"
    code = main(
        [
            "eval",
            "--model",
            str(model_path),
            "--cases",
            "1",
            "--turns",
            "1",
            "--probes",
            "0",
            "--layouts",
            "history-first",
            "--max-tokens",
            "16",
            "--n-ctx",
            "2048",
            "--json",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text(encoding="utf-8"))
    assert list(printed["layouts"]) == [HISTORY_FIRST]
    assert printed["results"][0]["case"] == stratified_sample(load_cases(), 1, 0)[0].id


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--layouts", "upside-down"], "comma-separated subset"),
        (["--turns", "9"], "turns must be between 1 and"),
        (["--cases", "0"], "must be greater than 0"),
        (["--out", "/no/such/folder/x.json"], "folder does not exist"),
        (["--model", "/no/such/model.gguf"], "model file not found"),
    ],
)
def test_bad_eval_arguments_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code: int | str | None
    try:
        code = main(["eval", *argv])
    except SystemExit as leaving:
        code = leaving.code
    assert code in (1, 2)
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


# -- stored rates ----------------------------------------------------------------------------


def test_last_rates_per_model_replace_the_previous_ones(db_path: Path) -> None:
    first = [
        EvalRate("history-first", 10, 4, 0.17, 0.69, 0.5, 3),
        EvalRate("system-first", 10, 6, 0.31, 0.83, None, 3),
    ]
    with Store(db_path) as store:
        store.set_eval_rates("model-a", first)
        store.set_eval_rates("model-b", first[:1])
        store.set_eval_rates("model-a", [EvalRate("history-first", 20, 5, 0.11, 0.47, 1.0, 2)])
    with Store(db_path) as reopened:
        rates = reopened.eval_rates("model-a")
        assert list(rates) == ["history-first"]
        assert rates["history-first"].rate == 5 / 20
        assert rates["history-first"].turns == 2
        assert reopened.eval_rates("model-b")["history-first"].rate == 0.4
        assert reopened.eval_rates("never-measured") == {}


def test_a_database_from_before_the_eval_gains_the_rates_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "before.db"
    version = migrations.MIGRATIONS.index(migrations._v7_eval_rates)
    monkeypatch.setattr("app.storage.store.MIGRATIONS", migrations.MIGRATIONS[:version])
    with Store(path) as old:
        chat = old.create_chat("kept")
        old.add_message(chat.id, "user", "hello")
    monkeypatch.undo()
    with Store(path) as store:
        assert store.schema_version() == migrations.SCHEMA_VERSION
        assert [m.text for m in store.messages(chat.id)] == ["hello"]
        assert store.eval_rates("m") == {}
        store.set_eval_rates("m", [EvalRate("system-first", 4, 1, 0.05, 0.7, None, 3)])
        assert store.eval_rates("m")["system-first"].rate == 0.25
