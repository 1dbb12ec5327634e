"""Memory that cannot drop a partial range (recurrent and hybrid models), on the real model.

The backend is ``NoPartialRemoval`` (tests/backend_double.py): the real SmolLM2 backend
refusing partial ``seq_rm`` as llama.cpp does for recurrent memory. Everything else (the
model, llama.cpp's cells, SQLite in tmp_path) is real.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from backend_double import NoPartialRemoval
from conftest import GREEDY, TEST_CTX, send_cancelled_after

from app.core.llama_backend import LlamaBackend
from app.session.chat_session import ChatSession, GenerationOptions
from app.storage.store import Store

INSTRUCTIONS = "You are a terse assistant. Answer in one short sentence."
QUESTIONS = ["What is the capital of France?", "Name a large animal.", "What colour is the sky?"]
REPLY = GenerationOptions(max_tokens=16, temperature=0.0)


@pytest.fixture
def recurrent_engine(model_path: Path) -> Iterator[Callable[[Store], ChatSession]]:
    made: list[ChatSession] = []

    def factory(store: Store, *, announced: bool = False) -> ChatSession:
        real = LlamaBackend(model_path, n_ctx=TEST_CTX)
        backend = NoPartialRemoval(real, announced=announced)
        engine = ChatSession(store, backend=backend)  # type: ignore[arg-type]
        made.append(engine)
        return engine

    yield factory
    for engine in made:
        engine.close()


def _chat(store: Store, name: str) -> int:
    chat = store.create_chat(name, "history-first")
    store.add_instruction_version(chat.id, INSTRUCTIONS)
    return chat.id


def _consistent(engine: ChatSession) -> None:
    """The mirror holds exactly what llama.cpp holds for the sequence."""
    assert engine.backend.last_position() + 1 == len(engine.cache_tokens)


def test_turns_complete_and_reuse_the_history_through_the_snapshot(
    tmp_path: Path, recurrent_engine: Callable[[Store], ChatSession], make_engine: Callable
) -> None:
    with Store(tmp_path / "normal.db") as normal_store, Store(tmp_path / "rec.db") as store:
        normal = make_engine(normal_store)
        engine = recurrent_engine(store)
        normal_chat, chat_id = _chat(normal_store, "normal"), _chat(store, "recurrent")
        results = []
        for question in QUESTIONS:
            expected = normal.send(normal_chat, question, REPLY)
            normal.after_reply(normal_chat)
            history = len(engine.history_plan(chat_id).tokens)
            result = engine.send(chat_id, question, REPLY)
            _consistent(engine)
            metrics = engine.after_reply(chat_id)
            assert metrics is not None and metrics.finish_reason in {"stop", "length"}
            assert result.reply == expected.reply  # greedy: the same reply as normal memory
            _consistent(engine)
            assert list(engine.cache_tokens) == engine.history_plan(chat_id, with_block=True).tokens
            results.append((history, result, metrics))

        (_, _, first), (history_1, second, second_done), (history_2, third, _) = results
        backend = engine.backend
        assert backend.refused, "the commit asked to drop the block and was refused"
        assert not engine.mirror.partial_removal  # learned from the refusal
        # Turn 1: no snapshot yet, so its commit recomputed from the start, and says so.
        assert any("recomputed from the start" in note for note in first.notes), first.notes
        # Turn 2 reused the committed history + block, and its commit went back to the
        # snapshot at the history instead of recomputing it.
        assert second.metrics.reused_tokens >= history_1 > 0
        assert any("restored the snapshot" in note for note in second_done.notes)
        user, reply = store.messages(chat_id)[2:4]
        assert second_done.commit_tokens <= len(user.token_ids) + len(reply.token_ids)
        assert second_done.commit_tokens < history_1
        assert third.metrics.reused_tokens >= history_2
        stored = store.metrics(chat_id)[1].data
        assert any("cannot drop part of the sequence" in note for note in stored["notes"])
        assert stored == second_done.as_dict()  # the warm-up after the save is stored too
        print(
            f"\nreused with the fallback: turn 2 {second.metrics.reused_tokens} of "
            f"{second.metrics.prompt_tokens} prompt tokens (history {history_1}); turn 3 "
            f"{third.metrics.reused_tokens} of {third.metrics.prompt_tokens}; turn 2's commit "
            f"evaluated {second_done.commit_tokens} tokens"
        )


def test_a_cancelled_reply_is_dropped_through_the_snapshot(
    store: Store, recurrent_engine: Callable[[Store], ChatSession]
) -> None:
    engine = recurrent_engine(store)
    chat_id = _chat(store, "cancel")
    engine.send(chat_id, QUESTIONS[0], GREEDY)
    engine.after_reply(chat_id)
    history = engine.history_plan(chat_id).tokens
    result, _ = send_cancelled_after(engine, chat_id)
    assert result.metrics.finish_reason == "cancelled"
    assert store.message(result.reply_message_id).status == "cancelled"
    _consistent(engine)
    metrics = engine.after_reply(chat_id)
    assert metrics is not None
    assert any("restored the snapshot" in note for note in metrics.notes), metrics.notes
    assert metrics.commit_tokens < len(history)  # the history was not recomputed
    _consistent(engine)
    assert list(engine.cache_tokens) == engine.history_plan(chat_id, with_block=True).tokens
    committed = len(engine.history_plan(chat_id).tokens)
    follow = engine.send(chat_id, QUESTIONS[1], GREEDY)
    assert follow.metrics.reused_tokens >= committed
    _consistent(engine)


def test_an_edited_block_goes_back_to_the_snapshot_and_no_snapshot_means_a_recompute(
    tmp_path: Path, recurrent_engine: Callable[[Store], ChatSession], make_engine: Callable
) -> None:
    with Store(tmp_path / "normal.db") as normal_store, Store(tmp_path / "rec.db") as store:
        normal = make_engine(normal_store)
        engine = recurrent_engine(store)
        ids = {normal: _chat(normal_store, "edit"), engine: _chat(store, "edit")}
        replies: dict[ChatSession, list[str]] = {normal: [], engine: []}
        for session, chat_id in ids.items():
            session.send(chat_id, QUESTIONS[0], GREEDY)
            session.after_reply(chat_id)
            session.store.add_instruction_version(chat_id, "Always answer like a pirate.")
            edited = session.send(chat_id, QUESTIONS[1], GREEDY)
            session.after_reply(chat_id)
            replies[session].append(edited.reply)
            if session is engine:
                history = len(engine.history_plan(chat_id).tokens)
                assert any("restored the snapshot" in n for n in edited.metrics.notes)
                assert edited.metrics.reused_tokens > 0
                engine.mirror.checkpoints.clear()  # as if it could not be kept
            session.store.add_instruction_version(chat_id, "Answer in French.")
            again = session.send(chat_id, QUESTIONS[2], GREEDY)
            replies[session].append(again.reply)
            if session is engine:
                notes = again.metrics.notes
                assert any("no snapshot fits: recomputed from the start" in n for n in notes)
                assert again.metrics.reused_tokens == 0
                assert again.metrics.prefill_tokens > history
                _consistent(engine)
        assert replies[engine] == replies[normal]


def test_after_a_restart_the_restored_history_is_the_snapshot(
    store: Store, recurrent_engine: Callable[..., ChatSession]
) -> None:
    first = recurrent_engine(store, announced=True)
    chat_id = _chat(store, "restart")
    for question in QUESTIONS[:2]:
        first.send(chat_id, question, GREEDY)
        first.after_reply(chat_id)
    history = first.history_plan(chat_id).tokens
    # Saved at the committed history (before the block's warm-up), like sliding windows.
    assert store.kv.state(chat_id).token_ids == history
    first.close()

    second = recurrent_engine(store, announced=True)
    result = second.send(chat_id, QUESTIONS[2], GREEDY)
    assert result.metrics.state_load_ms is not None and result.metrics.reused_tokens == len(
        history
    )
    metrics = second.after_reply(chat_id)
    assert metrics is not None
    assert any("restored the snapshot" in note for note in metrics.notes), metrics.notes
    assert metrics.commit_tokens < len(history)
    _consistent(second)
    # Regenerate drops the last turn: the snapshot before it (the restored one) serves.
    again = second.regenerate(chat_id, GREEDY)
    assert any("restored the snapshot" in note for note in again.metrics.notes)
    assert again.metrics.reused_tokens >= len(history)
    assert again.reply == result.reply
    _consistent(second)
