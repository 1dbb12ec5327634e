"""Benchmark of caching strategies: one scripted chat replayed five ways in one run.

Why: the product claims that the history-first layout with commit and idle-time
warm-up makes instruction edits cheap, and that saved states make reopening a
long chat instant. This module measures both claims against what a stateless
client does (``naive``) and what llama.cpp's server, Ollama and LM Studio do
(``system-first-prefix``: system-first layout + longest-common-prefix reuse).

Strategies (each has its own :class:`Engine`, hence its own KV cache, and its own
chat in one temporary SQLite database, so interleaving never switches chats and
no state save/load lands in another strategy's TTFT):

``naive``
    system-first layout; the cache is cleared before every turn, so the whole
    prompt is prefilled every turn.
``system-first-prefix``
    system-first layout with prefix reuse; an edit near the start of the block
    invalidates everything after it.
``history-first``
    history-first layout; after the reply ``commit`` (not timed) leaves the
    history in the cache; the block is prefilled on the critical path.
``history-first-warm``
    as above plus ``warm_up`` after the commit and after each instruction edit
    (idle time, not timed): the critical path holds only the new message.
``reopen``
    as ``history-first-warm``, but before every turn the chat's state is saved to
    SQLite and dropped from memory (``forget_chat``); ``send`` then restores it
    from SQLite, and that load is inside the measured TTFT. Its reference is
    ``naive`` at the same turn: the same history prefilled from scratch.

The conversation is deterministic text generated here (no data files): a history
of about ``history_tokens`` tokens is stored directly as messages in every
strategy's chat and prefilled once, untimed; then ``turns`` measured turns follow,
each with a new user message of about ``message_tokens`` tokens, greedy decoding
and ``max_tokens`` reply tokens. Every ``edit_every`` turns (0: never) the
instruction block is edited near its start, as a real edit would. Turns are
interleaved across strategies, in an order rotated every turn, so machine drift
hits all of them alike. TTFT is the engine's own ``TurnMetrics.ttft_ms`` (from
the start of ``send`` to the first sampled token) for every strategy.

API (Qt-free; the GUI calls it from a worker thread)::

    config = BenchConfig(history_tokens=3000, instruction_tokens=400, turns=8)
    report = run_benchmark(config, on_turn=print, on_status=print, cancel=event)
    report.summaries["history-first-warm"].median_ttft_ms
    report.ratios["vs_naive"]["history-first-warm"]   # > 1: that many times faster
    report.to_json(); report.format_table()

``on_turn(TurnSample)`` fires after each measured turn of each strategy (its
background steps included); ``on_status(str)`` reports set-up progress; setting
``cancel`` stops at the next step and returns a partial report with
``cancelled=True``. ``python -m app bench`` is the command-line front end
(:func:`add_bench_arguments`, :func:`run_bench`); ``--plot`` uses
``app.bench.plot``, which is the only part that imports Qt.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.session.chat_session import Engine, GenerationOptions, TurnResult
from app.storage.store import Store

NAIVE = "naive"
SYSTEM_FIRST_PREFIX = "system-first-prefix"
HISTORY_FIRST = "history-first"
HISTORY_FIRST_WARM = "history-first-warm"
REOPEN = "reopen"
STRATEGIES = (NAIVE, SYSTEM_FIRST_PREFIX, HISTORY_FIRST, HISTORY_FIRST_WARM, REOPEN)

DESCRIPTIONS = {
    NAIVE: "stateless client: whole prompt prefilled every turn",
    SYSTEM_FIRST_PREFIX: "system-first + longest-common-prefix reuse (llama.cpp server, Ollama)",
    HISTORY_FIRST: "history-first + commit; block prefilled on the critical path",
    HISTORY_FIRST_WARM: "history-first + commit + idle-time warm-up",
    REOPEN: "history-first-warm restored from SQLite before every turn (load is timed)",
}

#: Goals of the issue, checked on every run (they are meant for the default sizes).
GOAL_WARM_VS_NAIVE = 20.0
GOAL_WARM_VS_SYSTEM_FIRST = 15.0
GOAL_NO_EDIT_SLOWDOWN = 1.3
GOAL_REOPEN = 40.0


@dataclass
class BenchConfig:
    """Sizes are in tokens of the benchmark's model; ``edit_every`` 0 never edits."""

    model_path: str | Path | None = None
    n_ctx: int | None = None
    kv_type: str = "f16"
    n_threads: int | None = None
    history_tokens: int = 3000
    instruction_tokens: int = 400
    message_tokens: int = 40
    turns: int = 8
    edit_every: int = 1
    max_tokens: int = 16
    seed: int = 0
    strategies: tuple[str, ...] = STRATEGIES
    db_path: str | Path | None = None  # None: a temporary database, deleted afterwards

    def validate(self) -> None:
        unknown = [name for name in self.strategies if name not in STRATEGIES]
        if unknown:
            raise ValueError(f"unknown strategies {unknown}; use some of {', '.join(STRATEGIES)}")
        if not self.strategies:
            raise ValueError("no strategy to run")
        if REOPEN in self.strategies and NAIVE not in self.strategies:
            raise ValueError("reopen is compared with naive (the same history prefilled anew)")
        sizes = ("history_tokens", "instruction_tokens", "message_tokens", "turns", "max_tokens")
        for name in sizes:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be greater than 0")
        if self.edit_every < 0:
            raise ValueError("edit_every must be 0 (never) or more")

    def is_edit_turn(self, turn: int) -> bool:
        return self.edit_every > 0 and turn % self.edit_every == 0


