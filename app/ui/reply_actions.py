"""Continue and Edit on a reply: the window's controller for both.

Continue streams more of the chat's last reply into its own bubble (the worker extends
the same stored message from the cache). Edit opens the reply in a dialog; the edited
text is stored by the worker as a new version of the reply (the old one stays, ‹ ›
switches), and Save and continue then writes more of it. The window never writes: both
go to the worker.
"""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.ui.chat_actions import ChatActions
from app.ui.turn_control import TurnControl
from app.ui.window_base import WindowBase
from app.ui.window_part import WindowPart, unless_closed


class ReplyEditDialog(QDialog):
    """The reply's text to edit; Save keeps it as a new version, or saves and continues."""

    save_requested = Signal(str, bool)  # the edited text, continue after saving

    def __init__(self, text: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Edit reply")
        self.resize(560, 360)
        layout = QVBoxLayout(self)
        note = QLabel(
            "The edited text becomes the reply the model sees from now on. The old reply is"
            " kept as another version (‹ › switches); the cache keeps what the two share."
        )
        note.setWordWrap(True)
        layout.addWidget(note)
        self.editor = QPlainTextEdit()
        self.editor.setPlainText(text)
        layout.addWidget(self.editor, 1)
        self.problem = QLabel("")
        self.problem.setObjectName("problemLabel")
        self.problem.setWordWrap(True)
        layout.addWidget(self.problem)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Cancel)
        self.save_button = QPushButton("Save")
        self.save_button.setToolTip("Keep the edited text as a new version of this reply")
        self.continue_button = QPushButton("Save and continue")
        self.continue_button.setToolTip("Keep the edited text, then write more after it")
        buttons.addButton(self.save_button, QDialogButtonBox.ButtonRole.AcceptRole)
        buttons.addButton(self.continue_button, QDialogButtonBox.ButtonRole.AcceptRole)
        buttons.rejected.connect(self.reject)
        self.save_button.clicked.connect(lambda: self._save(then_continue=False))
        self.continue_button.clicked.connect(lambda: self._save(then_continue=True))
        layout.addWidget(buttons)
        self.editor.textChanged.connect(self._check)
        self._check()

    def _check(self) -> None:
        empty = not self.editor.toPlainText().strip()
        problem = "A reply cannot be empty; Regenerate writes a new one." if empty else ""
        self.problem.setText(problem)
        self.save_button.setEnabled(not empty)
        self.continue_button.setEnabled(not empty)

    def _save(self, *, then_continue: bool) -> None:
        text = self.editor.toPlainText()
        if not text.strip():
            return
        self.save_requested.emit(text, then_continue)
        self.accept()


class ReplyActions(WindowPart):
    """Continue and Edit for the replies of the chat on screen."""

    def __init__(self, window: WindowBase, chats: ChatActions, turns: TurnControl) -> None:
        super().__init__(window)
        self.chats = chats
        self.turns = turns
        self.dialog: ReplyEditDialog | None = None
        window.chat_view.continue_requested.connect(self.continue_reply)
        window.chat_view.edit_reply_requested.connect(self.edit_reply)
        window.host.worker.reply_edited.connect(self._on_reply_edited)

    def continue_reply(self) -> None:
        """Write more of the chat's last reply, into its own bubble."""
        window = self.window
        chat_id = window.current_chat_id
        if chat_id is None or window.busy:
            return
        if window.chat_view.continue_last_reply() is None:
            return
        self.turns.pending_text = None
        self.turns.set_busy(True, "Continuing the reply…")
        window.host.continue_reply(chat_id, self.turns.generation_options())

    def edit_reply(self, seq: int) -> None:
        """Open the reply ``seq`` of the chat on screen in the edit dialog."""
        window = self.window
        chat_id = window.current_chat_id
        if chat_id is None or window.busy:
            window.statusBar().showMessage("Wait for the reply to finish, then edit.", 4000)
            return
        reply = next((m for m in window.store.messages(chat_id) if m.seq == seq), None)
        if reply is None or reply.role != "assistant":
            return
        if window.model is None:
            window.statusBar().showMessage("Load a model first: it tokenizes the edit.", 4000)
            return
        self.dialog = ReplyEditDialog(reply.text, window)
        self.dialog.save_requested.connect(
            lambda text, then_continue: window.host.edit_reply(chat_id, seq, text, then_continue)
        )
        self.dialog.open()

    @unless_closed
    def _on_reply_edited(self, chat_id: int, branch_id: int, then_continue: bool) -> None:
        window = self.window
        if chat_id != window.current_chat_id:
            return
        self.chats.select_chat(branch_id)
        self.chats.refresh_chats()
        window.statusBar().showMessage("The edited reply is saved as a new version.", 5000)
        if then_continue:
            self.continue_reply()
