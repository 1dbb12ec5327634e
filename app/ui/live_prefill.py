"""Live prefill from the composer: the message is evaluated while it is typed.

Why: a person types a few characters a second while the model prefills a hundred tokens
or more, so the message can be in the KV cache before Enter; Send then pays only the
tokens that differ. This controller lives on the GUI thread and only restarts a timer per
keystroke: ~150 ms after the last one it hands the draft (and the instruction block, when
the editor holds an unsaved edit, which Send would save) to the worker, which prefills it
as idle work that any newer request cancels. Nothing here waits on the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from PySide6.QtCore import QObject, QTimer
from PySide6.QtWidgets import QPlainTextEdit

from app.ui.instructions import InstructionEditor

#: Quiet time after the last keystroke before the draft is prefilled.
DEBOUNCE_MS = 150

Block = tuple[str, dict[str, str]]


class DraftHost(Protocol):
    """What the controller needs of :class:`app.ui.worker.EngineHost`."""

    def prefill_draft(self, chat_id: int, text: str, block: Block | None = None) -> None: ...

    def cancel_draft(self) -> None: ...


class LivePrefill(QObject):
    """Debounces the composer's and the block editor's changes into draft prefills."""

    def __init__(
        self,
        host: DraftHost,
        message_input: QPlainTextEdit,
        instructions: InstructionEditor,
        current_chat: Callable[[], int | None],
        ready: Callable[[], bool],
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.host = host
        self.message_input = message_input
        self.instructions = instructions
        self.current_chat = current_chat
        self.ready = ready
        self.enabled = True
        self.sent = 0  # drafts handed to the worker (tests and the status line read it)
        self._last: tuple[int, str, Block | None] | None = None
        self.timer = QTimer(self)
        self.timer.setSingleShot(True)
        self.timer.setInterval(DEBOUNCE_MS)
        self.timer.timeout.connect(self.flush)
        message_input.textChanged.connect(self.timer.start)
        instructions.text_edited.connect(self.timer.start)

    def flush(self) -> None:
        """Hand the current draft to the worker unless it is the one sent last."""
        chat_id = self.current_chat()
        if not self.enabled or chat_id is None or not self.ready():
            return
        text = self.message_input.toPlainText().rstrip()  # as Send strips it
        block: Block | None = None
        if self.instructions.is_modified():  # Send saves what the editor shows
            block = (self.instructions.text(), self.instructions.variables())
        if not text.strip() and block is None:
            self._last = None  # nothing typed: the warm cache is already the prompt's start
            return
        draft = (chat_id, text, block)
        if draft == self._last:
            return
        self._last = draft
        self.sent += 1
        self.host.prefill_draft(chat_id, text, block)

    def cancel(self) -> None:
        """Stop a pending or running draft (chat switch, close); the next change starts anew."""
        self.timer.stop()
        self._last = None
        self.host.cancel_draft()
