"""What the window's controllers (reply actions, presets) use of the main window.

A protocol rather than an import of :mod:`app.ui.main_window`: controllers live in
their own modules, and the window imports them, never the reverse.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from PySide6.QtWidgets import QStatusBar, QWidget

from app.session.engine import GenerationOptions
from app.storage.store import Store
from app.ui.chat_view import ChatView
from app.ui.instructions import InstructionEditor
from app.ui.worker import EngineHost


class ChatWindow(Protocol):
    """The main window as its controllers see it (the GUI thread's reader and host)."""

    chat_view: ChatView
    instructions: InstructionEditor
    host: EngineHost
    store: Store
    current_chat_id: int | None
    busy: bool
    model: Any
    pending_text: str | None
    _closed: bool

    def statusBar(self) -> QStatusBar: ...
    def window(self) -> QWidget: ...  # the window itself, as a parent for dialogs
    def select_chat(self, chat_id: int) -> None: ...
    def refresh_chats(self) -> None: ...
    def generation_options(self) -> GenerationOptions: ...
    def with_chat(self, then: Callable[[int], None]) -> None: ...
    def _set_busy(self, busy: bool, status: str = "") -> None: ...
    def _on_instructions_saved(self, chat_id: int, version: object, warm_up: bool) -> None: ...