@dataclass
class TurnSample:
    """One measured turn of one strategy. Token counts are exact, times in ms."""

    strategy: str
    turn: int
    edit: bool
    ttft_ms: float
    prefill_tokens: int  # evaluated on the critical path (before the first token)
    reused_tokens: int
    prompt_tokens: int
    prefill_ms: float
    decode_tokens: int
    background_tokens: int  # commit + warm-ups for this turn, off the critical path
    background_ms: float
    state_bytes: int = 0
    state_save_ms: float | None = None
    state_load_ms: float | None = None
    reply: str = ""


@dataclass
class StrategySummary:
    """Per-strategy figures over the measured turns (``prefill_tokens``: median per turn)."""

    name: str
    description: str
    turns: int
    median_ttft_ms: float | None
    max_ttft_ms: float | None
    min_ttft_ms: float | None
    median_ttft_edit_ms: float | None
    median_ttft_no_edit_ms: float | None
    prefill_tokens: float | None
    prefill_tokens_total: int
    background_tokens: float | None
    background_tokens_total: int
    prompt_tokens: float | None
    state_bytes: int
    state_save_ms: float | None
    state_load_ms: float | None
    ttft_ms: list[float] = field(default_factory=list)


@dataclass
class BenchReport:
    config: dict[str, Any]
    model: dict[str, Any]
    script: dict[str, Any]
    samples: list[TurnSample]
    summaries: dict[str, StrategySummary]
    ratios: dict[str, Any]
    checks: list[dict[str, Any]]
    setup_s: float
    elapsed_s: float
    cancelled: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "units": {
                "ttft_ms": "engine-reported time to first token, per measured turn",
                "prefill_tokens": "median per measured turn, critical path",
                "background_tokens": "median per measured turn, commit + warm-up",
                "ratios": "reference median TTFT / strategy median TTFT (> 1: faster)",
            },
            "config": self.config,
            "model": self.model,
            "script": self.script,
            "strategies": {name: asdict(summary) for name, summary in self.summaries.items()},
            "ratios": self.ratios,
            "checks": self.checks,
            "turns": [asdict(sample) for sample in self.samples],
            "setup_s": round(self.setup_s, 2),
            "elapsed_s": round(self.elapsed_s, 2),
            "cancelled": self.cancelled,
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(_rounded(self.as_dict()), ensure_ascii=False, indent=indent)

    def format_table(self) -> str:
        return format_report(self)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


# -- the scripted conversation -------------------------------------------------------

