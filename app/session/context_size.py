"""The smallest context a chat can work in, checked when the model is loaded.

A context that cannot hold the template's markup (preamble, a user message's
wrapper, the generation prompt) plus room for a short message and its reply would
fail on the first turn, after the user's message was stored; refusing it up front
loses nothing.
"""

from __future__ import annotations

from app.core.prompt import PromptBuilder
from app.domain import Layout

#: Room for a short user message and a short reply on top of the markup.
MESSAGE_AND_REPLY_ROOM = 128


class ContextTooSmall(ValueError):
    """The requested context cannot hold a turn; the message says how much it needs."""


def minimum_context(builder: PromptBuilder) -> int:
    """Markup of the most expensive layout + a user wrapper + the generation prompt + room."""
    markup = max(len(builder.opening(layout, "").tokens) for layout in Layout)
    markup += len(builder.user_segment("")) + len(builder.generation_prompt())
    return markup + MESSAGE_AND_REPLY_ROOM


def check_context_size(builder: PromptBuilder, n_ctx: int) -> None:
    need = minimum_context(builder)
    if n_ctx < need:
        raise ContextTooSmall(
            f"a context of {n_ctx} tokens cannot hold this model's chat markup plus a short "
            f"message and reply; use a context size of at least {need}"
        )
