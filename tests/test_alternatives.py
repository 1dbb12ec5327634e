"""Alternatives: N replies to one prompt, the prompt evaluated once (real model, real SQLite)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from backend_double import NoPartialRemoval
from conftest import TEST_CTX

from app import limits
from app.core.llama_backend import LlamaBackend
from app.session.chat_session import ChatSession, GenerationOptions
from app.storage.store import Store

QUESTION = "Name a fruit and say why you like it."
SAMPLED = GenerationOptions(max_tokens=16, temperature=0.9, seed=7, alternatives=3)
GREEDY3 = GenerationOptions(max_tokens=12, temperature=0.0, alternatives=3)
GREEDY = GenerationOptions(max_tokens=12, temperature=0.0)


def _chat(store: Store, name: str = "fruit") -> int:
    chat = store.create_chat(name, "history-first")
    store.add_instruction_version(chat.id, "You are a cheerful assistant.")
    return chat.id


def _mirror_is_truthful(engine: ChatSession) -> None:
    """llama.cpp holds sequence 0 only, exactly as long as the mirror says."""
    backend = engine.backend
    assert backend.last_position() + 1 == len(engine.mirror)
    others = [backend.sequence_last_position(s) for s in range(1, limits.MAX_ALTERNATIVES + 2)]
    assert others == [-1] * len(others)
    assert engine.mirror.forks == ()


def test_three_alternatives_are_three_versions_from_one_prefill(engine: ChatSession) -> None:
    store = engine.store
    chat_id = _chat(store)
    prompt = engine.prompt_plan(chat_id, QUESTION).tokens
    result = engine.send(chat_id, QUESTION, SAMPLED)
    metrics = result.metrics
    texts = [a.text for a in result.alternatives]
    assert len(texts) == 3 and all(texts)
    assert len(set(texts)) > 1  # each sequence has its own sampler and seed
    # The prompt was evaluated once for the three replies.
    assert metrics.prefill_tokens == metrics.prompt_tokens == len(prompt)
    assert metrics.alternatives == 3
    reply_seq = store.messages(chat_id)[-1].seq
    versions = store.branches(chat_id)[reply_seq]
    assert versions == [a.chat_id for a in result.alternatives]
    assert [store.messages(c)[-1].text for c in versions] == texts
    # The kept reply (the first) is in the chat's history and what the family opens on.
    assert store.messages(chat_id)[-1].text == result.reply == texts[0]
    assert store.latest_in_family(versions[-1]).id == chat_id
    # The cache holds the prompt and the kept reply's tokens, nothing of the others.
    _mirror_is_truthful(engine)
    held = engine.mirror.tokens
    assert list(held[: len(prompt)]) == prompt
    assert texts[0].startswith(engine.backend.detokenize(list(held[len(prompt) :])))


def test_next_turn_after_greedy_alternatives_equals_a_cold_one(
    tmp_path: Path, make_engine: Callable[..., ChatSession]
) -> None:
    with Store(tmp_path / "warm.db") as warm_store, Store(tmp_path / "cold.db") as cold_store:
        warm, cold = make_engine(warm_store), make_engine(cold_store)
        warm_chat, cold_chat = _chat(warm_store), _chat(cold_store)
        first = warm.send(warm_chat, QUESTION, GREEDY3)
        assert any("greedy" in note for note in first.metrics.notes)
        assert len({a.text for a in first.alternatives}) == 1  # greedy: the same reply 3x
        warm.after_reply(warm_chat)
        _mirror_is_truthful(warm)
        assert list(warm.mirror.tokens) == warm.history_plan(warm_chat, with_block=True).tokens
        single = cold.send(cold_chat, QUESTION, GREEDY)
        assert single.reply == first.reply
        follow_up = "And which fruit is the sweetest?"
        warm_next = warm.send(warm_chat, follow_up, GREEDY)
        cold.drop_cache()  # the cold engine computes the whole prompt from nothing
        cold_next = cold.send(cold_chat, follow_up, GREEDY)
        assert cold_next.metrics.reused_tokens == 0
        assert warm_next.metrics.reused_tokens > 0
        assert warm_next.reply == cold_next.reply


def test_keeping_another_alternative_commits_and_saves_that_version(
    engine: ChatSession,
) -> None:
    store = engine.store
    chat_id = _chat(store)
    turn = engine.start_turn(chat_id, QUESTION, SAMPLED)
    result = turn.respond()
    chosen = turn.keep(2)
    assert chosen == result.alternatives[2]
    assert turn.run()
    assert engine.cache_chat_id == chosen.chat_id
    assert list(engine.mirror.tokens) == engine.history_plan(chosen.chat_id, with_block=True).tokens
    assert engine.states.has_state(chosen.chat_id)
    assert store.latest_in_family(chat_id).id == chosen.chat_id
    _mirror_is_truthful(engine)


def test_stopping_alternatives_keeps_the_old_reply(engine: ChatSession) -> None:
    store = engine.store
    chat_id = _chat(store)
    old = engine.send(chat_id, QUESTION, GREEDY)
    engine.after_reply(chat_id)
    stop = threading.Event()
    pieces: list[str] = []

    def on_token(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            stop.set()

    options = GenerationOptions(max_tokens=64, temperature=0.9, seed=3, alternatives=3)
    stopped = engine.regenerate(chat_id, options, on_token=on_token, cancel=stop)
    assert len(pieces) >= 3
    assert stopped.reply_message_id is None and stopped.alternatives == []
    assert any("not stored" in note for note in stopped.metrics.notes)
    assert store.messages(chat_id)[-1].text == old.reply
    assert store.branches(chat_id) == {}  # no version was added
    _mirror_is_truthful(engine)
    engine.after_reply(chat_id)
    assert list(engine.mirror.tokens) == engine.history_plan(chat_id, with_block=True).tokens


@pytest.fixture
def recurrent(model_path: Path) -> Iterator[Callable[[Store], ChatSession]]:
    made: list[ChatSession] = []

    def factory(store: Store) -> ChatSession:
        backend = NoPartialRemoval(LlamaBackend(model_path, n_ctx=TEST_CTX), announced=True)
        made.append(ChatSession(store, backend=backend))  # type: ignore[arg-type]
        return made[-1]

    yield factory
    for engine in made:
        engine.close()


def test_memory_without_partial_removal_samples_one_after_another(
    tmp_path: Path, recurrent: Callable[[Store], ChatSession]
) -> None:
    with Store(tmp_path / "r.db") as store:
        engine = recurrent(store)
        chat_id = _chat(store)
        result = engine.send(chat_id, QUESTION, SAMPLED)
        assert any("one after another" in note for note in result.metrics.notes)
        assert result.metrics.prefill_tokens == result.metrics.prompt_tokens
        assert len({a.text for a in result.alternatives}) > 1  # each its own seed
        reply_seq = store.messages(chat_id)[-1].seq
        assert len(store.branches(chat_id)[reply_seq]) == 3
        assert store.messages(chat_id)[-1].text == result.alternatives[0].text
        _mirror_is_truthful(engine)
        engine.after_reply(chat_id)
        assert list(engine.mirror.tokens) == engine.history_plan(chat_id, with_block=True).tokens


def test_cli_prints_every_reply_with_one_metrics_object(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app", "chat", "--db", str(tmp_path / "c.db"), "--chat", "c",
         "--alternatives", "3", "--temperature", "0.9", "--max-tokens", "12", "--json",
         QUESTION],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert set(payload) == {"reply", "replies", "metrics"}
    assert len(payload["replies"]) == 3 and payload["replies"][0] == payload["reply"]
    metrics = payload["metrics"]
    assert metrics["alternatives"] == 3
    assert metrics["prefill_tokens"] == metrics["prompt_tokens"]


@pytest.mark.parametrize("value", ["0", "9", "many"])
def test_cli_refuses_a_bad_count_in_one_line(tmp_path: Path, value: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app", "chat", "--db", str(tmp_path / "x.db"), "--chat", "c",
         "--alternatives", value, "hello"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "alternatives" in lines[0], done.stderr
    assert not (tmp_path / "x.db").exists()