_SUBJECTS = (
    "the north bed", "the tomato seedlings", "our compost pile", "the rain barrel",
    "the tool shed", "the volunteer schedule", "the soil test", "the herb spiral",
    "the bean trellis", "the irrigation line", "the seed budget", "the school group",
    "the greenhouse door", "the pumpkin patch", "the bee hotel", "the mulch delivery",
)
_VERBS = (
    "needs", "depends on", "benefits from", "competes with", "should come before",
    "is limited by", "could share", "would improve with", "has to wait for", "works well with",
)
_OBJECTS = (
    "more morning light", "a thicker layer of mulch", "weekly watering", "a cheaper supplier",
    "two extra volunteers", "a sturdier fence", "the new wheelbarrow", "better drainage",
    "a written checklist", "the spare hoses", "a second key", "an earlier start",
)
_TAILS = (
    "before the first frost", "according to last year's notes", "if the budget allows",
    "during the dry weeks", "once the paths are finished", "on Saturday mornings",
    "after the council meeting", "while the days are still long",
)
_QUESTIONS = (
    "Could you check whether", "Do you think", "Please tell me if", "I wonder whether",
    "Would it be sensible to say that", "Can we agree that",
)
_PERSONAS = (
    "a patient head gardener", "a careful project planner", "a cheerful volunteer coach",
    "a frugal treasurer", "a strict safety officer", "a curious botanist",
    "a busy school teacher", "a retired farmer",
)
_TONES = ("calm", "brisk", "friendly", "formal", "playful", "plain")


class Script:
    """Deterministic texts sized in tokens of the benchmark's model."""

    def __init__(self, count: Callable[[str], int], seed: int) -> None:
        self._count = count
        self._rng = random.Random(seed)

    def _sentence(self) -> str:
        rng = self._rng
        text = " ".join(rng.choice(words) for words in (_SUBJECTS, _VERBS, _OBJECTS, _TAILS))
        return text[0].upper() + text[1:] + "."

    def _question(self) -> str:
        rng = self._rng
        return (
            f"{rng.choice(_QUESTIONS)} {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} "
            f"{rng.choice(_OBJECTS)} {rng.choice(_TAILS)}?"
        )

    def _fill(self, parts: list[str], target: int, make: Callable[[], str], sep: str = " ") -> str:
        """Whole sentences up to ``target`` tokens, then words off the end to land on it."""
        text = sep.join(parts)
        while self._count(text) < target:
            parts.append(make())
            text = sep.join(parts)
        words = text.split(" ")
        while len(words) > 1 and self._count(" ".join(words)) > target:
            words.pop()
        return " ".join(words)

    def user_message(self, target: int) -> str:
        return self._fill([self._question()], target, self._sentence)

    def reply(self, target: int) -> str:
        return self._fill(["Here is what I would suggest."], target, self._sentence)

    def rules(self, target: int) -> str:
        counter = iter(range(1, 10_000))
        return self._fill([], target, lambda: f"Rule {next(counter)}: {self._sentence()}", "\n")


def block_text(rules: str, revision: int) -> str:
    """The instruction block; the revision line comes first so an edit breaks prefix reuse."""
    persona = _PERSONAS[revision % len(_PERSONAS)]
    tone = _TONES[revision % len(_TONES)]
    return (
        f"Revision {revision}. For this reply act as {persona} and keep a {tone} tone.\n"
        f"You help a neighbourhood plan its community garden. Follow these rules:\n{rules}"
    )


# -- strategies ----------------------------------------------------------------------


