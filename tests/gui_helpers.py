"""Helpers for the GUI tests: windows on a temp DB and temp QSettings, real model, clean close.

Plain functions (not fixtures) so each test module states its own fixtures explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import QSettings, QTimer

from app.session.chat_session import TurnResult
from app.ui.app import create_application
from app.ui.main_window import MainWindow
from app.ui.worker import BackgroundOutcome

GUI_CTX = 2048
MODEL_TIMEOUT_MS = 120_000
TURN_TIMEOUT_MS = 180_000  # the CPU is shared with other test runs: be generous, never flaky


def temp_settings(folder: Path) -> QSettings:
    """QSettings in a file under tmp_path: tests never touch the user's settings."""
    return QSettings(str(folder / "kvchat-settings.ini"), QSettings.Format.IniFormat)


class SignalLog:
    """Every reply and background outcome of a window, so no emission is missed between waits."""

    def __init__(self, window: MainWindow) -> None:
        self.replies: list[TurnResult] = []
        self.backgrounds: list[BackgroundOutcome] = []
        window.reply_received.connect(self.replies.append)
        window.background_done.connect(self.backgrounds.append)


LOGS: dict[int, SignalLog] = {}


def log_of(window: MainWindow) -> SignalLog:
    return LOGS[id(window)]


def open_window(qtbot: Any, db_path: Path, settings: QSettings, **options: Any) -> MainWindow:
    """A shown window whose model has finished loading."""
    options.setdefault("n_ctx", GUI_CTX)
    create_application(settings=settings)  # the app's style and theme, as users see it
    window = MainWindow(db_path, settings=settings, **options)
    LOGS[id(window)] = SignalLog(window)
    with qtbot.waitSignal(window.model_ready, timeout=MODEL_TIMEOUT_MS):
        window.show()
    window.max_tokens_spin.setValue(12)
    window.temperature_spin.setValue(0.0)
    return window


def close_window(window: MainWindow) -> None:
    """Close and check that the worker thread quit and was joined."""
    window.close()
    LOGS.pop(id(window), None)
    assert window.host.engine_thread.isFinished(), "the engine thread must be joined at close"
    running = [timer.objectName() or repr(timer) for timer in window.findChildren(QTimer)
               if timer.isActive()]
    assert running == [], f"timers still running after close: {running}"


def send_turn(
    qtbot: Any, window: MainWindow, text: str, *, background: bool = True
) -> tuple[TurnResult, BackgroundOutcome | None]:
    """Type, send, wait for the reply and (by default) for commit + warm-up + save."""
    log = log_of(window)
    replies, backgrounds = len(log.replies), len(log.backgrounds)
    window.input.setPlainText(text)
    window.send()
    qtbot.waitUntil(lambda: len(log.replies) > replies, timeout=TURN_TIMEOUT_MS)
    outcome = log.replies[-1]
    finished: BackgroundOutcome | None = None
    if background:
        finished = wait_background(qtbot, window, outcome.metrics_id, backgrounds)
    return outcome, finished


def wait_background(
    qtbot: Any, window: MainWindow, metrics_id: int, seen: int = 0
) -> BackgroundOutcome:
    """Wait for the commit + warm-up + save of the turn whose metrics row is ``metrics_id``."""
    log = log_of(window)

    def found() -> BackgroundOutcome | None:
        return next((b for b in log.backgrounds[seen:] if b.metrics_id == metrics_id), None)

    qtbot.waitUntil(lambda: found() is not None, timeout=TURN_TIMEOUT_MS)
    result = found()
    assert result is not None
    return result


def open_new_chat(qtbot: Any, window: MainWindow) -> int:
    """File → New chat: the worker creates it; the window opens it when it is made."""
    made: list[int] = []
    window.new_chat(made.append)
    qtbot.waitUntil(lambda: bool(made), timeout=TURN_TIMEOUT_MS)
    assert window.current_chat_id == made[0]
    return made[0]


def settle(qtbot: Any, window: MainWindow) -> None:
    """Wait until the worker has written every change the window sent it."""
    qtbot.waitUntil(lambda: window.host.changes_in_flight == 0, timeout=TURN_TIMEOUT_MS)
