"""The shapes a server's answers must have, as typed msgspec structs.

Every answer is decoded into these types, so a wrong shape (``data: 5``, a choice that
is a string, a number where text belongs) or a number JSON cannot hold (``Infinity``,
``1e400``) fails in the decoder with a one-line message naming where, and no code
after it sees an unexpected type. Unknown fields are ignored (servers add their own);
the fields read here are typed.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

import msgspec

__all__ = [
    "Chunk",
    "ErrorAnswer",
    "ModelList",
    "Props",
    "SlotAction",
    "Tokens",
    "decode",
    "is_llama_props",
    "refuses_roles",
]

T = TypeVar("T")


class Delta(msgspec.Struct):
    content: str | None = None


class Choice(msgspec.Struct):
    delta: Delta | None = None
    finish_reason: str | None = None


class PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: PromptDetails | None = None


class Timings(msgspec.Struct):
    """llama-server's own figures for one reply."""

    cache_n: int | None = None
    prompt_n: int | None = None
    prompt_ms: float | None = None
    prompt_per_second: float | None = None
    predicted_n: int | None = None
    predicted_ms: float | None = None
    predicted_per_second: float | None = None


class ErrorBody(msgspec.Struct):
    message: str = ""


class ErrorAnswer(msgspec.Struct):
    """An error answer: ``{"error": {"message": …}}``, ``{"error": "…"}`` or ``{"detail": …}``."""

    error: ErrorBody | str | None = None
    detail: str | None = None
    message: str | None = None

    def text(self) -> str:
        """The server's own message, whichever of the shapes it used ("" if none)."""
        error = self.error
        found = error if isinstance(error, str) else error.message if error else ""
        return found or self.detail or self.message or ""


#: Words of a chat template's refusal of the roles it was given.
_ROLE_REFUSAL_WORDS = ("system", "template", "role", "alternate")


def refuses_roles(message: str) -> bool:
    """True when a server's error message says its chat template refused the messages'
    roles (a system message after the first, two user turns in a row).

    This is the one place that reads an error's words, because the words are all there
    is: a template refuses through its own ``raise_exception('…')``, and servers pass its
    text on inside an ordinary bad-request answer (llama-server: 400
    ``invalid_request_error``, "… Jinja Exception: Conversation roles must alternate
    user/assistant/…"; older builds and vLLM: 400 or 500 with the template's words), with
    no code of its own. Call it only with the message of an error answer
    (:attr:`app.remote.client.ServerRefused.server_message`).
    """
    text = message.lower()
    return any(word in text for word in _ROLE_REFUSAL_WORDS)


class Chunk(msgspec.Struct):
    """One ``data:`` event of a streamed chat completion."""

    choices: list[Choice] = msgspec.field(default_factory=list)
    usage: Usage | None = None
    timings: Timings | None = None
    error: ErrorBody | str | None = None


class Model(msgspec.Struct):
    id: str


class ModelList(msgspec.Struct):
    data: list[Model]


class GenerationSettings(msgspec.Struct):
    n_ctx: Annotated[int, msgspec.Meta(ge=0)] = 0


class Props(msgspec.Struct):
    """llama-server's ``/props`` (what the inspector and the slot pinning read)."""

    default_generation_settings: GenerationSettings
    total_slots: Annotated[int, msgspec.Meta(ge=1, le=1 << 16)] = 1
    build_info: str = ""


class SlotAction(msgspec.Struct):
    """``/slots/{id}?action=save|restore|erase``: counts of tokens and bytes."""

    n_saved: int = 0
    n_written: int = 0
    n_restored: int = 0
    n_read: int = 0


class Tokens(msgspec.Struct):
    tokens: list[int]


def decode(body: bytes | str, shape: type[T]) -> T:
    """``body`` as ``shape``; raises :class:`msgspec.DecodeError` or ``ValidationError``."""
    return msgspec.json.decode(body, type=shape)


def is_llama_props(body: bytes) -> bool:
    """True when ``body`` is a JSON object with llama-server's generation settings."""
    try:
        found = msgspec.json.decode(body, type=dict[str, msgspec.Raw])
    except msgspec.MsgspecError:
        return False
    return "default_generation_settings" in found