class _Runner:
    """One strategy: its engine, its chat and what it does around each turn."""

    def __init__(self, name: str, engine: Engine, chat_id: int) -> None:
        self.name = name
        self.engine = engine
        self.chat_id = chat_id
        self.naive = name == NAIVE
        self.commits = name in (HISTORY_FIRST, HISTORY_FIRST_WARM, REOPEN)
        self.warm = name in (HISTORY_FIRST_WARM, REOPEN)
        self.reopen = name == REOPEN
        self.saves = not self.naive

    def play(
        self,
        turn: int,
        edit: bool,
        block: str,
        message: str,
        options: GenerationOptions,
        cancel: threading.Event | None,
    ) -> TurnSample | None:
        """Run one turn; None if cancelled. Only ``send`` is on the measured path."""
        engine, chat = self.engine, self.chat_id
        background_tokens = 0
        background_ms = 0.0
        if edit:
            engine.store.add_instruction_version(chat, block)
            if self.warm:  # idle time while the user types the next message
                step = engine.warm_up(chat, cancel)
                background_tokens += step.tokens
                background_ms += step.ms
        if self.reopen:
            if engine.cache_dirty:
                engine.save_state(chat)
            engine.forget_chat(chat)  # the app was closed; send() restores from SQLite
        if self.naive:
            engine.backend.clear()
            engine.cache.clear()
        if cancel is not None and cancel.is_set():
            return None
        result: TurnResult = engine.send(chat, message, options, cancel=cancel)
        metrics = result.metrics
        if metrics.finish_reason == "cancelled":
            return None
        if self.commits:
            step = engine.commit(chat, cancel)
            background_tokens += step.tokens
            background_ms += step.ms
        if self.warm:
            step = engine.warm_up(chat, cancel)
            background_tokens += step.tokens
            background_ms += step.ms
        if cancel is not None and cancel.is_set():
            return None
        state_bytes, save_ms = 0, None
        if self.saves:
            finished = engine.finish_turn(chat)
            if finished is not None:
                state_bytes, save_ms = finished.state_bytes, finished.state_save_ms
        return TurnSample(
            strategy=self.name,
            turn=turn,
            edit=edit,
            ttft_ms=metrics.ttft_ms,
            prefill_tokens=metrics.prefill_tokens,
            reused_tokens=metrics.reused_tokens,
            prompt_tokens=metrics.prompt_tokens,
            prefill_ms=metrics.prefill_ms,
            decode_tokens=metrics.decode_tokens,
            background_tokens=background_tokens,
            background_ms=background_ms,
            state_bytes=state_bytes,
            state_save_ms=save_ms,
            state_load_ms=metrics.state_load_ms,
            reply=result.reply,
        )


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def summarize(name: str, samples: list[TurnSample]) -> StrategySummary:
    ttft = [s.ttft_ms for s in samples]
    saves = [s.state_save_ms for s in samples if s.state_save_ms is not None]
    loads = [s.state_load_ms for s in samples if s.state_load_ms is not None]
    return StrategySummary(
        name=name,
        description=DESCRIPTIONS[name],
        turns=len(samples),
        median_ttft_ms=_median(ttft),
        max_ttft_ms=max(ttft) if ttft else None,
        min_ttft_ms=min(ttft) if ttft else None,
        median_ttft_edit_ms=_median([s.ttft_ms for s in samples if s.edit]),
        median_ttft_no_edit_ms=_median([s.ttft_ms for s in samples if not s.edit]),
        prefill_tokens=_median([s.prefill_tokens for s in samples]),
        prefill_tokens_total=sum(s.prefill_tokens for s in samples),
        background_tokens=_median([s.background_tokens for s in samples]),
        background_tokens_total=sum(s.background_tokens for s in samples),
        prompt_tokens=_median([s.prompt_tokens for s in samples]),
        state_bytes=max((s.state_bytes for s in samples), default=0),
        state_save_ms=_median(saves),
        state_load_ms=_median(loads),
        ttft_ms=ttft,
    )


def _ratio(reference: float | None, value: float | None) -> float | None:
    if reference is None or value is None or value <= 0:
        return None
    return reference / value


def compute_ratios(summaries: dict[str, StrategySummary]) -> dict[str, Any]:
    """Speed-ups: reference median TTFT / strategy median TTFT, all turns and edit turns."""
    ratios: dict[str, Any] = {}
    for key, reference in (("naive", NAIVE), ("system_first_prefix", SYSTEM_FIRST_PREFIX)):
        base = summaries.get(reference)
        if base is None:
            continue
        ratios[f"vs_{key}"] = {
            name: _ratio(base.median_ttft_ms, s.median_ttft_ms) for name, s in summaries.items()
        }
        if base.median_ttft_edit_ms is not None:
            ratios[f"edit_turns_vs_{key}"] = {
                name: _ratio(base.median_ttft_edit_ms, s.median_ttft_edit_ms)
                for name, s in summaries.items()
            }
    if REOPEN in summaries and NAIVE in summaries:
        ratios["reopen_vs_reprefill"] = _ratio(
            summaries[NAIVE].median_ttft_ms, summaries[REOPEN].median_ttft_ms
        )
    return ratios


