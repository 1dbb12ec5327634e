"""The instruction block of the chat on screen: saving versions, unsaved drafts kept per
chat, the layout, and what an edit would cost the cache (measured on the worker)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.storage.records import Chat
from app.ui.chat_actions import ChatActions
from app.ui.instruction_drafts import InstructionDrafts
from app.ui.instructions import LAYOUT_LABELS, describe_edit_cost
from app.ui.window_part import WindowPart, unless_closed

if TYPE_CHECKING:
    from app.ui.window_base import WindowBase


class InstructionEdits(WindowPart):
    """Between the instruction editor and the worker: saves, drafts, layout, edit cost."""

    def __init__(self, window: WindowBase, chats: ChatActions, drafts: InstructionDrafts) -> None:
        super().__init__(window)
        self.chats = chats
        self.drafts = drafts
        self._edit_cost_request = 0  # only the newest measurement is shown
        self._edit_cost_refresh = False

    def save_instructions(
        self, text: str, variables: dict[str, str] | None = None, *, warm_up: bool = True
    ) -> None:
        """A new version of the block (text and variables); warmed up in idle time.

        ``warm_up`` False: a turn follows at once and takes the new block itself.
        """
        if self.window.current_chat_id is None:
            self.chats.with_chat(
                lambda _chat_id: self.save_instructions(text, variables, warm_up=warm_up)
            )
            return
        chat_id = self.window.current_chat_id
        current = self.window.store.current_instructions(chat_id)
        if variables is None:
            variables = dict(current.variables) if current else {}
        if current is not None and current.text == text and current.variables == variables:
            return
        kept = variables
        self.window.host.change_store(
            "Instructions",
            lambda store: store.add_instruction_version(chat_id, text, kept),
            lambda version: self._on_instructions_saved(chat_id, version, warm_up),
        )

    def _on_instructions_saved(self, chat_id: int, version: object, warm_up: bool) -> None:
        if version is None or self.closed or chat_id != self.window.current_chat_id:
            return
        pending_layout = self.window.instructions.current_layout()
        chat = self.window.store.chat(chat_id)
        self.window.instructions.load(self.window.store.instruction_versions(chat_id), chat.layout)
        if pending_layout != chat.layout:  # a previewed layout stays a preview
            index = self.window.instructions.layout_combo.findData(pending_layout)
            self.window.instructions.layout_combo.setCurrentIndex(index)
        self.drafts.forget(chat_id)
        self.window.instructions.show_cost("Saved. The cache takes this version in idle time.")
        if self.window.model is not None and warm_up:
            self.window.host.prepare_chat(chat_id)

    def set_layout(self, layout: str) -> None:
        """Apply a layout: the chat's prompt is rebuilt in idle time."""
        chat_id = self.window.current_chat_id
        if chat_id is None:
            return
        self.window.host.change_store(
            "Layout",
            lambda store: store.update_chat(chat_id, layout=layout),
            lambda chat: self._on_layout_set(chat_id, layout, chat),
        )

    def _on_layout_set(self, chat_id: int, layout: str, chat: object) -> None:
        if not isinstance(chat, Chat) or self.closed or chat_id != self.window.current_chat_id:
            return
        text, variables = self.window.instructions.text(), self.window.instructions.variables()
        modified = self.window.instructions.is_modified()
        self.window.instructions.load(self.window.store.instruction_versions(chat_id), chat.layout)
        if modified:  # keep unsaved edits in the editor
            self.window.instructions.editor.setPlainText(text)
            self.window.instructions.variables_table.set_variables(variables, [])
        self.window.instructions.show_cost(
            f"{LAYOUT_LABELS[layout]} applied. The cache follows in idle time."
        )
        if self.window.model is not None:
            self.window.host.prepare_chat(chat_id)

    @unless_closed
    def request_edit_cost(self, refresh: bool = False) -> None:
        """Ask the worker what the editor's text, variables and layout would recompute.

        ``refresh``: the cache changed (not the editor); the label is brought up to date
        unless an edit's own measurement is pending.
        """
        chat_id = self.window.current_chat_id
        if chat_id is None or self.window.model is None:
            self.window.instructions.show_cost("")
            return
        if refresh and self.window.instructions.debounce.isActive():
            return
        self._edit_cost_refresh = refresh
        self._edit_cost_request = self.window.host.request_edit_cost(
            chat_id,
            self.window.instructions.text(),
            self.window.instructions.variables(),
            self.window.instructions.current_layout(),
        )

    @unless_closed
    def on_edit_cost(self, request_id: int, chat_id: int, tokens: int, seconds: object) -> None:
        if request_id != self._edit_cost_request or chat_id != self.window.current_chat_id:
            return
        speed = None
        if seconds and tokens:
            speed = tokens / float(seconds)  # type: ignore[arg-type]
        self.window.instructions.show_cost(
            describe_edit_cost(
                tokens,
                seconds,  # type: ignore[arg-type]
                speed,
                text_changed=self.window.instructions.is_modified(),
                layout_changed=self.window.instructions.layout_pending(),
            )
        )
        if not self._edit_cost_refresh:
            self.window.edit_cost_shown.emit(tokens, seconds)
