"""The product's vocabulary, shared by every layer (no imports, no behaviour).

Values are ``StrEnum`` members: they compare equal to the strings stored in SQLite,
printed in JSON and typed on the command line, so storage and the CLI need no
conversions, while code gets names a type checker can follow.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Layout(StrEnum):
    """Where the instruction block sits in the prompt."""

    HISTORY_FIRST = "history-first"  # history, block, new message: edits keep the history cached
    SYSTEM_FIRST = "system-first"  # block, history, new message: an edit recomputes everything


class TrimMode(StrEnum):
    """How turns beyond the cached-history limit leave the cache."""

    EXACT = "exact"  # recompute what is kept
    SHIFT = "shift"  # remove the dropped cells and slide the rest down (no recompute)


class KVType(StrEnum):
    """Element type of llama.cpp's K and V caches."""

    F16 = "f16"
    Q8_0 = "q8_0"


class Step(StrEnum):
    """The stages of a turn, in order, as progress and metrics name them."""

    PREFILL = "prefill"
    COMMIT = "commit"
    WARM_UP = "warm-up"
    SAVE = "save"
    TYPE_AHEAD = "type-ahead"  # a draft prefilled while the user types (live prefill)


class FinishReason(StrEnum):
    """Why generation stopped."""

    STOP = "stop"  # the model ended its turn
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"
    CONTEXT_FULL = "context full"


class SegmentKind(StrEnum):
    """What a run of prompt tokens is, for the inspector and for token counts."""

    PREAMBLE = "preamble"
    BLOCK = "block"
    DOCUMENT = "document"  # an attached file, in the fixed region before the history
    MESSAGE = "message"
    PENDING = "pending"  # the new user message
    GENERATION = "generation"  # the assistant's generation prompt


class Role(StrEnum):
    USER = "user"
    ASSISTANT = "assistant"


class MessageStatus(StrEnum):
    COMPLETE = "complete"
    CANCELLED = "cancelled"
    ERROR = "error"
    #: A user message with no reply after it. Derived from the message order when
    #: messages are read (never stored): a kill or a full disk cannot leave it wrong.
    UNANSWERED = "unanswered"


class TemplateKind(StrEnum):
    """Where a chat template chosen for a model comes from."""

    BUILTIN = "builtin"  # one of llama.cpp's built-in formatters, by name
    JINJA = "jinja"  # a Jinja source (read from a file when chosen)
    GGUF = "gguf"  # the GGUF's own template: forgets an earlier choice (never stored)


@dataclass(frozen=True)
class TemplateChoice:
    """A chat template used for a model instead of the one in its GGUF (or its absence)."""

    kind: TemplateKind
    value: str  # the built-in's name, or the Jinja source
    label: str  # what the user sees: the name, or the file's name

    def __str__(self) -> str:
        return self.label if self.kind == TemplateKind.BUILTIN else f"{self.label} (Jinja)"


@dataclass(frozen=True)
class Sampling:
    """How each reply token is picked besides temperature and seed (per chat in the app).

    The defaults are the chain KV Chat always used: top-k 40, top-p 0.95, no min-p, no
    repeat penalty. Ranges are checked by ``app.limits.check_sampling``.
    """

    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.0
    repeat_penalty: float = 1.0
