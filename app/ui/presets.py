"""Instruction presets in the window: a library of blocks any chat can start from.

The dialog lists the presets, edits one (name, text with ``{{placeholders}}``, the values
they default to) and uses one in the chat on screen: a new instruction version holding
the preset's text and its values, filled now ({{date}} and {{weekday}} are today's unless
a value is given). Chats that use a preset with the same values render the same block,
so its tokens are the same in each. The window reads presets; the worker writes them.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from app.core.variables import BUILTIN_VARIABLES, MissingValue, fill_values, placeholder_names
from app.storage.presets import Preset, valid_preset_name
from app.ui.chat_actions import ChatActions
from app.ui.instruction_edits import InstructionEdits
from app.ui.window_base import WindowBase
from app.ui.window_part import WindowPart


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


class PresetsDialog(QDialog):
    """Pick, edit, save, delete and use instruction presets."""

    save_requested = Signal(str, str, object)  # name, text, default values
    delete_requested = Signal(int)  # preset id
    use_requested = Signal(int, object)  # preset id, the placeholders' values

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Instruction presets")
        self.resize(720, 460)
        self.presets: list[Preset] = []
        self.value_edits: dict[str, QLineEdit] = {}
        layout = QVBoxLayout(self)
        splitter = QSplitter(Qt.Orientation.Horizontal)
        library = QWidget()
        library_layout = QVBoxLayout(library)
        library_layout.setContentsMargins(0, 0, 0, 0)
        library_layout.addWidget(QLabel("Saved presets"))
        self.preset_list = QListWidget()
        self.preset_list.setObjectName("presetList")
        self.preset_list.currentRowChanged.connect(self._show_row)
        library_layout.addWidget(self.preset_list, 1)
        self.empty_hint = QLabel(
            "None yet: write a block (or start from the editor's), name it, Save preset."
        )
        self.empty_hint.setObjectName("hint")
        self.empty_hint.setWordWrap(True)
        library_layout.addWidget(self.empty_hint)
        splitter.addWidget(library)
        editor = QWidget()
        form = QVBoxLayout(editor)
        form.setContentsMargins(8, 0, 0, 0)
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("Preset name")
        form.addWidget(self.name_edit)
        self.text_edit = QPlainTextEdit()
        self.text_edit.setPlaceholderText(
            "Instruction text. {{name}} is filled when the preset is used;"
            " {{date}} and {{weekday}} are today's."
        )
        self.text_edit.textChanged.connect(self._update_values)
        form.addWidget(self.text_edit, 1)
        self.values_form = QFormLayout()
        form.addLayout(self.values_form)
        splitter.addWidget(editor)
        splitter.setSizes([200, 520])
        layout.addWidget(splitter, 1)
        self.problem = QLabel("")
        self.problem.setObjectName("problemLabel")
        self.problem.setWordWrap(True)
        layout.addWidget(self.problem)
        buttons = QHBoxLayout()
        self.new_button = QPushButton("New from the editor")
        self.new_button.setToolTip("Start a preset from the chat's instruction text")
        self.save_button = QPushButton("Save preset")
        self.delete_button = QPushButton("Delete")
        self.use_button = QPushButton("Use in this chat")
        self.use_button.setObjectName("primaryButton")
        self.use_button.setToolTip("A new instruction version of the chat on screen")
        for button in (self.new_button, self.save_button, self.delete_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(self.use_button)
        close = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        close.rejected.connect(self.reject)
        buttons.addWidget(close)
        layout.addLayout(buttons)
        self.save_button.clicked.connect(self._save)
        self.delete_button.clicked.connect(self._delete)
        self.use_button.clicked.connect(self._use)
        self._update_values()

    # -- what the dialog shows ----------------------------------------------------------

    def set_presets(self, presets: list[Preset], select: str | None = None) -> None:
        self.presets = presets
        self.preset_list.blockSignals(True)
        self.preset_list.clear()
        for preset in presets:
            item = QListWidgetItem(preset.name)
            item.setToolTip(preset.text[:500])
            self.preset_list.addItem(item)
        self.preset_list.blockSignals(False)
        names = [preset.name for preset in presets]
        if select in names:
            self.preset_list.setCurrentRow(names.index(select))
        self.empty_hint.setVisible(not presets)
        self._show_row(self.preset_list.currentRow())

    def selected(self) -> Preset | None:
        row = self.preset_list.currentRow()
        return self.presets[row] if 0 <= row < len(self.presets) else None

    def _show_row(self, _row: int) -> None:
        preset = self.selected()
        self.delete_button.setEnabled(preset is not None)
        self.use_button.setEnabled(preset is not None)
        if preset is not None:
            self.show_preset(preset.name, preset.text, preset.variables)

    def show_preset(self, name: str, text: str, values: dict[str, str]) -> None:
        self.name_edit.setText(name)
        self.text_edit.setPlainText(text)
        for key, edit in self.value_edits.items():
            edit.setText(values.get(key, ""))
        self.problem.setText("")

    def _update_values(self) -> None:
        """One field per placeholder of the text; built-ins say what they default to."""
        names = placeholder_names(self.text_edit.toPlainText())[:50]
        if names == list(self.value_edits):
            return
        kept = {key: edit.text() for key, edit in self.value_edits.items()}
        while self.values_form.rowCount():
            self.values_form.removeRow(0)
        self.value_edits = {}
        for name in names:
            edit = QLineEdit(kept.get(name, ""))
            if name in BUILTIN_VARIABLES:
                edit.setPlaceholderText("today's when used")
            self.values_form.addRow(f"{{{{{name}}}}}", edit)
            self.value_edits[name] = edit

    def values(self) -> dict[str, str]:
        return {key: edit.text() for key, edit in self.value_edits.items() if edit.text()}

    # -- requests -----------------------------------------------------------------------

    def _save(self) -> None:
        text = self.text_edit.toPlainText()
        try:
            name = valid_preset_name(self.name_edit.text())
        except ValueError as error:
            self.problem.setText(_sentence(str(error)))
            return
        if not text.strip():
            self.problem.setText("A preset needs some instruction text.")
            return
        self.problem.setText("")
        self.save_requested.emit(name, text, self.values())

    def _delete(self) -> None:
        preset = self.selected()
        if preset is not None:
            self.delete_requested.emit(preset.id)

    def _use(self) -> None:
        preset = self.selected()
        if preset is None:
            self.problem.setText("Pick a preset (or save this one) to use it.")
            return
        try:
            values = fill_values(preset.text, preset.variables, self.values())
        except MissingValue as error:
            self.problem.setText(_sentence(str(error)))
            return
        self.use_requested.emit(preset.id, values)


class PresetsController(WindowPart):
    """Opens the dialog from the instruction editor and sends its changes to the worker."""

    def __init__(
        self, window: WindowBase, chats: ChatActions, instruction_edits: InstructionEdits
    ) -> None:
        super().__init__(window)
        self.chats = chats
        self.instruction_edits = instruction_edits
        self.dialog: PresetsDialog | None = None
        window.instructions.presets_requested.connect(self.show_dialog)

    def show_dialog(self) -> PresetsDialog:
        if self.dialog is None:
            self.dialog = PresetsDialog(self.window)
            self.dialog.new_button.clicked.connect(self._from_editor)
            self.dialog.save_requested.connect(self._save)
            self.dialog.delete_requested.connect(self._delete)
            self.dialog.use_requested.connect(self._use)
        self.dialog.set_presets(self.window.store.presets())
        self.dialog.open()  # window-modal, and never blocks the event loop
        return self.dialog

    def _from_editor(self) -> None:
        editor = self.window.instructions
        if self.dialog is not None:
            self.dialog.preset_list.clearSelection()
            self.dialog.show_preset("", editor.text(), editor.variables())

    def _refresh(self, select: str | None = None) -> None:
        if self.dialog is not None and not self.closed:
            self.dialog.set_presets(self.window.store.presets(), select)

    def _save(self, name: str, text: str, values: dict[str, str]) -> None:
        self.window.host.change_store(
            "Save preset",
            lambda store: store.save_preset(name, text, values),
            lambda saved: self._refresh(name if saved is not None else None),
        )

    def _delete(self, preset_id: int) -> None:
        self.window.host.change_store(
            "Delete preset", lambda store: store.delete_preset(preset_id), lambda _: self._refresh()
        )

    def _use(self, preset_id: int, values: dict[str, str]) -> None:
        window = self.window

        def use(chat_id: int) -> None:
            window.host.change_store(
                "Use preset",
                lambda store: store.use_preset(chat_id, preset_id, values),
                lambda version: self.instruction_edits._on_instructions_saved(
                    chat_id, version, True
                ),
            )

        self.chats.with_chat(use)
        if self.dialog is not None:
            self.dialog.accept()
