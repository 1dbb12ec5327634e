"""Chat families: forks, branches (a new version of a user message) and reply versions
(Regenerate), and which versions of a message exist. A mixin of :class:`Store`, kept apart
so the store's class stays one screenful of concerns; all SQL still goes through it."""

from __future__ import annotations

import json
import time
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from app.storage.records import Chat, InstructionVersion, Message, pack_tokens, storable_text

if TYPE_CHECKING:
    import sqlite3

    from app.storage.connection import Params


class ChatFamilies:
    """Fork, branch and version methods; :class:`Store` supplies the primitives below."""

    if TYPE_CHECKING:

        def chat(self, chat_id: int) -> Chat: ...
        def chat_by_name(self, name: str) -> Chat | None: ...
        def messages(self, chat_id: int) -> list[Message]: ...
        def message(self, message_id: int) -> Message: ...
        def current_instructions(self, chat_id: int) -> InstructionVersion | None: ...
        def transaction(self) -> AbstractContextManager[None]: ...
        def _write(self, sql: str, params: Params = ()) -> sqlite3.Cursor: ...
        def _rows(self, sql: str, params: Params = ()) -> list[dict[str, Any]]: ...
        def _insert_chat(self, name: str, layout: str) -> int: ...
        def _copy_documents(self, source_id: int, copy_id: int) -> None: ...
        def _insert_message(
            self,
            chat_id: int,
            role: str,
            text: str,
            *,
            token_ids: list[int] | None,
            token_format: str | None,
            status: str,
            instruction_version: int | None,
            created_at: float | None = None,
        ) -> int: ...

    def fork_chat(self, chat_id: int, at_seq: int, name: str) -> Chat:
        """A new chat holding ``chat_id``'s messages up to ``at_seq`` and its instructions.

        Messages keep their token ids, so the fork's prompt begins with exactly the tokens
        of the original and restores from the pages they share.
        """
        source = self.chat(chat_id)
        self._require_message(source, at_seq, None, "message")
        return self._copy_chat(source, at_seq, name)

    def branch_chat(self, chat_id: int, at_seq: int) -> Chat:
        """A branch of ``chat_id``'s family for a new version of its user message ``at_seq``.

        The branch holds the messages before it (the same token ids: it restores from the
        same KV pages) and the current instructions; the caller then sends the new text.
        """
        source = self.chat(chat_id)
        self._require_message(source, at_seq, "user", "user message")
        with self.transaction():
            branch_id = self._branch_rows(source, at_seq)
        return self.chat(branch_id)

    def add_reply_version(
        self,
        chat_id: int,
        at_seq: int,
        text: str,
        *,
        token_ids: list[int] | None = None,
        token_format: str | None = None,
        status: str = "complete",
    ) -> tuple[Chat, Message]:
        """Store a new version of the reply ``at_seq`` (Regenerate): a branch of the chat's
        family holding the messages before it and the new reply, written in one
        transaction. The chat and its old reply stay as they were: nothing is lost, and
        ‹ › switches between the versions (see :meth:`branches`)."""
        source = self.chat(chat_id)
        self._require_message(source, at_seq, "assistant", "reply")
        with self.transaction():
            branch_id = self._branch_rows(source, at_seq)
            has_block = self.current_instructions(branch_id) is not None
            reply_id = self._insert_message(
                branch_id, "assistant", text, token_ids=token_ids, token_format=token_format,
                status=status, instruction_version=1 if has_block else None,
            )  # fmt: skip
        return self.chat(branch_id), self.message(reply_id)

    def extend_reply(
        self,
        message_id: int,
        text: str,
        *,
        token_ids: list[int] | None,
        token_format: str | None,
        status: str,
    ) -> Message:
        """Continue: the reply ``message_id`` becomes ``text`` (its old text and more) with
        these token ids, in place, so it stays one message with one seq."""
        reply = self.message(message_id)
        if reply.role != "assistant":
            raise ValueError(f"message {message_id} is not a reply")
        if not text.startswith(reply.text):
            raise ValueError("a continued reply must begin with the reply it continues")
        packed = pack_tokens(token_ids) if token_ids is not None else None
        with self.transaction():
            self._write(
                "UPDATE messages SET text = ?, token_ids = ?, token_format = ?, status = ?,"
                " finished_at = ? WHERE id = ?",
                (storable_text(text), packed, token_format, status, time.time(), message_id),
            )
            self._write(
                "UPDATE chats SET updated_at = ? WHERE id = ?", (time.time(), reply.chat_id)
            )
        return self.message(message_id)

    def _require_message(self, source: Chat, at_seq: int, role: str | None, what: str) -> None:
        """ValueError (naming ``what``) unless ``source`` has a message ``at_seq`` of
        ``role`` (any role for None): a fork, branch or version starts at one."""
        found = [m for m in self.messages(source.id) if m.seq == at_seq]
        if not found or (role is not None and found[0].role != role):
            raise ValueError(f"{source.name!r} has no {what} with seq {at_seq}")

    def _branch_rows(self, source: Chat, at_seq: int) -> int:
        """A branch of ``source``'s family holding its messages before ``at_seq`` (inside
        the caller's transaction)."""
        root = self.chat(source.family_id)
        taken = {chat.name for chat in self.family(root.id)}
        number = len(taken) + 1
        while f"{root.name} (branch {number})" in taken or self.chat_by_name(
            f"{root.name} (branch {number})"
        ):
            number += 1
        branch_id = self._copy_rows(source, at_seq - 1, f"{root.name} (branch {number})")
        self._write(
            "UPDATE chats SET root_chat_id = ?, branch_seq = ? WHERE id = ?",
            (root.id, at_seq, branch_id),
        )
        return branch_id

    def _copy_chat(self, source: Chat, keep_through: int, name: str) -> Chat:
        """A new chat with ``source``'s settings, instructions and messages up to a seq."""
        with self.transaction():
            copy_id = self._copy_rows(source, keep_through, name)
        return self.chat(copy_id)

    def _copy_rows(self, source: Chat, keep_through: int, name: str) -> int:
        """The rows of :meth:`_copy_chat` (inside the caller's transaction)."""
        current = self.current_instructions(source.id)
        copy_id = self._insert_chat(name, source.layout)
        self._write(
            "UPDATE chats SET trim_tokens = ?, trim_mode = ?, cache_start_seq = ?,"
            " no_history = ? WHERE id = ?",
            (source.trim_tokens, source.trim_mode,
             max(0, min(source.cache_start_seq, keep_through + 1)), source.no_history,
             copy_id),
        )
        self._copy_documents(source.id, copy_id)
        if current is not None:
            self._write(
                "INSERT INTO instruction_versions (chat_id, version, text, variables,"
                " created_at) VALUES (?, 1, ?, ?, ?)",
                (copy_id, storable_text(current.text), json.dumps(current.variables),
                 time.time()),
            )
        self._write(
            "INSERT INTO messages (chat_id, seq, role, text, token_ids, token_format, status,"
            " instruction_version, created_at, finished_at)"
            " SELECT ?, seq, role, text, token_ids, token_format, status,"
            " CASE WHEN instruction_version IS NULL THEN NULL ELSE 1 END,"
            " created_at, finished_at FROM messages WHERE chat_id = ? AND seq <= ?",
            (copy_id, source.id, keep_through),
        )
        return copy_id

    def family(self, chat_id: int) -> list[Chat]:
        """The chat's family: the chat it was first branched from and every branch."""
        root = self.chat(chat_id).family_id
        rows = self._rows(
            "SELECT * FROM chats WHERE id = ?1 OR root_chat_id = ?1 ORDER BY id", (root,)
        )
        return [Chat(**row) for row in rows]

    def latest_in_family(self, chat_id: int) -> Chat:
        """The branch of the family used last (what opening the family shows)."""
        return max(self.family(chat_id), key=lambda chat: (chat.updated_at, chat.id))

    def branches(self, chat_id: int) -> dict[int, list[int]]:
        """For each message of the chat that has other versions (an edited user message, a
        regenerated reply): seq → one chat per version, oldest version first. The chats
        compared agree on every message before it; a version held by several chats (a
        reply regenerated after an edit shares the edited message) is shown by this chat
        when it holds it, else by the one used last.

        A message is told from another by role, text and creation time: branches copy the
        messages before their own (creation time included), so copies compare equal and a
        new version with the same text (a greedy regenerate) is still a version."""
        family = self.family(chat_id)
        if len(family) < 2:
            return {}
        paths = {
            chat.id: [(m.role, m.text, m.created_at) for m in self.messages(chat.id)]
            for chat in family
        }
        last_used = {chat.id: (chat.updated_at, chat.id) for chat in family}
        mine = paths[chat_id]
        result: dict[int, list[int]] = {}
        for seq, message in enumerate(mine):
            versions: dict[tuple[str, str, float], list[int]] = {}
            for other, theirs in paths.items():  # family order: oldest chat first
                same_before = len(theirs) > seq and theirs[:seq] == mine[:seq]
                if same_before and theirs[seq][0] == message[0]:
                    versions.setdefault(theirs[seq], []).append(other)
            if len(versions) > 1:
                result[seq] = [
                    chat_id if chat_id in holders else max(holders, key=last_used.__getitem__)
                    for holders in versions.values()
                ]
        return result
