"""Texts and small dialogs: About, where chats are stored."""

from __future__ import annotations

import html
from pathlib import Path

from PySide6 import __version__ as pyside_version
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFrame,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

import app
from app.core.models import DEFAULT_MODEL_FILE, DEFAULT_MODEL_LICENSE


def about_html(
    *, model_description: str | None, model_path: str | None, backend_version: str | None
) -> str:
    """Versions and licences, for the About box (kept as a function so tests can read it)."""
    rows = [
        ("KV Chat", app.__version__),
        ("llama-cpp-python", backend_version or "not loaded yet"),
        ("PySide6", pyside_version),
        ("Model", model_description or "not loaded yet"),
    ]
    if model_path:
        rows.append(("Model file", model_path))
    table = "".join(
        f"<tr><td><b>{html.escape(name)}</b>&nbsp;&nbsp;</td><td>{html.escape(value)}</td></tr>"
        for name, value in rows
    )
    return (
        "<h3>KV Chat</h3>"
        "<p>A chat for local language models that shows and reuses the KV cache.</p>"
        f"<table>{table}</table>"
        f"<p>The default model, {html.escape(DEFAULT_MODEL_FILE)} (SmolLM2-135M-Instruct by"
        f" Hugging Face), is licensed under the {DEFAULT_MODEL_LICENSE} licence."
        " KV Chat itself is MIT licensed.</p>"
    )


def accept_buttons(dialog: QDialog, ok_text: str) -> QDialogButtonBox:
    """OK (named for what it does) and Cancel, wired to the dialog's accept and reject."""
    buttons = QDialogButtonBox(
        QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel
    )
    buttons.button(QDialogButtonBox.StandardButton.Ok).setText(ok_text)
    buttons.accepted.connect(dialog.accept)
    buttons.rejected.connect(dialog.reject)
    return buttons


def hint_label(text: str) -> QLabel:
    """A wrapped note in the style sheet's muted ``hint`` look."""
    label = QLabel(text)
    label.setObjectName("hint")
    label.setWordWrap(True)
    return label


def start_stop_column() -> tuple[QPushButton, QPushButton, QVBoxLayout]:
    """Start and Stop (disabled until a run starts) in a column: the benchmark's tabs."""
    start, stop = QPushButton("Start"), QPushButton("Stop")
    stop.setEnabled(False)
    column = QVBoxLayout()
    column.addWidget(start)
    column.addWidget(stop)
    column.addStretch(1)
    return start, stop, column


def storage_note(db_path: Path) -> str:
    return (
        f"Your chats, instruction versions and saved caches are stored on this computer in"
        f" <b>{html.escape(str(db_path))}</b>. Nothing is sent anywhere."
    )


class InfoBanner(QFrame):
    """A dismissible note at the top of the chat (used once, on the first run)."""

    dismissed = Signal()

    def __init__(self, text: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("infoBanner")
        layout = QHBoxLayout(self)
        layout.setContentsMargins(10, 6, 6, 6)
        self.label = QLabel(text)
        self.label.setWordWrap(True)
        self.label.setTextFormat(Qt.TextFormat.RichText)
        # A long data path must not set the window's minimum width: the label may cut it.
        self.label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.label.setMinimumWidth(160)
        layout.addWidget(self.label, 1)
        button = QPushButton("Got it")
        button.clicked.connect(self._dismiss)
        layout.addWidget(button)

    def _dismiss(self) -> None:
        self.hide()
        self.dismissed.emit()
