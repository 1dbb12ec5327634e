"""Cancelling inside llama.cpp: a long prefill (abort callback) and a model load (progress
callback), on the real model. The cache stays exactly what llama.cpp holds afterwards."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from backend_double import NoPartialRemoval
from conftest import GREEDY, TEST_CTX

from app.core.llama_backend import LlamaBackend, ModelLoadCancelled
from app.session.chat_session import ChatSession, GenerationOptions
from app.storage.store import Store

LONG_CTX = 4096
REPLY = GenerationOptions(max_tokens=8, temperature=0.0)


def long_text(engine: ChatSession, tokens: int) -> str:
    """A message of about ``tokens`` tokens (varied, so it is not one repeated token)."""
    parts: list[str] = []
    index = 0
    while len(engine.builder.user_segment(" ".join(parts))) < tokens:
        parts.append(f"Item {index} weighs {index * 7 % 23} grams and is {index % 5} cm long.")
        index += 1
    return " ".join(parts)


class StopInTheSecondBatch:
    """Sets ``cancel`` a third of a batch into the second llama_decode call of a prefill."""

    def __init__(self, cancel: threading.Event) -> None:
        self.cancel = cancel
        self.started = time.perf_counter()
        self.first_batch_ms = 0.0
        self.set_at = 0.0
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def progress(self, step: str, done: int, total: int) -> None:
        if not self._first.is_set():
            self.first_batch_ms = (time.perf_counter() - self.started) * 1000
            self._first.set()

    def start(self) -> None:
        self.started = time.perf_counter()
        self._thread.start()

    def _run(self) -> None:
        if self._first.wait(timeout=300):
            time.sleep(self.first_batch_ms / 3000)
            self.set_at = time.perf_counter()
            self.cancel.set()

    def join(self) -> None:
        self._thread.join(timeout=60)


@pytest.mark.slow
def test_stop_during_a_long_prefill_returns_within_the_batch(
    store: Store, make_engine: Callable
) -> None:
    engine = make_engine(store, n_ctx=LONG_CTX)
    chat = store.create_chat("long prefill")
    text = long_text(engine, 3000)
    cancel = threading.Event()
    stopper = StopInTheSecondBatch(cancel)
    stopper.start()
    result = engine.send(chat.id, text, REPLY, progress=stopper.progress, cancel=cancel)
    returned = time.perf_counter()
    stopper.join()
    latency_ms = (returned - stopper.set_at) * 1000
    prompt = engine.prompt_plan(chat.id).tokens
    batch = engine.backend.n_batch
    whole_prefill_ms = stopper.first_batch_ms * len(prompt) / batch  # at least this long
    print(
        f"\ncancel latency {latency_ms:.0f} ms inside a {batch}-token llama_decode call "
        f"(first batch {stopper.first_batch_ms:.0f} ms; whole {len(prompt)}-token prefill "
        f">= {whole_prefill_ms:.0f} ms)"
    )
    assert result.metrics.finish_reason == "cancelled"
    assert result.reply_message_id is None  # nothing generated
    # Without the abort callback the stop would wait for the batch's end (2/3 of a batch).
    assert latency_ms < stopper.first_batch_ms / 2
    assert latency_ms < whole_prefill_ms / 10

    # llama.cpp removed the aborted call's positions; the first batch stays, and the
    # mirror says exactly that.
    held = list(engine.cache_tokens)
    assert engine.backend.last_position() + 1 == len(held) == batch
    assert held == prompt[:batch]
    again = engine.regenerate(chat.id, REPLY)  # answers the message the stop left unanswered
    assert again.metrics.reused_tokens == batch
    assert again.metrics.prefill_tokens == len(prompt) - batch
    engine.drop_cache()
    cold = engine.regenerate(chat.id, REPLY)
    assert cold.metrics.reused_tokens == 0
    assert cold.reply == again.reply  # greedy: the cache after the abort was exact


def test_an_aborted_decode_in_recurrent_memory_goes_back_to_the_snapshot(
    store: Store, model_path: Path
) -> None:
    backend = NoPartialRemoval(LlamaBackend(model_path, n_ctx=LONG_CTX))
    engine = ChatSession(store, backend=backend)  # type: ignore[arg-type]
    try:
        chat = store.create_chat("recurrent abort")
        store.add_instruction_version(chat.id, "Answer briefly.")
        for question in ("Name a planet.", "Name a metal."):
            engine.send(chat.id, question, GREEDY)
            engine.after_reply(chat.id)
        history = engine.history_plan(chat.id).tokens
        assert any(c.tokens == tuple(history) for c in engine.mirror.checkpoints)
        cancel = threading.Event()
        stopper = StopInTheSecondBatch(cancel)
        stopper.start()
        text = long_text(engine, 1400)
        result = engine.send(chat.id, text, REPLY, progress=stopper.progress, cancel=cancel)
        stopper.join()
        assert result.metrics.finish_reason == "cancelled"
        # Recurrent state cannot be trusted after an abort (llama.cpp cannot remove the
        # aborted positions): the mirror went back to the snapshot at the history.
        assert list(engine.cache_tokens) == history
        assert engine.backend.last_position() + 1 == len(history)
        again = engine.regenerate(chat.id, REPLY)
        assert again.metrics.reused_tokens == len(history)
        assert again.metrics.finish_reason in {"stop", "length"}
    finally:
        engine.close()


def test_a_model_load_is_cancelled_at_the_next_tensor(model_path: Path) -> None:
    cancel = threading.Event()
    fractions: list[float] = []
    cancelled_at = 0.0

    def progress(fraction: float) -> None:
        nonlocal cancelled_at
        fractions.append(fraction)
        if len(fractions) == 3:
            cancelled_at = time.perf_counter()
            cancel.set()

    with pytest.raises(ModelLoadCancelled, match="cancelled"):
        LlamaBackend(model_path, n_ctx=TEST_CTX, progress=progress, cancel=cancel)
    latency_ms = (time.perf_counter() - cancelled_at) * 1000
    print(f"\nmodel load cancel latency {latency_ms:.1f} ms")
    assert len(fractions) == 3  # no tensor was loaded after the cancel


def test_a_cancelled_load_leaves_loading_possible(model_path: Path, tmp_path: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    with Store(tmp_path / "load.db") as store:
        with pytest.raises(ModelLoadCancelled):
            ChatSession(store, model_path, n_ctx=TEST_CTX, load_cancel=cancel)
        engine = ChatSession(store, model_path, n_ctx=TEST_CTX)
        try:
            chat = store.create_chat("after a cancelled load")
            assert engine.send(chat.id, "Name a colour.", GREEDY).reply
        finally:
            engine.close()
