"""Model → Chat template…: which chat template writes the loaded model's prompts.

A GGUF without a usable template would otherwise be prompted in ChatML, which a model
trained on another format (Gemma's ``<start_of_turn>``, Llama 3's headers) follows
badly. The dialog offers the GGUF's own template (when it has one), every chat format
llama.cpp writes itself, and a Jinja file. The choice is kept for the model file.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.domain import TemplateChoice, TemplateKind
from app.session.engine import TemplateInfo
from app.ui.dialogs import accept_buttons, hint_label

OWN = "own"
FILE = "file"


class ChatTemplateDialog(QDialog):
    """Picks a template; accepted means: use :meth:`choice` for the model from now on.

    ``info`` is the engine's :class:`TemplateInfo` for the loaded model.
    """

    def __init__(self, info: TemplateInfo, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.info = info
        self.setWindowTitle("Chat template")
        self._file_choice: TemplateChoice | None = None
        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.combo = QComboBox()
        own = (
            "The model's own template"
            if info.model_has_template
            else "None in the model file: ChatML"
        )
        self.combo.addItem(own, OWN)
        suggested = info.suggested
        for name in info.builtin_names:
            likely = ", likely for this model" if name == suggested else ""
            self.combo.addItem(f"{name} (llama.cpp{likely})", name)
        chosen: TemplateChoice | None = info.choice
        if chosen is not None and chosen.kind == TemplateKind.JINJA:
            self._file_choice = chosen
            self.combo.addItem(f"{chosen.label} (Jinja file)", FILE)
            self.combo.setCurrentIndex(self.combo.count() - 1)
        elif chosen is not None:
            self.combo.setCurrentIndex(max(self.combo.findData(chosen.value), 0))
        elif suggested:  # no template in the GGUF: its likely format comes first
            self.combo.setCurrentIndex(max(self.combo.findData(suggested), 0))
        row = QHBoxLayout()
        row.addWidget(self.combo, 1)
        self.file_button = QPushButton("Jinja file…")
        self.file_button.clicked.connect(self.ask_file)
        row.addWidget(self.file_button)
        form.addRow("Template", row)
        layout.addLayout(form)
        notes = "; ".join(info.notes) or "no notes"
        self.notes_label = QLabel(
            f"{info.model_name} now uses {describe_origin(info.in_use)}: {notes}."
        )
        self.notes_label.setObjectName("hint")
        self.notes_label.setWordWrap(True)
        layout.addWidget(self.notes_label)
        layout.addWidget(
            hint_label(
                "The choice is kept for this model file. Saved caches made with another"
                " template are not reused: each chat's next turn recomputes its history once."
            )
        )
        layout.addWidget(accept_buttons(self, "Use template"))

    def ask_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "A Jinja chat template", "", "Jinja templates (*.jinja *.j2 *.txt);;All files (*)"
        )
        if path:
            self.use_file(path)

    def use_file(self, path: str | Path) -> bool:
        """Offer a Jinja file's template (read now: the choice keeps its text)."""
        file = Path(path)
        try:
            source = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            self.notes_label.setText(f"Cannot read {file.name}: {error}")
            return False
        self._file_choice = TemplateChoice(TemplateKind.JINJA, source, file.name)
        index = self.combo.findData(FILE)
        label = f"{file.name} (Jinja file)"
        if index < 0:
            self.combo.addItem(label, FILE)
            index = self.combo.count() - 1
        else:
            self.combo.setItemText(index, label)
        self.combo.setCurrentIndex(index)
        return True

    def select(self, name: str) -> None:
        """Select a built-in format by name (or ``own``)."""
        index = self.combo.findData(name)
        if index < 0:
            raise KeyError(name)
        self.combo.setCurrentIndex(index)

    def choice(self) -> TemplateChoice | None:
        """The template to use; None: the model's own (or ChatML when it has none)."""
        data = self.combo.currentData()
        if data == OWN:
            return None
        if data == FILE:
            return self._file_choice
        return TemplateChoice(TemplateKind.BUILTIN, str(data), str(data))


def describe_origin(origin: str) -> str:
    """A markup's origin in words, for the dialog and the status bar."""
    if origin == "gguf":
        return "its own chat template"
    if origin == "builtin-chatml":
        return "ChatML (no usable template in the model file)"
    kind, _, label = origin.partition(":")
    return f"the {label} Jinja template" if kind == TemplateKind.JINJA else f"llama.cpp's {label}"
