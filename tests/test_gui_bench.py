"""The Benchmark window: a tiny real run end to end, export, Stop, and a joined thread at close."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from PySide6.QtCore import QTimer

from app.bench.config import STRATEGIES, BenchConfig
from app.ui.bench_window import CSV_FIELDS, WINDOW_SIZES, BenchWindow, eta_text
from app.ui.worker import default_thread_count

RUN_TIMEOUT_MS = 300_000  # five engines on a shared CPU: generous, never flaky
TINY = dict(
    history_tokens=160, instruction_tokens=40, message_tokens=16, turns=2, max_tokens=3,
    n_ctx=1024, n_threads=1,
)


def _window(qtbot: Any, **sizes: Any) -> BenchWindow:
    window = BenchWindow(BenchConfig(**{**TINY, **sizes}))
    qtbot.addWidget(window)
    window.show()
    return window


def _close(window: BenchWindow) -> None:
    """Close and check that no benchmark thread or timer outlives the window."""
    thread = window._thread
    window.close()
    assert window._thread is None
    assert thread is None or thread.isFinished()
    running = [t.objectName() or repr(t) for t in window.findChildren(QTimer) if t.isActive()]
    assert running == []


def test_tiny_run_plots_tabulates_and_exports(qtbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    window = _window(qtbot)
    assert window.config().turns == 2 and window.config().history_tokens == 160
    with qtbot.waitSignal(window.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        window.start_button.click()
        assert window.plot_stack.currentWidget() is window.plot_widget
        assert window.is_running() and not window.start_button.isEnabled()
    report = blocker.args[0]
    assert report is not None and not report.cancelled, window.last_error
    assert not window.is_running() and window.start_button.isEnabled()

    assert set(window.curves) == set(STRATEGIES)
    for name, curve in window.curves.items():
        xs, _ys = curve.getData()
        assert xs is not None and len(xs) == TINY["turns"], name
    assert window.table_strategies() == list(STRATEGIES)
    assert window.table.item(0, 3).text() == "1.0×"  # naive vs itself
    assert "Done" in window.status_label.text()

    png = window.export_png(tmp_path / "bench.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(window.export_csv(tmp_path / "bench.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_FIELDS
    assert len(rows) - 1 == len(STRATEGIES) * TINY["turns"]
    assert {row[0] for row in rows[1:]} == set(STRATEGIES)

    shot = os.environ.get("KVCHAT_BENCH_SHOT")  # docs screenshot, on request only
    image = window.grab()
    assert not image.isNull()
    if shot:
        image.save(shot)
    _close(window)


def test_stop_cancels_and_close_joins_the_thread(qtbot) -> None:  # type: ignore[no-untyped-def]
    window = _window(qtbot, turns=3, strategies=("naive", "history-first-warm"))
    with qtbot.waitSignal(window.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        window.start()
        window.stop()
        assert not window.stop_button.isEnabled()
    report = blocker.args[0]
    assert report is not None and report.cancelled, window.last_error
    assert len(report.samples) < 3 * 2
    assert "Stopped" in window.status_label.text()
    assert not window.is_running()
    _close(window)


def test_close_during_a_run_cancels_and_joins(qtbot) -> None:  # type: ignore[no-untyped-def]
    window = _window(qtbot, strategies=("naive", "history-first-warm"))
    window.start()
    thread = window._thread
    assert thread is not None
    qtbot.wait(50)
    _close(window)
    assert thread.isFinished()


def test_window_defaults_are_light_and_use_the_chat_worker_threads(qtbot) -> None:  # type: ignore[no-untyped-def]
    window = BenchWindow(model_path=None)
    qtbot.addWidget(window)
    window.show()
    config = window.config()
    for name, value in WINDOW_SIZES.items():
        assert getattr(config, name) == value, name
    assert config.n_threads == default_thread_count()
    # Before a run: a sentence about what Start does, not empty axes and an empty legend.
    assert window.plot_stack.currentWidget() is window.empty_label
    assert f"{config.turns} measured turns" in window.empty_label.text()
    window.turns_spin.setValue(5)
    assert "5 measured turns" in window.empty_label.text()
    _close(window)


def test_eta_follows_the_pace_so_far() -> None:
    assert eta_text(0, 10, 0.0) == ""
    assert eta_text(2, 10, 4.0) == "about 16 s left"
    assert eta_text(1, 100, 10.0) == "about 16 min left"
    assert eta_text(10, 10, 20.0) == ""
