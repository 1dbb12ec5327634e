"""The Benchmark window: a tiny real run end to end, export, Stop, and a joined thread at close."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from PySide6.QtCore import QTimer

from app.bench.config import STRATEGIES, BenchConfig
from app.ui.bench_window import CSV_FIELDS, BenchWindow

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
