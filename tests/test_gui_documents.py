"""Documents in the window: dropped onto it, shown above the chat with their tokens,
answered from, refused in one line when they are not text, and detached.

Real window, real model (the embedded SmolLM2), real files and SQLite under tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gui_helpers import (
    TURN_TIMEOUT_MS,
    close_window,
    open_new_chat,
    open_window,
    send_turn,
    temp_settings,
)
from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QApplication, QToolButton

from app.ui.main_window import MainWindow

pytestmark = [pytest.mark.gui]
FACT = "The ferry to the north island leaves at 7:45 every morning from pier 9."


def _drop(window: MainWindow, path: Path) -> None:
    """A drop event with the file's URL, as a file manager sends it, handed to the window's
    filter (outside a real drag, Qt delivers the drag-enter but not the drop)."""
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path))])
    event = QDropEvent(
        QPointF(20, 20), Qt.DropAction.CopyAction, mime,
        Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier,
    )  # fmt: skip
    enter = QDragEnterEvent(
        QPoint(20, 20), Qt.DropAction.CopyAction, mime,
        Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier,
    )  # fmt: skip
    QApplication.sendEvent(window, enter)
    assert enter.isAccepted()
    assert window.documents.eventFilter(window, event)


def test_a_dropped_document_is_shown_answered_from_and_detached(
    qtbot, db_path: Path, tmp_path: Path
) -> None:
    window = open_window(qtbot, db_path, temp_settings(tmp_path))
    try:
        file_menu = window.menuBar().actions()[0].menu()
        assert "Attach document…" in [action.text() for action in file_menu.actions()]
        chat_id = open_new_chat(qtbot, window)
        binary = tmp_path / "photo.txt"
        binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" * 50)
        _drop(window, binary)
        assert window.last_error == "photo.txt is not a text file (it holds binary data)"
        document = tmp_path / "ferry.md"
        document.write_text(f"# Timetable\n\n{FACT}\n", encoding="utf-8")
        _drop(window, document)
        qtbot.waitUntil(lambda: len(window.store.documents(chat_id)) == 1, timeout=10_000)
        assert [d.name for d in window.store.documents(chat_id)] == ["ferry.md"]
        strip = window.documents.strip
        qtbot.waitUntil(
            lambda: any("tokens" in label.text() and "…" not in label.text()
                        for label in strip.labels.values()),
            timeout=TURN_TIMEOUT_MS,
        )  # fmt: skip
        assert strip.isVisible()

        strip.no_history.setChecked(True)
        qtbot.waitUntil(lambda: window.store.chat(chat_id).no_history == 1, timeout=10_000)
        first, _ = send_turn(qtbot, window, "When does the ferry leave?")
        second, _ = send_turn(qtbot, window, "When does the ferry leave?")
        assert first.metrics.document_tokens > 0
        assert second.metrics.prompt_tokens == first.metrics.prompt_tokens  # flat
        assert second.reply == first.reply
        assert "document" in window.inspector.legend_label.text()

        chip = strip.chips.itemAt(0).widget()
        chip.findChild(QToolButton).click()  # the chip's ×
        qtbot.waitUntil(lambda: window.store.documents(chat_id) == [], timeout=10_000)
        qtbot.waitUntil(lambda: not strip.labels, timeout=10_000)
    finally:
        close_window(window)
