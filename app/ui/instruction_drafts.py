"""Unsaved instruction edits, kept per chat in the settings when the chat is left or the
window closes, and put back into the editor when the chat is shown again."""

from __future__ import annotations

import json

from PySide6.QtCore import QSettings

from app.ui.instructions import InstructionEditor


class InstructionDrafts:
    """The instruction editor's drafts, one per chat, in the settings."""

    def __init__(self, settings: QSettings, editor: InstructionEditor) -> None:
        self.settings = settings
        self.editor = editor

    @staticmethod
    def key(chat_id: int) -> str:
        return f"drafts/instructions-{chat_id}"

    def keep(self, chat_id: int | None) -> None:
        """The editor's text belongs to ``chat_id``: kept if edited, else forgotten."""
        if chat_id is None:
            return
        if self.editor.is_modified():
            draft = {"text": self.editor.text(), "variables": self.editor.variables()}
            self.settings.setValue(self.key(chat_id), json.dumps(draft))
        else:
            self.forget(chat_id)

    def forget(self, chat_id: int) -> None:
        self.settings.remove(self.key(chat_id))

    def restore(self, chat_id: int) -> None:
        raw = self.settings.value(self.key(chat_id))
        if not raw:
            return
        try:
            draft = json.loads(str(raw))
            text, variables = str(draft["text"]), dict(draft.get("variables") or {})
        except (ValueError, KeyError, TypeError):
            self.forget(chat_id)  # unreadable: nothing to restore
            return
        self.editor.set_draft(text, {str(k): str(v) for k, v in variables.items()})
