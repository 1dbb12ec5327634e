"""The worker never loses a step, and cancels reach into llama.cpp: real window, real model.

Failures are injected by replacing one real session method (monkeypatch); each test checks
that the step's own outcome signal arrives, that the error is visible, that busy
indicators clear, and that the next turn still works.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import TEST_CTX
from gui_helpers import (
    TURN_TIMEOUT_MS,
    close_window,
    log_of,
    open_window,
    send_turn,
    temp_settings,
)
from PySide6.QtCore import QSettings, Qt
from test_cancel import long_text

from app.core.llama_backend import DecodeError
from app.session.chat_session import ChatSession, GenerationOptions
from app.storage.store import Store
from app.ui.main_window import MainWindow
from app.ui.worker import EngineHost

pytestmark = [pytest.mark.gui, pytest.mark.slow]


@pytest.fixture
def settings(tmp_path: Path) -> QSettings:
    return temp_settings(tmp_path)


@pytest.fixture
def window(qtbot, db_path: Path, settings: QSettings):  # type: ignore[no-untyped-def]
    threads = threading.active_count()
    opened = open_window(qtbot, db_path, settings)
    yield opened
    close_window(opened)  # the engine thread joined, no timer left running
    assert threading.active_count() <= threads


def _raise(error: Exception):  # type: ignore[no-untyped-def]
    def failing(*args: object, **kwargs: object) -> None:
        raise error

    return failing


def _assert_idle(window: MainWindow) -> None:
    assert not window.busy
    assert window.send_button.isEnabled() and not window.stop_button.isEnabled()
    assert not window.progress.isVisible()
    assert window.host.busy_chat_id is None


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (DecodeError("llama_decode failed with status -3"), "the model failed"),
        (RuntimeError("something nobody expected"), "unexpected error: RuntimeError"),
    ],
)
def test_a_reply_that_raises_fails_visibly_and_the_next_turn_works(
    qtbot, window: MainWindow, monkeypatch: pytest.MonkeyPatch, error: Exception, shown: str
) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(ChatSession, "_respond", _raise(error))
        window.input.setPlainText("Name a fruit.")
        with qtbot.waitSignal(window.turn_error, timeout=TURN_TIMEOUT_MS) as failed:
            window.send()
    kind, message = failed.args
    assert kind == "error" and shown in message and str(error) in message
    assert window.last_error is not None and shown.lower() in window.last_error.lower()
    _assert_idle(window)
    outcome, background = send_turn(qtbot, window, "Name a vegetable.")
    assert outcome.reply and background is not None and background.completed
    _assert_idle(window)


def test_a_background_step_that_raises_ends_the_steps_and_the_next_turn_works(
    qtbot, window: MainWindow, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = log_of(window)
    with monkeypatch.context() as patch:
        patch.setattr(ChatSession, "_commit", _raise(RuntimeError("commit exploded")))
        with qtbot.waitSignal(window.error_shown, timeout=TURN_TIMEOUT_MS) as shown:
            reply, background = send_turn(qtbot, window, "Name a fruit.")
    assert reply.reply
    assert background is not None and not background.completed
    assert "commit" in background.notes[0] and "commit exploded" in background.notes[0]
    assert "commit exploded" in shown.args[0]
    _assert_idle(window)
    outcome, after = send_turn(qtbot, window, "Name a vegetable.")
    assert outcome.reply and after is not None and after.completed
    assert len(log.replies) == 2


def test_shutdown_closes_the_engine_and_the_store_even_if_saving_raises(
    qtbot, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads = threading.active_count()
    host = EngineHost(db_path, n_ctx=TEST_CTX)
    # Collected in the worker's thread and polled here: a qtbot.waitSignal on a signal
    # emitted in another thread would stop its own timer from that thread.
    seen: list[object] = []
    direct = Qt.ConnectionType.DirectConnection
    host.worker.model_loaded.connect(seen.append, direct)
    host.worker.reply_finished.connect(seen.append, direct)
    host.load_model(None)
    qtbot.waitUntil(lambda: len(seen) == 1, timeout=TURN_TIMEOUT_MS)
    with Store(db_path) as store:
        chat = store.create_chat("shutdown")
    options = GenerationOptions(max_tokens=4, temperature=0.0)
    host.send(chat.id, "Name a fruit.", options)
    qtbot.waitUntil(lambda: len(seen) == 2, timeout=TURN_TIMEOUT_MS)
    session = host.worker.session
    assert isinstance(session, ChatSession)
    errors: list[str] = []
    host.worker.error.connect(errors.append, Qt.ConnectionType.DirectConnection)
    monkeypatch.setattr(ChatSession, "save_if_changed", _raise(RuntimeError("disk on fire")))
    monkeypatch.setattr(ChatSession, "close", _raise(RuntimeError("close failed too")))
    host.shutdown()
    assert host.engine_thread.isFinished()
    assert host.worker.session is None
    assert any("disk on fire" in e for e in errors) and any("close failed" in e for e in errors)
    monkeypatch.undo()
    session.close()  # the real close, which the failing one stood in for
    with Store(db_path, exclusive=True) as reopened:  # the worker's lock was released
        assert reopened.messages(chat.id)[0].text == "Name a fruit."
    host.deleteLater()
    assert threading.active_count() <= threads


SLOTS = {
    # slot: (the real method that raises, how the GUI asks, the outcome signal it must send)
    "load_model": ("save_if_changed", lambda h, c: h.load_model(None), "model_loaded"),
    "prefetch_chat": ("prefetch", lambda h, c: h.prefetch_chat(c), None),
    "prepare_chat": ("upkeep", lambda h, c: h.prepare_chat(c), "background_finished"),
    "edit_cost": ("edit_cost", lambda h, c: h.request_edit_cost(c, "Be kind.", {}, ""), None),
    "preview_trim": ("preview_trim", lambda h, c: h.request_trim_preview(c, 10, "exact"), None),
    "apply_trim": ("set_trim", lambda h, c: h.apply_trim(c, 10, "exact"), None),
    "refresh_cache_view": ("cache_view", lambda h, c: h.refresh_cache_view(c), None),
    "delete_chat": ("forget_chat", lambda h, c: h.delete_chat(c), None),
}


def test_every_worker_slot_reports_what_it_raised_and_the_worker_carries_on(
    qtbot, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads = threading.active_count()
    host = EngineHost(db_path, n_ctx=TEST_CTX)
    seen: dict[str, list[object]] = {}
    direct = Qt.ConnectionType.DirectConnection
    for name in ("error", "model_loaded", "background_finished", "reply_finished"):
        seen[name] = []
        getattr(host.worker, name).connect(seen[name].append, direct)
    host.load_model(None)
    qtbot.waitUntil(lambda: len(seen["model_loaded"]) == 1, timeout=TURN_TIMEOUT_MS)
    with Store(db_path) as store:
        chat = store.create_chat("slots")
        store.add_instruction_version(chat.id, "Answer briefly.")
    try:
        for slot, (method, ask, outcome) in SLOTS.items():
            errors, outcomes = len(seen["error"]), len(seen.get(outcome or "error"))
            with monkeypatch.context() as patch:
                patch.setattr(ChatSession, method, _raise(RuntimeError(f"{slot} broke")))
                ask(host, chat.id)
                qtbot.waitUntil(lambda n=errors: len(seen["error"]) > n, timeout=TURN_TIMEOUT_MS)
                if outcome is not None:  # the step's own outcome arrives as well
                    qtbot.waitUntil(
                        lambda o=outcome, n=outcomes: len(seen[o]) > n, timeout=TURN_TIMEOUT_MS
                    )
            assert f"{slot} broke" in str(seen["error"][-1]), slot
            assert "unexpected error: RuntimeError" in str(seen["error"][-1]), slot
        host.send(chat.id, "Name a fruit.", GenerationOptions(max_tokens=4, temperature=0.0))
        qtbot.waitUntil(lambda: len(seen["reply_finished"]) == 1, timeout=TURN_TIMEOUT_MS)
    finally:
        host.shutdown()
    assert host.engine_thread.isFinished()
    host.deleteLater()
    assert threading.active_count() <= threads


def test_cancel_on_the_load_progress_keeps_the_previous_model(qtbot, window: MainWindow) -> None:
    previous = window.model
    assert previous is not None
    worker = window.host.worker
    in_load = threading.Event()

    def hold_the_load(fraction: float) -> None:
        """Runs in the worker thread inside llama.cpp's progress callback: wait for Cancel."""
        if not in_load.is_set():
            in_load.set()
            window.host.load_cancel.wait(timeout=60)

    worker.load_progress.connect(hold_the_load, Qt.ConnectionType.DirectConnection)
    try:
        window.load_model(previous.path)
        qtbot.waitUntil(lambda: in_load.is_set() and window.cancel_load_button.isVisible())
        with qtbot.waitSignal(window.model_load_cancelled, timeout=TURN_TIMEOUT_MS):
            clicked = time.perf_counter()
            window.cancel_load_button.click()
        latency_ms = (time.perf_counter() - clicked) * 1000
    finally:
        worker.load_progress.disconnect(hold_the_load)
    print(f"\nCancel on the load progress → cancelled signal in the window: {latency_ms:.0f} ms")
    assert not window.progress.isVisible() and not window.cancel_load_button.isVisible()
    assert window.model == previous
    assert "cancelled" in window.statusBar().currentMessage().lower()
    outcome, _ = send_turn(qtbot, window, "Still there?")
    assert outcome.reply


