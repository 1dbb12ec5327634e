"""``python -m app bench --gui-stall``: how long the window's event loop is blocked.

The window never waits for the model, so a long prefill, the state save of a large cache
and a streaming reply should each block the GUI thread only briefly (goal: at most 50 ms,
three frames). This opens the real window on a temporary database, runs the three, and
measures the longest gap between ticks of a 5 ms timer during each. The suite's test
keeps a loose bound (a blocking call shows as hundreds of ms); the goal itself is for a
quiet machine, with this command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QEventLoop, QObject, QSettings, QTimer

if TYPE_CHECKING:  # the window's signals carry these; the worker is imported lazily
    from app.session.engine import TurnResult
    from app.ui.worker import BackgroundOutcome, ModelStatus

GOAL_MS = 50.0
TICK_MS = 5
TIMEOUT_S = 600.0
LONG_MESSAGE = " ".join(
    f"Paragraph {n}: the keeper climbed the stairs, trimmed the wick and watched the sea."
    for n in range(80)
)  # about 1,600 tokens


@dataclass(frozen=True)
class StallFigures:
    """The longest event-loop stall (ms) in each phase, and what the phase did."""

    prefill_ms: float
    prefill_tokens: int
    save_ms: float
    saved_bytes: int
    streaming_ms: float
    streamed_tokens: int

    def worst_ms(self) -> float:
        return max(self.prefill_ms, self.save_ms, self.streaming_ms)

    def describe(self) -> str:
        return (
            f"event-loop stall: prefill of {self.prefill_tokens} tokens {self.prefill_ms:.1f} ms;"
            f" state save of {self.saved_bytes / 1e6:.1f} MB {self.save_ms:.1f} ms;"
            f" streaming of {self.streamed_tokens} tokens {self.streaming_ms:.1f} ms"
            f" (goal <= {GOAL_MS:.0f} ms)"
        )


class StallMeter(QObject):
    """Longest gap between ticks of a 5 ms timer: how long the GUI event loop was blocked."""

    def __init__(self) -> None:
        super().__init__()
        self.timer = QTimer(self)
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self._tick)
        self.longest_ms = 0.0
        self._last: float | None = None

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.longest_ms = max(self.longest_ms, (now - self._last) * 1000)
        self._last = now

    def measure(self, start: Callable[[], None], done: Callable[[], bool]) -> float:
        """Call ``start``, run the event loop until ``done()``, return the longest stall."""
        self.longest_ms, self._last = 0.0, None
        self.timer.start()
        try:
            start()
            run_until(done, "the window's answer")
        finally:
            self.timer.stop()
        return self.longest_ms


def run_until(condition: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S) -> None:
    """Run the Qt event loop (not a busy loop: the worker needs the CPU) until it holds."""
    if condition():
        return
    loop = QEventLoop()
    poll = QTimer()
    poll.setInterval(10)
    poll.timeout.connect(lambda: loop.quit() if condition() else None)
    deadline = QTimer()
    deadline.setSingleShot(True)
    deadline.timeout.connect(loop.quit)
    poll.start()
    deadline.start(int(timeout_s * 1000))
    loop.exec()
    poll.stop()
    deadline.stop()
    if not condition():
        raise TimeoutError(f"timed out waiting for {what}")


def measure_gui_stall(
    db_path: Path, settings: QSettings, *, model_path: str | None = None, n_ctx: int = 4096
) -> StallFigures:
    """Open the window, then prefill, save and stream while timing the event loop."""
    from app.ui.main_window import MainWindow  # the window pulls in the worker

    window = MainWindow(db_path, settings=settings, model_path=model_path, n_ctx=n_ctx)
    replies: list[TurnResult] = []
    backgrounds: list[BackgroundOutcome] = []
    loaded: list[ModelStatus | str] = []  # a status, or the load error's text
    window.model_ready.connect(loaded.append)
    window.model_error.connect(loaded.append)
    window.reply_received.connect(replies.append)
    window.background_done.connect(backgrounds.append)
    meter = StallMeter()
    try:
        window.show()
        run_until(lambda: bool(loaded), "the model")
        if window.model is None:
            raise RuntimeError(f"the model did not load: {loaded[0]}")
        window.max_tokens_spin.setValue(1)  # one reply token: almost all of it is prefill
        window.temperature_spin.setValue(0.0)
        window.input.setPlainText(LONG_MESSAGE)
        prefill_ms = meter.measure(window.send, lambda: len(replies) == 1)
        first = replies[-1]
        save_ms = meter.measure(
            lambda: None, lambda: any(b.metrics_id == first.metrics_id for b in backgrounds)
        )
        saved = window.store.metrics(first.chat_id)[-1].data.get("state_bytes") or 0
        window.max_tokens_spin.setValue(128)
        window.temperature_spin.setValue(0.8)
        window.input.setPlainText("Now tell the whole story again, in detail.")
        streaming_ms = meter.measure(window.send, lambda: len(replies) == 2)
    finally:
        window.close()
    return StallFigures(
        prefill_ms=prefill_ms,
        prefill_tokens=first.metrics.prefill_tokens,
        save_ms=save_ms,
        saved_bytes=int(saved),
        streaming_ms=streaming_ms,
        streamed_tokens=replies[-1].metrics.decode_tokens,
    )


def run_gui_stall(args: argparse.Namespace) -> int:
    """The command: figures on stdout (one line, or JSON), exit 1 above the goal."""
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from app.ui.app import create_application

    with tempfile.TemporaryDirectory(prefix="kvchat-stall-") as folder:
        settings = QSettings(str(Path(folder) / "settings.ini"), QSettings.Format.IniFormat)
        settings.setValue("first_run/storage_note_shown", True)
        create_application([sys.argv[0]], settings=settings)
        figures = measure_gui_stall(
            Path(folder) / "chats.db",
            settings,
            model_path=getattr(args, "model", None),
            n_ctx=getattr(args, "n_ctx", None) or 4096,
        )
    if getattr(args, "json", False):
        print(json.dumps({**asdict(figures), "goal_ms": GOAL_MS}))
    else:
        print(figures.describe())
    return 0 if figures.worst_ms() <= GOAL_MS else 1
