"""Per-chat instruction block: text, variables, versions, layout, and what a change costs.

The cost matters because an edit is not free: with history-first only the block and
what follows it are recomputed; with system-first the whole history is. The window
asks the worker (session.edit_cost) after typing pauses and shows the answer. A layout
change is a preview until Apply, since applying it rebuilds the cache.
"""

from __future__ import annotations

import datetime as dt

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app.core.variables import placeholder_names
from app.storage.records import EvalRate, InstructionVersion

EDIT_COST_DEBOUNCE_MS = 350
LAYOUT_LABELS = {
    "history-first": "History first",
    "system-first": "System first",
}
LAYOUT_TIPS = {
    "history-first": "History, then the instruction block, then your message: an edit of"
    " the block recomputes only the block.",
    "system-first": "Instructions at the top, as most chat apps do: an edit of the block"
    " recomputes the whole history.",
}


MIN_PAGE_HEIGHT = 36


def _shorten(line: str, limit: int = 60) -> str:
    """Cut at a word boundary and say so with "…" (it was cut mid-word, with no sign)."""
    if len(line) <= limit:
        return line
    cut = line[: limit - 1].rsplit(" ", 1)[0] or line[: limit - 1]
    return cut.rstrip(" ,.;:") + "…"


def _unit(value: str, unit: str) -> str:
    """A figure and its unit that never wrap apart ("25 tok/ | s" did)."""
    no_break_slash = "\u2060/\u2060"  # word joiners around the slash
    return value + "\u00a0" + unit.replace("/", no_break_slash)


def describe_edit_cost(
    tokens: int,
    seconds: float | None,
    prefill_speed: float | None,
    *,
    text_changed: bool = True,
    layout_changed: bool = False,
) -> str:
    """One sentence: what the pending change would recompute, and when."""
    if not text_changed and not layout_changed:
        if tokens == 0:
            return "The cache holds this block: the next message pays only for itself."
        return f"{tokens} tokens to recompute; the idle-time warm-up will do it."
    what = "Applying this layout" if layout_changed and not text_changed else "This change"
    if tokens == 0:
        return f"{what} recomputes nothing: the cache already holds it."
    timing = "" if seconds is None else f", about {_unit(f'{seconds:.2f}', 's')}"
    speed = (
        f" at {_unit(f'{prefill_speed:.0f}', 'tok/s')}"
        if prefill_speed and seconds is not None
        else ""
    )
    when = " (in idle time, after Apply)" if layout_changed and not text_changed else ""
    return f"{what} recomputes {tokens} tokens{timing}{speed}{when}."


class VariablesTable(QTableWidget):
    """name → value rows of an instruction version; placeholders of the text come first."""

    edited = Signal()

    def __init__(self) -> None:
        super().__init__(0, 2)
        self.setObjectName("variablesTable")
        self.setHorizontalHeaderLabels(["Name", "Value"])
        self.verticalHeader().setVisible(False)
        header = self.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self._loading = False
        self.itemChanged.connect(self._on_item_changed)

    def set_variables(self, variables: dict[str, str], placeholders: list[str]) -> None:
        self._loading = True
        try:
            self.setRowCount(0)
            for name in [*placeholders, *(n for n in variables if n not in placeholders)]:
                self._append(name, variables.get(name, ""))
        finally:
            self._loading = False

    def add_placeholders(self, placeholders: list[str]) -> None:
        """Rows for placeholders typed in the text that have no row yet."""
        known = set(self.variables(include_empty=True))
        self._loading = True
        try:
            for name in placeholders:
                if name not in known:
                    self._append(name, "")
        finally:
            self._loading = False

    def add_row(self) -> None:
        self._append("", "")
        item = self.item(self.rowCount() - 1, 0)
        if item is not None:
            self.editItem(item)

    def remove_selected(self) -> None:
        rows = sorted({index.row() for index in self.selectedIndexes()}, reverse=True)
        for row in rows:
            self.removeRow(row)
        if rows:
            self.edited.emit()

    def variables(self, include_empty: bool = False) -> dict[str, str]:
        """The table as a dict: rows without a name are ignored, empty values kept only
        when asked (a placeholder with no value is left as typed in the block)."""
        result: dict[str, str] = {}
        for row in range(self.rowCount()):
            name_item, value_item = self.item(row, 0), self.item(row, 1)
            name = name_item.text().strip() if name_item else ""
            value = value_item.text() if value_item else ""
            if name and (value or include_empty):
                result[name] = value
        return result

    def _append(self, name: str, value: str) -> None:
        row = self.rowCount()
        self.insertRow(row)
        self.setItem(row, 0, QTableWidgetItem(name))
        self.setItem(row, 1, QTableWidgetItem(value))

    def _on_item_changed(self, _item: QTableWidgetItem) -> None:
        if not self._loading:
            self.edited.emit()