def test_stop_during_a_long_prefill_stops_inside_the_batch(
    qtbot, db_path: Path, settings: QSettings
) -> None:
    window = open_window(qtbot, db_path, settings, n_ctx=4096)
    try:
        log = log_of(window)
        session = window.host.worker.session
        assert isinstance(session, ChatSession)
        text = long_text(session, 3000)  # tokenizing only; the worker is idle
        batches: list[float] = []
        window.host.worker.progress.connect(lambda *_: batches.append(time.perf_counter()))
        window.input.setPlainText(text)
        sent = time.perf_counter()
        window.send()
        qtbot.waitUntil(lambda: bool(batches), timeout=TURN_TIMEOUT_MS)
        first_batch_ms = (batches[0] - sent) * 1000
        qtbot.wait(int(first_batch_ms / 3))  # a third of the way into the second batch
        stopped = time.perf_counter()
        window.stop_button.click()
        qtbot.waitUntil(lambda: bool(log.replies), timeout=TURN_TIMEOUT_MS)
        latency_ms = (time.perf_counter() - stopped) * 1000
        print(f"\nStop during a prefill → reply in the window: {latency_ms:.0f} ms "
              f"(first 512-token batch {first_batch_ms:.0f} ms)")
        assert log.replies[-1].metrics.finish_reason == "cancelled"
        assert latency_ms < first_batch_ms / 2
        _assert_idle(window)
        engine = window.host.worker.session
        assert engine.backend.last_position() + 1 == len(engine.cache_tokens)
    finally:
        close_window(window)