def compute_checks(summaries: dict[str, StrategySummary], edit_every: int) -> list[dict[str, Any]]:
    """The issue's acceptance goals, evaluated on whatever sizes were run."""
    checks: list[dict[str, Any]] = []

    def add(goal: str, value: float | None, target: float, at_least: bool) -> None:
        met = None if value is None else (value >= target if at_least else value <= target)
        checks.append({"goal": goal, "value": value, "target": target, "met": met})

    warm = summaries.get(HISTORY_FIRST_WARM)
    naive = summaries.get(NAIVE)
    prefix = summaries.get(SYSTEM_FIRST_PREFIX)
    if warm is not None and edit_every > 0:
        if naive is not None:
            add("history-first-warm vs naive, edit turns (x faster)",
                _ratio(naive.median_ttft_edit_ms, warm.median_ttft_edit_ms),
                GOAL_WARM_VS_NAIVE, True)
        if prefix is not None:
            add("history-first-warm vs system-first-prefix, edit turns (x faster)",
                _ratio(prefix.median_ttft_edit_ms, warm.median_ttft_edit_ms),
                GOAL_WARM_VS_SYSTEM_FIRST, True)
    if warm is not None and prefix is not None and edit_every == 0:
        add("history-first-warm / system-first-prefix TTFT, no edits (x slower)",
            _ratio(warm.median_ttft_ms, prefix.median_ttft_ms), GOAL_NO_EDIT_SLOWDOWN, False)
    if REOPEN in summaries and naive is not None:
        add("reopen vs re-prefill of the same history (x faster)",
            _ratio(naive.median_ttft_ms, summaries[REOPEN].median_ttft_ms), GOAL_REOPEN, True)
    return checks


# -- the run -------------------------------------------------------------------------


def _reply_target(remaining: int, message_tokens: int) -> int:
    return max(8, min(3 * message_tokens, remaining))


def run_benchmark(
    config: BenchConfig,
    *,
    on_turn: Callable[[TurnSample], None] | None = None,
    on_status: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
) -> BenchReport:
    """Build the script, prefill every strategy's history (untimed), then run the turns."""
    config.validate()
    started = time.perf_counter()
    status = on_status or (lambda _text: None)
    with tempfile.TemporaryDirectory(prefix="kvchat-bench-") as folder:
        db_path = Path(config.db_path) if config.db_path else Path(folder) / "bench.db"
        if db_path.exists():
            raise ValueError(f"the benchmark needs a new database; {db_path} exists")
        store = Store(db_path)
        engines: list[Engine] = []
        try:
            return _run(config, store, engines, started, status, on_turn, cancel)
        finally:
            for engine in engines:
                engine.close()
            store.close()


