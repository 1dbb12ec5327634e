"""What the inspector and the status bar say about the cache of the chat on screen:
cache views, idle-time work, and the trim limit (preview, then apply)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from app.ui.chat_actions import ChatActions
from app.ui.inspector import format_bytes
from app.ui.instruction_edits import InstructionEdits
from app.ui.window_part import WindowPart, unless_closed

if TYPE_CHECKING:
    from app.ui.window_base import WindowBase
    from app.ui.worker import BackgroundOutcome


class CachePanel(WindowPart):
    """The worker's cache answers, shown for the chat on screen only."""

    def __init__(self, window: WindowBase, chats: ChatActions, edits: InstructionEdits) -> None:
        super().__init__(window)
        self.chats = chats
        self.edits = edits
        self._trim_request = 0  # only the newest preview is shown

    @unless_closed
    def request_trim_preview(self, limit: int | None, mode: str) -> None:
        if self.window.current_chat_id is None or self.window.model is None:
            return
        self._trim_request = self.window.host.request_trim_preview(
            self.window.current_chat_id, limit, mode
        )

    @unless_closed
    def on_trim_preview(self, request_id: int, chat_id: int, preview: Any) -> None:
        if request_id != self._trim_request or chat_id != self.window.current_chat_id:
            return
        self.window.inspector.show_trim_preview(preview)
        self.window.chat_view.mark_leaving(set(preview.dropped_message_ids), preview=True)
        self.window.trim_preview_shown.emit(preview)

    @unless_closed
    def apply_trim(self, limit: int | None, mode: str) -> None:
        if self.window.current_chat_id is None or self.window.model is None:
            return
        if self.window.busy:
            self.window.statusBar().showMessage("The limit applies after this reply.", 4000)
        self.window.host.apply_trim(self.window.current_chat_id, limit, mode)

    @unless_closed
    def on_trim_applied(self, chat_id: int, preview: Any) -> None:
        if chat_id == self.window.current_chat_id:
            self.chats.reload_chat(incremental=True)
            self.window.inspector.show_trim_preview(preview)
        self.window.trim_changed.emit(chat_id, preview)

    @unless_closed
    def on_background(self, outcome: BackgroundOutcome) -> None:
        if outcome.chat_id == self.window.current_chat_id:
            if outcome.metrics is not None and outcome.metrics_id is not None:
                self.window.inspector.upsert_turn(outcome.metrics_id, outcome.metrics.as_dict())
            elif outcome.metrics is not None:
                rows = self.window.store.metrics(outcome.chat_id)
                self.window.inspector.set_turns([(row.id, row.data) for row in rows])
            if outcome.cache is not None:
                self.on_cache_view(outcome.chat_id, outcome.cache)
            self.edits.request_edit_cost(refresh=True)  # the cache changed: so did an edit's cost
        self.window.background_done.emit(outcome)

    @unless_closed
    def on_cache_view(self, chat_id: int, view: Any) -> None:
        if chat_id != self.window.current_chat_id:
            return
        self.window.inspector.set_cache_view(view)
        self.window.set_context_used(view.cache_tokens)  # the inspector's figure, never another
        size = format_bytes(view.cache_tokens * view.bytes_per_token)
        self.window.context_label.setToolTip(f"KV cache of this chat: {size}")
        self.window.cache_view_shown.emit(view)
