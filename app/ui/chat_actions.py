"""The chats: the list, opening one (the version used last), new, rename, delete, fork,
switching between versions of a message, and exporting the chat on screen.

Reads come from the window's read-only store; every change goes to the worker, the
database's one writer, and the window follows when its answer arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QFileDialog, QInputDialog, QMessageBox

from app.storage.errors import ChatNotFound
from app.storage.export import export_chat
from app.storage.records import Chat
from app.storage.store import StorageError
from app.ui.chat_export import EXPORT_KINDS, default_export_path
from app.ui.chat_list import create_numbered_chat
from app.ui.instruction_drafts import InstructionDrafts
from app.ui.sampling import load_chat_sampling
from app.ui.window_part import WindowPart, unless_closed

if TYPE_CHECKING:
    from app.ui.window_base import WindowBase


class ChatActions(WindowPart):
    """Which chat is on screen, and the actions of the chat list and the message menus."""

    leaving_chat = Signal()  # another chat is about to be shown: an edit in progress ends
    chat_shown = Signal(int)  # a chat was shown (e.g. its attached documents follow)

    def __init__(self, window: WindowBase, drafts: InstructionDrafts) -> None:
        super().__init__(window)
        self.drafts = drafts
        self._chat_waiters: list[Callable[[int], None]] = []  # actions waiting for a new chat

    def refresh_chats(self) -> None:
        try:
            chats = self.window.store.chats(self.window.chat_list.search.text())
        except StorageError as error:
            self.window.show_error("Chats", str(error))
            return
        chat = self.current_chat()
        self.window.chat_list.set_chats(chats, chat.family_id if chat else None)

    def with_chat(self, then: Callable[[int], None]) -> None:
        """``then(chat id)`` for the chat on screen, making one first if there is none
        (once: actions that need a chat while it is being made wait for the same one)."""
        if self.window.current_chat_id is not None:
            then(self.window.current_chat_id)
        elif self._chat_waiters:
            self._chat_waiters.append(then)
        else:
            self._chat_waiters.append(then)
            self.new_chat(self._chat_made)

    def _chat_made(self, chat_id: int) -> None:
        waiters, self._chat_waiters = self._chat_waiters, []
        for then in waiters:
            then(chat_id)

    def new_chat(self, then: Callable[[int], None] | None = None) -> None:
        """Create a chat (on the worker) and open it; ``then`` gets its id."""
        def created(chat: object) -> None:
            if not isinstance(chat, Chat) or self.closed:
                return
            self.window.chat_list.search.clear()
            # The editor's draft belongs to the chat being left.
            self.drafts.keep(self.window.current_chat_id)
            self.window.instructions.load([], chat.layout)
            self.window.current_chat_id = chat.id
            self.refresh_chats()
            self.select_chat(chat.id)
            self.window.input.setFocus()
            if then is not None:
                then(chat.id)

        self.window.host.change_store("New chat", create_numbered_chat, created)

    def select_chat(self, chat_id: int) -> None:
        """Show a chat, and restore its saved cache in the background (prefetch)."""
        try:
            chat = self.window.store.chat(chat_id)
        except ChatNotFound:
            return
        same_chat_draft = None  # the same chat shown again keeps the editor's draft
        if chat_id != self.window.current_chat_id:
            self.leaving_chat.emit()
            self.drafts.keep(self.window.current_chat_id)
        elif self.window.instructions.is_modified():
            same_chat_draft = (
                self.window.instructions.text(),
                self.window.instructions.variables(),
            )
        self.window.current_chat_id = chat_id
        self.window.sampling_panel.set_values(*load_chat_sampling(self.window.settings, chat_id))
        if self.window.chat_list.current_chat_id() != chat.family_id:
            self.refresh_chats()
        self.window.chat_title.setText(self.window.store.chat(chat.family_id).name)
        if not self.window.busy:  # the status line and context label describe the chat on screen
            self.window.turn_status.setText("")
        self.window.set_context_used(None)
        self.window.context_label.setToolTip("")
        self.reload_chat()
        versions = self.window.store.instruction_versions(chat_id)
        self.window.instructions.load(versions, chat.layout)
        if same_chat_draft is not None:
            self.window.instructions.set_draft(*same_chat_draft)
        else:
            self.drafts.restore(chat_id)
        rows = self.window.store.metrics(chat_id)
        self.window.inspector.set_turns([(row.id, row.data) for row in rows])
        self.window.inspector.set_cache_view(None, self._cache_reason())
        if self.window.model is not None:
            self.window.host.prefetch_chat(chat_id)
            self.window.host.refresh_cache_view(chat_id)
        self.window.update_actions()
        self.chat_shown.emit(chat_id)

    def _cache_reason(self) -> str:
        """What the inspector says while it has no cache view for the chat on screen."""
        if self.window.model is None:
            return "loading the model…" if self.window.progress.isVisible() else "no model loaded"
        return "reading this chat's cache…"

    def open_family(self, family_id: int) -> None:
        """A chat picked in the list: open the version of it used last."""
        try:
            latest = self.window.store.latest_in_family(family_id)
        except ChatNotFound:
            return
        self.select_chat(latest.id)

    def current_chat(self) -> Chat | None:
        if self.window.current_chat_id is None:
            return None
        try:
            return self.window.store.chat(self.window.current_chat_id)
        except ChatNotFound:
            return None

    def reload_chat(self, *, incremental: bool = False) -> None:
        """Messages and trim state from the store (after a turn, a trim, a selection)."""
        chat = self.current_chat()
        if chat is None:
            self.window.chat_view.clear()
            return
        messages = self.window.store.messages(chat.id)
        if incremental:
            self.window.chat_view.sync_messages(messages, chat.cache_start_seq)
        else:
            self.window.chat_view.show_messages(messages, chat.cache_start_seq)
        self.window.chat_view.set_branches(self.window.store.branches(chat.id), chat.id)
        self.window.chat_view.set_finish_reasons(
            {
                row.message_id: str(row.data.get("finish_reason") or "")
                for row in self.window.store.metrics(chat.id)
                if row.message_id is not None
            }
        )
        self.window.chat_view.set_actions_enabled(not self.window.busy)
        history_tokens = sum(len(m.token_ids) for m in messages)
        self.window.inspector.set_trim(chat.trim_tokens, chat.trim_mode, history_tokens)

    def rename_chat(self, chat_id: int, name: str) -> None:
        def renamed(chat: object) -> None:
            if not isinstance(chat, Chat) or self.closed:
                return
            current = self.current_chat()
            if current is not None and current.family_id == chat_id:
                self.window.chat_title.setText(chat.name)
            self.refresh_chats()

        self.window.host.change_store(
            "Rename chat", lambda store: store.rename_chat(chat_id, name), renamed
        )

    def ask_rename(self, chat_id: int) -> None:
        chat = self.window.store.chat(chat_id)
        name, ok = QInputDialog.getText(self.window, "Rename chat", "Name:", text=chat.name)
        if ok:
            self.rename_chat(chat_id, name)

    def delete_chat(self, chat_id: int) -> None:
        """The worker forgets the chat's cache and deletes it, after any turn of that chat."""
        self.window.host.delete_chat(chat_id)

    def ask_delete(self, chat_id: int) -> None:
        chat = self.window.store.chat(chat_id)
        versions = len(self.window.store.family(chat_id)) - 1
        extra = f" and its {versions} other version(s) of edited messages" if versions else ""
        answer = QMessageBox.question(
            self.window,
            "Delete chat",
            f"Delete “{chat.name}”{extra}, with the messages, instruction versions and"
            " saved cache?",
        )
        if answer == QMessageBox.StandardButton.Yes:
            self.delete_chat(chat_id)

    @unless_closed
    def on_chat_deleted(self, chat_id: int) -> None:
        if self.window.current_chat_id is not None and self.current_chat() is None:
            self.window.current_chat_id = None
            self.window.chat_view.clear()
            self.window.chat_title.setText("")
            self.window.instructions.load([], "history-first")
            self.window.inspector.set_turns([])
            remaining = self.window.store.chats()
            if remaining:
                self.open_family(remaining[0].id)
        self.refresh_chats()
        self.window.update_actions()
        self.window.chat_removed.emit(chat_id)

    def switch_branch(self, chat_id: int) -> None:
        """‹ ›: show another version of a message (and what followed it)."""
        if self.window.busy:
            return
        self.select_chat(chat_id)
        self.window.host.change_store("Versions", lambda store: store.touch_chat(chat_id))

    def fork_at(self, seq: int) -> None:
        """Fork from here: a new chat with the messages up to this one (and shared pages)."""
        chat = self.current_chat()
        if chat is None or self.window.busy:
            return
        base = f"{self.window.store.chat(chat.family_id).name} (fork)"
        name, number = base, 2
        while self.window.store.chat_by_name(name) is not None:
            name, number = f"{base} {number}", number + 1
        source = chat.id

        def forked(fork: object) -> None:
            if not isinstance(fork, Chat) or self.closed:
                return
            self.window.chat_list.search.clear()
            self.select_chat(fork.id)
            self.refresh_chats()
            self.window.statusBar().showMessage(f"Forked into “{name}”.", 5000)

        self.window.host.change_store(
            "Fork", lambda store: store.fork_chat(source, seq, name), forked
        )

    def ask_export_chat(self, kind: str) -> None:
        chat = self.current_chat()
        if chat is None:
            self.window.statusBar().showMessage("Open a chat to export it.", 4000)
            return
        proposed = default_export_path(self.window.store.chat(chat.family_id).name, kind)
        pattern = EXPORT_KINDS[kind][1]
        path, _ = QFileDialog.getSaveFileName(self.window, "Export chat", str(proposed), pattern)
        if path:
            self.export_chat(path, all_versions=EXPORT_KINDS[kind][2])

    def export_chat(self, path: str | Path, *, all_versions: bool = False) -> Path | None:
        """The chat on screen as Markdown (or JSON, by the file name), with its metrics."""
        if self.window.current_chat_id is None:
            return None
        try:
            chat_id = self.window.current_chat_id
            target = export_chat(self.window.store, chat_id, path, all_versions=all_versions)
        except (OSError, StorageError) as error:
            self.window.show_error("Export chat", f"Could not write {path}: {error}")
            return None
        self.window.statusBar().showMessage(f"Exported to {target}", 5000)
        return target