def _run(
    config: BenchConfig,
    store: Store,
    engines: list[Engine],
    started: float,
    status: Callable[[str], None],
    on_turn: Callable[[TurnSample], None] | None,
    cancel: threading.Event | None,
) -> BenchReport:
    status("loading the model")
    for _ in config.strategies:
        engines.append(
            Engine(store, config.model_path, n_ctx=config.n_ctx, kv_type=config.kv_type,
                   n_threads=config.n_threads)
        )
    first = engines[0]
    builder = first.builder
    script = Script(builder.content_tokens, config.seed)

    # The script: rules, a history of whole turns, then one message per measured turn.
    rules = script.rules(config.instruction_tokens)
    history: list[tuple[str, str]] = []
    history_size = 0
    while history_size < config.history_tokens:
        user = script.user_message(config.message_tokens)
        history_size += len(builder.user_segment(user))
        remaining = config.history_tokens - history_size
        reply = script.reply(_reply_target(remaining, config.message_tokens))
        history_size += len(builder.assistant_segment_from_text(reply))
        history.append((user, reply))
    messages = [script.user_message(config.message_tokens) for _ in range(config.turns)]
    block = block_text(rules, 0)
    later = builder.later_block(block)
    block_size = len(later.tokens) if later is not None else 0
    message_size = max(len(builder.user_segment(m)) for m in messages)
    needed = (
        len(builder.opening("history-first", "").tokens) + history_size + block_size + 16
        + config.turns * (message_size + config.max_tokens + 16)
    )
    if needed > first.n_ctx:
        raise ValueError(
            f"the scripted chat needs about {needed} tokens but the context holds {first.n_ctx}; "
            "lower --history-tokens/--turns or raise --n-ctx"
        )

    runners: dict[str, _Runner] = {}
    for name, engine in zip(config.strategies, engines, strict=True):
        layout = "system-first" if name in (NAIVE, SYSTEM_FIRST_PREFIX) else "history-first"
        chat = store.create_chat(f"bench {name}", layout)
        store.add_instruction_version(chat.id, block)
        for user, reply in history:
            store.add_message(chat.id, "user", user)
            store.add_message(chat.id, "assistant", reply)
        engine.prompt_plan(chat.id, "x")  # tokenizes the stored messages, untimed
        runners[name] = _Runner(name, engine, chat.id)

    # Untimed prefill of each history (as the chats would hold after a long session).
    # The history-first chats hold the same tokens: prefill one, copy its saved state.
    donor: _Runner | None = None
    for name, runner in runners.items():
        if cancel is not None and cancel.is_set():
            return _report(config, first, history_size, block_size, message_size, [], started,
                           time.perf_counter() - started, cancelled=True)
        if runner.naive:
            continue
        engine = runner.engine
        if runner.commits and donor is not None:
            saved = store.load_state(donor.chat_id)
            if saved is not None:
                store.save_state(dataclasses.replace(saved, chat_id=runner.chat_id))
            engine.activate(runner.chat_id)
        status(f"prefilling the history of {name} (untimed)")
        engine.commit(runner.chat_id, cancel)
        if runner.commits and donor is None:
            engine.save_state(runner.chat_id)
            donor = runner
        if runner.warm:
            engine.warm_up(runner.chat_id, cancel)
        if engine.cache_dirty:
            engine.save_state(runner.chat_id)
    setup_s = time.perf_counter() - started

    options = GenerationOptions(max_tokens=config.max_tokens, temperature=0.0, seed=config.seed)
    samples: list[TurnSample] = []
    order = list(runners.values())
    cancelled = False
    for turn in range(config.turns):
        edit = config.is_edit_turn(turn)
        text = block_text(rules, turn + 1) if edit else ""
        shift = turn % len(order)
        for runner in order[shift:] + order[:shift]:
            if cancel is not None and cancel.is_set():
                cancelled = True
                break
            status(f"turn {turn + 1}/{config.turns}: {runner.name}")
            sample = runner.play(turn, edit, text, messages[turn], options, cancel)
            if sample is None:
                cancelled = True
                break
            samples.append(sample)
            if on_turn is not None:
                on_turn(sample)
        if cancelled:
            break
    return _report(config, first, history_size, block_size, message_size, samples, started,
                   setup_s, cancelled=cancelled)


def _report(
    config: BenchConfig,
    engine: Engine,
    history_size: int,
    block_size: int,
    message_size: int,
    samples: list[TurnSample],
    started: float,
    setup_s: float,
    *,
    cancelled: bool,
) -> BenchReport:
    summaries = {
        name: summarize(name, [s for s in samples if s.strategy == name])
        for name in config.strategies
    }
    info = engine.backend.info
    config_data = {key: value for key, value in asdict(config).items() if key != "model_path"}
    config_data["strategies"] = list(config.strategies)
    config_data["db_path"] = str(config.db_path) if config.db_path else None
    return BenchReport(
        config=config_data,
        model={
            "file": info.path.name,
            "description": info.description,
            "n_ctx": engine.n_ctx,
            "kv_type": engine.kv_type,
            "n_threads": config.n_threads or os.cpu_count(),
            "llama_cpp": engine.fingerprint("history-first")["llama_cpp"],
        },
        script={
            "history_tokens": history_size,
            "block_tokens": block_size,
            "max_message_tokens": message_size,
        },
        samples=samples,
        summaries=summaries,
        ratios=compute_ratios(summaries),
        checks=compute_checks(summaries, config.edit_every),
        setup_s=setup_s,
        elapsed_s=time.perf_counter() - started,
        cancelled=cancelled,
    )


