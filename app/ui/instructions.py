"""Per-chat instruction block: editor, version history, layout switch, edit-cost preview.

The preview matters because an edit is not free: with history-first only the block
and what follows it are recomputed; with system-first the whole history is. The
window asks the worker (engine.edit_cost) after typing pauses and shows the answer.
"""

from __future__ import annotations

import datetime as dt

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from app.storage.records import InstructionVersion

EDIT_COST_DEBOUNCE_MS = 350
LAYOUT_LABELS = {
    "history-first": "History first (edits recompute little)",
    "system-first": "System first (edits recompute the history)",
}


def describe_edit_cost(tokens: int, seconds: float | None, prefill_speed: float | None) -> str:
    """One sentence: what sending with this block would recompute on the critical path."""
    if tokens == 0:
        return "No recompute: the cache already holds this block."
    if seconds is None:
        return f"This change recomputes {tokens} tokens (speed not measured yet)."
    speed = f" at {prefill_speed:.0f} tok/s" if prefill_speed else ""
    return f"This change recomputes {tokens} tokens, about {seconds:.2f} s{speed}."


class InstructionEditor(QWidget):
    """Edits the current chat's block; saving creates a new version in the store."""

    text_edited = Signal()
    save_requested = Signal(str)
    layout_changed = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("instructionEditor")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(8, 8, 8, 8)
        layout.setSpacing(6)
        header = QHBoxLayout()
        title = QLabel("Instructions")
        title.setObjectName("panelTitle")
        header.addWidget(title)
        header.addStretch(1)
        header.addWidget(QLabel("Layout"))
        self.layout_combo = QComboBox()
        for key, label in LAYOUT_LABELS.items():
            self.layout_combo.addItem(label, key)
        self.layout_combo.setToolTip(
            "Where the instruction block sits in the prompt. History-first keeps the history"
            " at the start of the cache so editing the block recomputes only the block."
        )
        header.addWidget(self.layout_combo)
        layout.addLayout(header)

        splitter = QSplitter(Qt.Orientation.Horizontal)
        self.editor = QPlainTextEdit()
        self.editor.setObjectName("instructionText")
        self.editor.setPlaceholderText(
            "Instructions for this chat (system prompt). {{name}} placeholders are filled"
            " from the version's variables."
        )
        splitter.addWidget(self.editor)
        versions_box = QWidget()
        versions_layout = QVBoxLayout(versions_box)
        versions_layout.setContentsMargins(0, 0, 0, 0)
        versions_layout.setSpacing(2)
        versions_label = QLabel("Versions")
        versions_label.setObjectName("subTitle")
        versions_layout.addWidget(versions_label)
        self.versions = QListWidget()
        self.versions.setObjectName("versionList")
        self.versions.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.versions.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.versions.setMinimumWidth(150)
        self.versions.setToolTip("Click a version to restore it into the editor")
        versions_layout.addWidget(self.versions)
        splitter.addWidget(versions_box)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([340, 190])
        layout.addWidget(splitter, 1)

        self.cost_label = QLabel("")
        self.cost_label.setObjectName("costLabel")
        self.cost_label.setWordWrap(True)
        layout.addWidget(self.cost_label)
        footer = QHBoxLayout()
        footer.addStretch(1)
        self.revert_button = QPushButton("Revert")
        self.revert_button.setToolTip("Put the current saved version back into the editor")
        self.save_button = QPushButton("Save version")
        self.save_button.setObjectName("primaryButton")
        footer.addWidget(self.revert_button)
        footer.addWidget(self.save_button)
        layout.addLayout(footer)

        self._current: InstructionVersion | None = None
        self._loading = False
        self.debounce = QTimer(self)
        self.debounce.setSingleShot(True)
        self.debounce.setInterval(EDIT_COST_DEBOUNCE_MS)
        self.debounce.timeout.connect(self.text_edited)
        self.editor.textChanged.connect(self._on_text_changed)
        self.save_button.clicked.connect(lambda: self.save_requested.emit(self.text()))
        self.revert_button.clicked.connect(self._revert)
        self.versions.itemClicked.connect(self._restore_item)
        self.layout_combo.currentIndexChanged.connect(self._on_layout_changed)
        self._update_buttons()

    # -- state ----------------------------------------------------------------------

    def text(self) -> str:
        return self.editor.toPlainText()

    def current_layout(self) -> str:
        return str(self.layout_combo.currentData())

    def current_version(self) -> InstructionVersion | None:
        return self._current

    def is_modified(self) -> bool:
        saved = self._current.text if self._current else ""
        return self.text() != saved

    def load(self, versions: list[InstructionVersion], layout: str) -> None:
        """Show a chat's versions and put its current one in the editor."""
        self._loading = True
        try:
            self._current = versions[-1] if versions else None
            self.versions.clear()
            for version in reversed(versions):
                when = dt.datetime.fromtimestamp(version.created_at).strftime("%d %b %H:%M")
                first_line = (
                    version.text.strip().splitlines()[0] if version.text.strip() else "(empty)"
                )
                item = QListWidgetItem(f"v{version.version} · {when}\n{first_line[:60]}")
                item.setData(Qt.ItemDataRole.UserRole, version.version)
                item.setData(Qt.ItemDataRole.UserRole + 1, version.text)
                item.setToolTip(version.text[:500])
                self.versions.addItem(item)
            self.editor.setPlainText(self._current.text if self._current else "")
            index = self.layout_combo.findData(layout)
            self.layout_combo.setCurrentIndex(max(index, 0))
            self.cost_label.setText("")
        finally:
            self._loading = False
        self._update_buttons()

    def restore_version(self, version: int) -> None:
        """Put an old version's text into the editor (saving makes it the newest version)."""
        for row in range(self.versions.count()):
            item = self.versions.item(row)
            if item.data(Qt.ItemDataRole.UserRole) == version:
                self._restore_item(item)
                return

    def show_cost(self, text: str) -> None:
        self.cost_label.setText(text)

    # -- events ---------------------------------------------------------------------

    def _restore_item(self, item: QListWidgetItem) -> None:
        self.editor.setPlainText(str(item.data(Qt.ItemDataRole.UserRole + 1)))

    def _revert(self) -> None:
        self.editor.setPlainText(self._current.text if self._current else "")

    def _on_text_changed(self) -> None:
        self._update_buttons()
        if not self._loading:
            self.cost_label.setText("Measuring the cost of this change…")
            self.debounce.start()

    def _on_layout_changed(self, _index: int) -> None:
        if not self._loading:
            self.layout_changed.emit(self.current_layout())

    def _update_buttons(self) -> None:
        modified = self.is_modified()
        self.save_button.setEnabled(modified)
        self.revert_button.setEnabled(modified)
