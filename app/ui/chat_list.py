"""The chat list: search, new, rename, delete. Reads and light writes use the GUI's Store."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from PySide6.QtCore import Qt, QTimer, Signal, SignalInstance
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.storage.records import Chat
from app.storage.store import Store

SEARCH_DEBOUNCE_MS = 200
_NUMBERED = re.compile(r"Chat (\d{1,9})")


def next_chat_name(taken: Iterable[str]) -> str:
    """"Chat N" with the lowest N no chat uses: after Chat 2 is deleted, the next new
    chat is Chat 2 again, so the numbers have no gaps."""
    used = {int(match[1]) for name in taken if (match := _NUMBERED.fullmatch(name))}
    number = 1
    while number in used:
        number += 1
    return f"Chat {number}"


def create_numbered_chat(store: Store) -> Chat:
    """A new chat named by :func:`next_chat_name` (on the worker: no name race)."""
    return store.create_chat(next_chat_name(chat.name for chat in store.chats()))


class ChatListPanel(QWidget):
    """Lists chats (most recent first) and asks the window to create/rename/delete them."""

    chat_selected = Signal(int)
    new_requested = Signal()
    rename_requested = Signal(int)
    delete_requested = Signal(int)
    search_changed = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("chatListPanel")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(8, 8, 8, 8)
        layout.setSpacing(6)
        title = QLabel("Chats")
        title.setObjectName("panelTitle")
        layout.addWidget(title)
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search names and messages")
        self.search.setClearButtonEnabled(True)
        layout.addWidget(self.search)
        self.list = QListWidget()
        self.list.setObjectName("chatList")
        layout.addWidget(self.list, 1)
        buttons = QHBoxLayout()
        self.new_button = QPushButton("New")
        self.new_button.setToolTip("New chat (Ctrl+N)")
        self.rename_button = QPushButton("Rename")
        self.delete_button = QPushButton("Delete")
        self.delete_button.setObjectName("dangerButton")
        for button in (self.new_button, self.rename_button, self.delete_button):
            buttons.addWidget(button)
        layout.addLayout(buttons)

        self._search_timer = QTimer(self)
        self._search_timer.setSingleShot(True)
        self._search_timer.setInterval(SEARCH_DEBOUNCE_MS)
        self._search_timer.timeout.connect(lambda: self.search_changed.emit(self.search.text()))
        self.search.textChanged.connect(lambda _text: self._search_timer.start())
        self.list.currentItemChanged.connect(self._on_current_changed)
        self.new_button.clicked.connect(self.new_requested)
        self.rename_button.clicked.connect(self._emit_for_current(self.rename_requested))
        self.delete_button.clicked.connect(self._emit_for_current(self.delete_requested))
        self._updating = False

    def _emit_for_current(self, signal: SignalInstance) -> Callable[[], None]:
        def emit() -> None:
            chat_id = self.current_chat_id()
            if chat_id is not None:
                signal.emit(chat_id)

        return emit

    def set_chats(self, chats: list[Chat], select_id: int | None) -> None:
        """Replace the list without emitting a selection for the rebuild itself."""
        self._updating = True
        try:
            self.list.clear()
            for chat in chats:
                item = QListWidgetItem(chat.name)
                item.setData(Qt.ItemDataRole.UserRole, chat.id)
                item.setToolTip(f"{chat.name} · layout {chat.layout}")
                self.list.addItem(item)
                if chat.id == select_id:
                    self.list.setCurrentItem(item)
        finally:
            self._updating = False
        has_selection = self.current_chat_id() is not None
        self.rename_button.setEnabled(has_selection)
        self.delete_button.setEnabled(has_selection)

    def current_chat_id(self) -> int | None:
        item = self.list.currentItem()
        return None if item is None else int(item.data(Qt.ItemDataRole.UserRole))

    def _on_current_changed(self, current: QListWidgetItem | None, _previous: object) -> None:
        self.rename_button.setEnabled(current is not None)
        self.delete_button.setEnabled(current is not None)
        if current is not None and not self._updating:
            self.chat_selected.emit(int(current.data(Qt.ItemDataRole.UserRole)))
