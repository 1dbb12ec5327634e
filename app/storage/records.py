"""Plain records returned by the store (no SQL, no model code)."""

from __future__ import annotations

import json
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def pack_tokens(token_ids: list[int] | tuple[int, ...]) -> bytes:
    """Token ids as little-endian int32: compact and exact (a reply is never re-tokenized)."""
    packed = array("i", token_ids)
    return packed.tobytes()


def storable_text(text: str) -> str | bytes:
    """Text as SQLite can hold it exactly: UTF-8 TEXT, or UTF-8 bytes when the text holds
    unpaired surrogates (which Python strings allow and UTF-8 TEXT does not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="surrogatepass")
    return text


def loaded_text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="surrogatepass")
    return value


class UnreadableTokens(ValueError):
    """A stored token-id blob that is not a whole number of int32 values."""


def unpack_tokens(blob: bytes | None) -> list[int]:
    if not blob:
        return []
    tokens = array("i")
    if len(blob) % tokens.itemsize:
        raise UnreadableTokens(
            f"the stored token ids are unreadable ({len(blob)} bytes is not a multiple of "
            f"{tokens.itemsize})"
        )
    tokens.frombytes(blob)
    return tokens.tolist()


def unanswered_ids(messages: Sequence[Message]) -> set[int]:
    """User messages with no reply right after them (a kill, a full disk, an early stop).

    Derived from the order of the messages rather than stored, so no crash between two
    writes can leave it wrong.
    """
    followers: list[Message | None] = [*messages[1:], None]
    return {
        message.id
        for message, following in zip(messages, followers, strict=False)
        if message.role == "user" and (following is None or following.role != "assistant")
    }


@dataclass(frozen=True)
class Chat:
    id: int
    name: str
    layout: str
    trim_tokens: int | None
    trim_mode: str
    cache_start_seq: int
    created_at: float
    updated_at: float
    #: A branch's family (the chat it was first branched from, None for that chat) and
    #: the seq of its first own message.
    root_chat_id: int | None = None
    branch_seq: int | None = None
    #: Each question starts from the documents: the history is kept, never prompted.
    no_history: int = 0

    @property
    def family_id(self) -> int:
        return self.root_chat_id if self.root_chat_id is not None else self.id


@dataclass(frozen=True)
class InstructionVersion:
    id: int
    chat_id: int
    version: int
    text: str
    variables: dict[str, str]
    created_at: float

    @staticmethod
    def from_row(row: dict[str, Any]) -> InstructionVersion:
        return InstructionVersion(
            id=row["id"],
            chat_id=row["chat_id"],
            version=row["version"],
            text=loaded_text(row["text"]),
            variables=json.loads(row["variables"] or "{}"),
            created_at=row["created_at"],
        )


@dataclass(frozen=True)
class Message:
    id: int
    chat_id: int
    seq: int
    role: str
    text: str
    token_ids: list[int]
    token_format: str | None
    status: str
    instruction_version: int | None
    created_at: float
    finished_at: float | None
    #: The stored token ids could not be read; they are re-tokenized from the text.
    tokens_unreadable: bool = False

    @staticmethod
    def from_row(row: dict[str, Any]) -> Message:
        try:
            token_ids, token_format = unpack_tokens(row["token_ids"]), row["token_format"]
            unreadable = False
        except UnreadableTokens:
            token_ids, token_format, unreadable = [], None, True
        return Message(
            id=row["id"],
            chat_id=row["chat_id"],
            seq=row["seq"],
            role=row["role"],
            text=loaded_text(row["text"]),
            token_ids=token_ids,
            token_format=token_format,
            status=row["status"],
            instruction_version=row["instruction_version"],
            created_at=row["created_at"],
            finished_at=row["finished_at"],
            tokens_unreadable=unreadable,
        )


@dataclass(frozen=True)
class Document:
    """A file's text attached to a chat, in the prompt's fixed region (``seq`` order)."""

    id: int
    chat_id: int
    seq: int
    name: str
    text: str
    added_at: float

    @staticmethod
    def from_row(row: dict[str, Any]) -> Document:
        return Document(
            id=row["id"], chat_id=row["chat_id"], seq=row["seq"], name=row["name"],
            text=loaded_text(row["text"]), added_at=row["added_at"],
        )  # fmt: skip


@dataclass
class TurnMetricsRow:
    id: int
    chat_id: int
    message_id: int | None
    created_at: float
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalRate:
    """A layout's last measured instruction-following rate for one model."""

    layout: str
    cases: int
    followed: int
    ci_low: float
    ci_high: float
    recall: float | None
    turns: int
    measured_at: float = 0.0

    @property
    def rate(self) -> float | None:
        """Always the mean of the verdicts it counts (never stored apart from them)."""
        return self.followed / self.cases if self.cases else None
