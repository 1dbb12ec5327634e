"""Documents attached to chats: their text, in prompt order. A mixin of :class:`Store`
(all SQL still goes through it), kept apart like the chat families."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from app.storage.records import Chat, Document, storable_text

if TYPE_CHECKING:
    import sqlite3

    from app.storage.connection import Params


class ChatDocuments:
    """Attach, list and detach a chat's documents; :class:`Store` supplies the primitives."""

    if TYPE_CHECKING:

        def transaction(self) -> AbstractContextManager[None]: ...
        def _write(self, sql: str, params: Params = ()) -> sqlite3.Cursor: ...
        def _rows(self, sql: str, params: Params = ()) -> list[dict[str, Any]]: ...

    def chat_or_none(self, chat_id: int) -> Chat | None:
        """A chat, or None when it was deleted (e.g. for a note naming a page's owner)."""
        rows = self._rows("SELECT * FROM chats WHERE id = ?", (chat_id,))
        return Chat(**rows[0]) if rows else None

    def attach_document(self, chat_id: int, name: str, text: str) -> Document:
        """Add a document after the chat's others (its prompt changes from there on)."""
        with self.transaction():
            cursor = self._write(
                "INSERT INTO documents (chat_id, seq, name, text, added_at)"
                " VALUES (?, (SELECT coalesce(max(seq), -1) + 1 FROM documents"
                " WHERE chat_id = ?), ?, ?, ?)",
                (chat_id, chat_id, name, storable_text(text), time.time()),
            )
        assert cursor.lastrowid is not None
        return self.document(cursor.lastrowid)

    def document(self, document_id: int) -> Document:
        rows = self._rows("SELECT * FROM documents WHERE id = ?", (document_id,))
        if not rows:
            raise ValueError(f"no document with id {document_id}")
        return Document.from_row(rows[0])

    def documents(self, chat_id: int) -> list[Document]:
        """The chat's documents in the order they sit in its prompt."""
        rows = self._rows("SELECT * FROM documents WHERE chat_id = ? ORDER BY seq", (chat_id,))
        return [Document.from_row(row) for row in rows]

    def detach_document(self, document_id: int) -> None:
        """Remove a document from its chat (the chat's later prompt is recomputed)."""
        with self.transaction():
            self._write("DELETE FROM documents WHERE id = ?", (document_id,))

    def _copy_documents(self, source_id: int, copy_id: int) -> None:
        """A fork or branch keeps its source's documents (inside the caller's transaction),
        so its prompt begins with the same tokens and restores the same pages."""
        self._write(
            "INSERT INTO documents (chat_id, seq, name, text, added_at)"
            " SELECT ?, seq, name, text, added_at FROM documents WHERE chat_id = ?",
            (copy_id, source_id),
        )