# -- text output ---------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def format_report(report: BenchReport) -> str:
    """The human-readable tables: TTFT per turn, per-strategy summary, ratios, goals."""
    config, script = report.config, report.script
    every = config["edit_every"]
    edits = {0: "never edited", 1: "edited every turn"}.get(every, f"edited every {every} turns")
    lines = [
        f"KV Chat bench: {report.model['file']} ({report.model['description']}), "
        f"n_ctx {report.model['n_ctx']}, kv {report.model['kv_type']}, "
        f"{report.model['n_threads']} threads",
        f"history {script['history_tokens']} tokens, instruction block {script['block_tokens']} "
        f"tokens ({edits}), messages <= {script['max_message_tokens']} tokens, "
        f"{config['turns']} turns, replies <= {config['max_tokens']} tokens (greedy)",
        f"set-up {report.setup_s:.1f} s, total {report.elapsed_s:.1f} s"
        + ("  [CANCELLED: partial results]" if report.cancelled else ""),
        "",
        "TTFT per turn (ms; * = instruction edit before the turn)",
    ]
    names = list(report.summaries)
    width = max(len(name) for name in names) + 2
    turns = max((s.turns for s in report.summaries.values()), default=0)
    edit_flags = {s.turn: s.edit for s in report.samples}
    header = "".join(
        f"{('*' if edit_flags.get(t) else '') + 't' + str(t + 1):>9}" for t in range(turns)
    )
    lines.append(f"{'strategy':<{width}}{header}")
    for name in names:
        values = "".join(f"{v:>9.0f}" for v in report.summaries[name].ttft_ms)
        lines.append(f"{name:<{width}}{values}")
    lines.append("")
    lines.append(
        f"{'strategy':<{width}}{'median':>9}{'max':>9}{'prefill':>9}{'backgr.':>9}"
        f"{'prompt':>8}{'state':>9}{'save':>7}{'load':>7}{'x naive':>9}{'x sys-1st':>10}"
    )
    lines.append(
        f"{'':<{width}}{'TTFT ms':>9}{'TTFT ms':>9}{'tok/turn':>9}{'tok/turn':>9}"
        f"{'tokens':>8}{'MB':>9}{'ms':>7}{'ms':>7}{'':>9}{'':>10}"
    )
    vs_naive = report.ratios.get("vs_naive", {})
    vs_prefix = report.ratios.get("vs_system_first_prefix", {})
    for name in names:
        s = report.summaries[name]
        lines.append(
            f"{name:<{width}}{_fmt(s.median_ttft_ms):>9}{_fmt(s.max_ttft_ms):>9}"
            f"{_fmt(s.prefill_tokens):>9}{_fmt(s.background_tokens):>9}{_fmt(s.prompt_tokens):>8}"
            f"{_fmt(s.state_bytes / 1e6 if s.state_bytes else None, 1):>9}"
            f"{_fmt(s.state_save_ms):>7}{_fmt(s.state_load_ms):>7}"
            f"{_fmt_ratio(vs_naive.get(name)):>9}{_fmt_ratio(vs_prefix.get(name)):>10}"
        )
    lines.append("(prefill / background: median tokens per turn; x: reference median TTFT / "
                 "strategy median TTFT)")
    for key, label in (("edit_turns_vs_naive", "edit turns, x naive"),
                       ("edit_turns_vs_system_first_prefix", "edit turns, x system-first-prefix")):
        if key in report.ratios and config["edit_every"] > 1:
            values = ", ".join(f"{n} {_fmt_ratio(v)}" for n, v in report.ratios[key].items())
            lines.append(f"{label}: {values}")
    if report.ratios.get("reopen_vs_reprefill") is not None:
        lines.append(
            f"reopen vs re-prefill of the same history: "
            f"{report.ratios['reopen_vs_reprefill']:.1f}x faster"
        )
    if report.checks:
        lines.append("")
        lines.append("goals (set for the default sizes):")
        for check in report.checks:
            mark = {True: "met", False: "MISSED", None: "n/a"}[check["met"]]
            relation = "<=" if "slower" in check["goal"] else ">="
            lines.append(
                f"  [{mark}] {check['goal']}: {_fmt(check['value'], 1)} "
                f"(goal {relation} {check['target']:g})"
            )
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------