class InstructionEditor(QWidget):
    """Edits the current chat's block; saving creates a new version in the store."""

    text_edited = Signal()  # text, variables or the previewed layout changed (debounced)
    save_requested = Signal(str, object)  # text, variables
    layout_changed = Signal(str)  # Apply pressed
    presets_requested = Signal()  # Presets… pressed (app/ui/presets.py)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("instructionEditor")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(8, 8, 8, 8)
        layout.setSpacing(6)
        self._build_header(layout)
        self.tabs = QTabWidget()
        self.tabs.setObjectName("instructionTabs")
        self.editor = QPlainTextEdit()
        self.editor.setObjectName("instructionText")
        self.editor.setMinimumHeight(48)
        self.editor.setPlaceholderText(
            "Instructions for this chat (system prompt). Write {{name}} for a value set in"
            " the Variables tab."
        )
        self.tabs.addTab(self.editor, "Text")
        self.tabs.addTab(self._build_variables_page(), "Variables")
        self._build_versions_page()
        layout.addWidget(self.tabs, 1)
        self._build_draft_note()
        self._build_footer(layout)

        self._current: InstructionVersion | None = None
        self._chat_layout = "history-first"
        self._loading = False
        self.debounce = QTimer(self)
        self.debounce.setSingleShot(True)
        self.debounce.setInterval(EDIT_COST_DEBOUNCE_MS)
        self.debounce.timeout.connect(self.text_edited)
        self.editor.textChanged.connect(self._on_text_changed)
        self.variables_table.edited.connect(self._on_variables_changed)
        self.add_variable_button.clicked.connect(self.variables_table.add_row)
        self.remove_variable_button.clicked.connect(self.variables_table.remove_selected)
        self.save_button.clicked.connect(
            lambda: self.save_requested.emit(self.text(), self.variables())
        )
        self.revert_button.clicked.connect(self._revert)
        self.apply_layout_button.clicked.connect(
            lambda: self.layout_changed.emit(self.current_layout())
        )
        self.versions.itemClicked.connect(self._restore_item)
        self.layout_combo.currentIndexChanged.connect(self._on_layout_previewed)
        self._update_buttons()

    def _build_header(self, layout: QVBoxLayout) -> None:
        """Title, and the layout picker with its Apply button."""
        header = QHBoxLayout()
        title = QLabel("Instructions")
        title.setObjectName("panelTitle")
        header.addWidget(title)
        header.addStretch(1)
        header.addWidget(QLabel("Layout"))
        self.layout_combo = QComboBox()
        for key, label in LAYOUT_LABELS.items():
            self.layout_combo.addItem(label, key)
            self.layout_combo.setItemData(
                self.layout_combo.count() - 1, LAYOUT_TIPS[key], Qt.ItemDataRole.ToolTipRole
            )
        self.layout_combo.setToolTip(
            "Where the instruction block sits in the prompt. Picking one shows its cost;"
            " Apply makes it the chat's layout."
        )
        header.addWidget(self.layout_combo)
        self.apply_layout_button = QPushButton("Apply")
        self.apply_layout_button.setToolTip("Use this layout for the chat (rebuilds the cache)")
        header.addWidget(self.apply_layout_button)
        layout.addLayout(header)

    def _build_variables_page(self) -> QWidget:
        """The Variables tab: the {{name}} values, with Add and Remove."""
        variables_page = QWidget()
        variables_layout = QVBoxLayout(variables_page)
        variables_layout.setContentsMargins(4, 4, 4, 4)
        variables_layout.setSpacing(4)
        self.variables_table = VariablesTable()
        # Small minimums for every page: the tabs' minimum is the largest page's, and on a
        # 640 px screen the cache inspector (its phases) needs the height more.
        self.variables_table.setMinimumHeight(MIN_PAGE_HEIGHT)
        variables_layout.addWidget(self.variables_table, 1)
        variable_buttons = QHBoxLayout()
        hint = QLabel("{{name}} in the text is replaced; other rows are listed after it.")
        hint.setObjectName("hint")
        hint.setWordWrap(True)
        variable_buttons.addWidget(hint, 1)
        self.add_variable_button = QPushButton("Add")
        self.remove_variable_button = QPushButton("Remove")
        variable_buttons.addWidget(self.add_variable_button)
        variable_buttons.addWidget(self.remove_variable_button)
        variables_layout.addLayout(variable_buttons)
        return variables_page

    def _build_versions_page(self) -> None:
        """The Versions tab: saved versions, one click puts one back into the editor."""
        self.versions = QListWidget()
        self.versions.setObjectName("versionList")
        self.versions.setMinimumHeight(MIN_PAGE_HEIGHT)
        self.versions.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.versions.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.versions.setToolTip("Click a version to put it back into the editor")
        self.tabs.addTab(self.versions, "Versions")

    def _build_draft_note(self) -> None:
        self.draft_label = QLabel("Draft: Send saves it ")
        self.draft_label.setToolTip(
            "Unsaved instructions: Send saves them as a version and uses them. Switching"
            " chats or quitting keeps the draft (unused) for next time."
        )
        self.draft_label.setObjectName("draftNote")
        self.draft_label.hide()
        # Beside the tabs: it costs no height on a 640 px screen.
        self.tabs.setCornerWidget(self.draft_label, Qt.Corner.TopRightCorner)

    def _build_footer(self, layout: QVBoxLayout) -> None:
        """What an edit would cost the cache, Revert and Save version."""
        footer = QHBoxLayout()
        self.cost_label = QLabel("")
        self.cost_label.setObjectName("costLabel")
        self.cost_label.setWordWrap(True)
        footer.addWidget(self.cost_label, 1)
        self.revert_button = QPushButton("Revert")
        self.revert_button.setToolTip("Put the current saved version back into the editor")
        self.save_button = QPushButton("Save version")
        self.save_button.setObjectName("primaryButton")
        self.presets_button = QPushButton("Presets…")
        self.presets_button.setToolTip("Start from a saved instruction block, or save this one")
        self.presets_button.clicked.connect(self.presets_requested)
        footer.addWidget(self.presets_button)
        footer.addWidget(self.revert_button)
        footer.addWidget(self.save_button)
        layout.addLayout(footer)

    # -- state ----------------------------------------------------------------------

    def text(self) -> str:
        return self.editor.toPlainText()

    def variables(self) -> dict[str, str]:
        return self.variables_table.variables()

    def current_layout(self) -> str:
        """The layout shown in the combo (a preview until applied)."""
        return str(self.layout_combo.currentData())

    def chat_layout(self) -> str:
        return self._chat_layout

    def current_version(self) -> InstructionVersion | None:
        return self._current

    def is_modified(self) -> bool:
        saved_text = self._current.text if self._current else ""
        saved_variables = self._current.variables if self._current else {}
        return self.text() != saved_text or self.variables() != dict(saved_variables)

    def show_eval_rates(self, rates: dict[str, EvalRate]) -> None:
        """Next to each layout, the loaded model's last measured instruction-following rate
        (``python -m app eval`` / Benchmark › Answer quality); none: the plain labels."""
        for index in range(self.layout_combo.count()):
            key = str(self.layout_combo.itemData(index))
            label, tip = LAYOUT_LABELS[key], LAYOUT_TIPS[key]
            rate = rates.get(key)
            if rate is not None and rate.rate is not None:
                label += f" · {rate.rate:.0%} followed"
                tip += (
                    f"\n\nLast eval on this model: {rate.followed}/{rate.cases} cases followed"
                    f" their instructions at turn {rate.turns} (95% interval"
                    f" {rate.ci_low:.0%}–{rate.ci_high:.0%})"
                    + (f"; recall {rate.recall:.0%}" if rate.recall is not None else "")
                )
                other = rates.get("history-first-no-commit")
                if key == "history-first" and other is not None and other.rate is not None:
                    tip += f"; without the commit step: {other.rate:.0%}"
                tip += "."
            self.layout_combo.setItemText(index, label)
            self.layout_combo.setItemData(index, tip, Qt.ItemDataRole.ToolTipRole)

    def layout_pending(self) -> bool:
        return self.current_layout() != self._chat_layout

    def load(self, versions: list[InstructionVersion], layout: str) -> None:
        """Show a chat's versions and put its current one in the editor."""
        self._loading = True
        try:
            self._current = versions[-1] if versions else None
            self._chat_layout = layout
            self.versions.clear()
            for version in reversed(versions):
                when = dt.datetime.fromtimestamp(version.created_at).strftime("%d %b %H:%M")
                first_line = (
                    version.text.strip().splitlines()[0] if version.text.strip() else "(empty)"
                )
                item = QListWidgetItem(f"v{version.version} · {when}\n{_shorten(first_line)}")
                item.setData(Qt.ItemDataRole.UserRole, version.version)
                item.setData(Qt.ItemDataRole.UserRole + 1, version.text)
                item.setData(Qt.ItemDataRole.UserRole + 2, dict(version.variables))
                item.setToolTip(version.text[:500])
                self.versions.addItem(item)
            text = self._current.text if self._current else ""
            self.editor.setPlainText(text)
            variables = dict(self._current.variables) if self._current else {}
            self.variables_table.set_variables(variables, placeholder_names(text))
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
        text = str(item.data(Qt.ItemDataRole.UserRole + 1))
        self.editor.setPlainText(text)
        variables = item.data(Qt.ItemDataRole.UserRole + 2) or {}
        self.variables_table.set_variables(dict(variables), placeholder_names(text))
        self.tabs.setCurrentIndex(0)
        self._on_variables_changed()

    def _revert(self) -> None:
        self._loading = True
        try:
            text = self._current.text if self._current else ""
            self.editor.setPlainText(text)
            variables = dict(self._current.variables) if self._current else {}
            self.variables_table.set_variables(variables, placeholder_names(text))
            self.layout_combo.setCurrentIndex(max(self.layout_combo.findData(self._chat_layout), 0))
        finally:
            self._loading = False
        self._update_buttons()
        self._measure()

    def _on_text_changed(self) -> None:
        if not self._loading:
            self.variables_table.add_placeholders(placeholder_names(self.text()))
        self._changed()

    def _on_variables_changed(self) -> None:
        self._changed()

    def _on_layout_previewed(self, _index: int) -> None:
        self._changed()

    def _changed(self) -> None:
        self._update_buttons()
        if not self._loading:
            self._measure()

    def _measure(self) -> None:
        self.cost_label.setText("Measuring what this costs…")
        self.debounce.start()

    def set_draft(self, text: str, variables: dict[str, str]) -> None:
        """Put back an unsaved draft (kept when the chat was left or the app closed)."""
        self.editor.setPlainText(text)
        self.variables_table.set_variables(dict(variables), placeholder_names(text))
        self._changed()

    def _update_buttons(self) -> None:
        modified = self.is_modified()
        self.draft_label.setVisible(modified)
        self.tabs.setTabText(0, "Text (draft)" if modified else "Text")
        self.save_button.setEnabled(modified)
        self.revert_button.setEnabled(modified or self.layout_pending())
        self.apply_layout_button.setVisible(self.layout_pending())
        count = len(self.variables())
        self.tabs.setTabText(1, f"Variables ({count})" if count else "Variables")
