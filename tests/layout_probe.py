"""Run by tests/test_gui_layout.py in a child process on a screen of a given size.

Opens the main window as a first-time user would (no saved geometry), answers one turn
with the real model, opens the Benchmark window, and prints one JSON object saying where
everything landed relative to the screen's available geometry.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PySide6.QtCore import QEventLoop, QRect, QSettings
from PySide6.QtWidgets import QApplication, QWidget

from app.ui.app import create_application
from app.ui.main_window import MainWindow


def pump(condition, timeout_s: float = 180.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the window did not answer in time")
        QApplication.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
        time.sleep(0.01)


def on_screen(widget: QWidget, screen: QRect) -> bool:
    """The widget is shown and its whole rectangle lies within the screen's free area."""
    top_left = widget.mapToGlobal(widget.rect().topLeft())
    rect = QRect(top_left, widget.size())
    return widget.isVisible() and screen.contains(rect)


def main() -> int:
    create_application([sys.argv[0]])
    folder = Path(tempfile.mkdtemp(prefix="kvchat-layout-"))
    settings = QSettings(str(folder / "settings.ini"), QSettings.Format.IniFormat)
    window = MainWindow(folder / "chats.db", settings=settings, n_ctx=2048)
    window.show()
    ready: list[object] = []
    window.model_ready.connect(ready.append)
    pump(lambda: bool(ready))
    replies: list[object] = []
    window.reply_received.connect(replies.append)
    window.max_tokens_spin.setValue(12)
    window.temperature_spin.setValue(0.0)
    window.input.setPlainText("Name a fruit.")
    window.send()
    pump(lambda: bool(replies))
    QApplication.processEvents()
    available = window.screen().availableGeometry()
    window.inspector.tabs.setCurrentIndex(1)  # Phases
    QApplication.processEvents()
    table = window.inspector.phase_table
    viewport = table.viewport().rect()
    phase_rows = sum(
        viewport.contains(table.visualRect(table.model().index(row, 0)))
        for row in range(table.rowCount())
    )
    bench = window.show_benchmark()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        QApplication.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 20)
    report = {
        "platform": QApplication.platformName(),
        "screen": [available.width(), available.height()],
        "window": list(window.frameGeometry().getRect()),
        "window_fits": available.contains(window.frameGeometry()),
        "send_on_screen": on_screen(window.send_button, available),
        "input_on_screen": on_screen(window.input, available),
        "status_bar_on_screen": on_screen(window.statusBar(), available),
        "status": window.turn_status.text(),
        "status_elided": window.turn_status.is_elided(),
        "phase_rows": [phase_rows, table.rowCount()],
        "bench": list(bench.frameGeometry().getRect()),
        "bench_fits": available.contains(bench.frameGeometry()),
        "bench_table_on_screen": on_screen(bench.table, available),
        "bench_export_on_screen": on_screen(bench.export_csv_button, available),
    }
    bench.close()
    window.close()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