def _count(text: str, *, allow_zero: bool = False) -> int:
    try:
        value = int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from error
    if value < 0 or (value == 0 and not allow_zero):
        raise argparse.ArgumentTypeError(f"{value} must be {'0 or more' if allow_zero else '> 0'}")
    return value


def _strategy_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in STRATEGIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"use a comma-separated subset of {', '.join(STRATEGIES)}")
    return names


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench options (the model options --model/--kv-type/--n-ctx come from app.cli)."""
    defaults = BenchConfig()
    parser.add_argument("--history-tokens", type=_count, default=defaults.history_tokens,
                        help="size of the prefilled history (default %(default)s)")
    parser.add_argument("--instruction-tokens", type=_count, default=defaults.instruction_tokens,
                        help="size of the instruction block (default %(default)s)")
    parser.add_argument("--message-tokens", type=_count, default=defaults.message_tokens,
                        help="size of each new user message (default %(default)s)")
    parser.add_argument("--turns", type=_count, default=defaults.turns,
                        help="measured turns (default %(default)s)")
    parser.add_argument("--edit-every", type=lambda t: _count(t, allow_zero=True),
                        default=defaults.edit_every,
                        help="edit the instruction block every K turns; 0: never "
                        "(default %(default)s)")
    parser.add_argument("--max-tokens", type=_count, default=defaults.max_tokens,
                        help="reply tokens per turn, greedy (default %(default)s)")
    parser.add_argument("--threads", type=_count, help="CPU threads (default: all cores)")
    parser.add_argument("--strategies", type=_strategy_list, default=STRATEGIES,
                        help="comma-separated subset of: " + ", ".join(STRATEGIES))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--plot", metavar="FILE.png", help="write a chart of TTFT per turn")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        model_path=getattr(args, "model", None),
        n_ctx=getattr(args, "n_ctx", None),
        kv_type=getattr(args, "kv_type", "f16"),
        n_threads=args.threads,
        history_tokens=args.history_tokens,
        instruction_tokens=args.instruction_tokens,
        message_tokens=args.message_tokens,
        turns=args.turns,
        edit_every=args.edit_every,
        max_tokens=args.max_tokens,
        strategies=tuple(args.strategies),
    )


def run_bench(args: argparse.Namespace) -> int:
    """``python -m app bench``: progress on stderr, the table (or one JSON object) on stdout."""
    config = config_from_args(args)
    plot_path: Path | None = None
    if args.plot:
        plot_path = Path(args.plot).expanduser()
        if not plot_path.parent.is_dir():
            raise ValueError(f"folder does not exist: {plot_path.parent}")

    def show_turn(sample: TurnSample) -> None:
        print(
            f"turn {sample.turn + 1}{'*' if sample.edit else ' '} {sample.strategy:<20} "
            f"TTFT {sample.ttft_ms:8.0f} ms  prefill {sample.prefill_tokens:5d}  "
            f"background {sample.background_tokens:5d}",
            file=sys.stderr,
            flush=True,
        )

    def show_status(text: str) -> None:
        if not text.startswith("turn "):
            print(f"bench: {text}", file=sys.stderr, flush=True)

    report = run_benchmark(config, on_turn=show_turn, on_status=show_status)
    if plot_path is not None:
        from app.bench.plot import write_ttft_plot  # Qt only when a chart is asked for

        write_ttft_plot(report, plot_path)
    if args.json:
        print(report.to_json())
    else:
        print(report.format_table())
    return 0
