"""Token-level prompt plans for the two layouts.

``system-first``:  [instruction block | preamble] history... new-message generation-prompt
``history-first``: [preamble] history... [instruction block] new-message generation-prompt

Every piece is a token segment; a prompt is their concatenation. Message segments
are computed once and stored, so the history is append-only by construction and
a reply keeps the token ids it was generated with.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.core.chat_template import BLOCK_ACK, BlockPlacement, ChatMarkup, Wrapper, fill_dates
from app.core.variables import PLACEHOLDER as _VARIABLE
from app.domain import Layout, SegmentKind

if TYPE_CHECKING:  # only a type: building prompt text needs no llama.cpp
    from app.core.llama_backend import LlamaBackend


def render_instructions(text: str, variables: dict[str, str] | None) -> str:
    """The block's text: ``{{name}}`` placeholders filled, other variables listed after."""
    variables = variables or {}
    used: set[str] = set()

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in variables:
            used.add(name)
            return variables[name]
        return match.group(0)

    rendered = _VARIABLE.sub(fill, text)
    extra = [f"{name}: {value}" for name, value in variables.items() if name not in used]
    if extra:
        rendered = rendered.rstrip() + ("\n\n" if rendered.strip() else "") + "\n".join(extra)
    return rendered


@dataclass(frozen=True)
class Segment:
    """A run of prompt tokens with a meaning the inspector can show."""

    kind: SegmentKind
    tokens: tuple[int, ...]
    message_id: int | None = None
    role: str = ""


@dataclass
class PromptPlan:
    layout: Layout
    segments: list[Segment] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        out: list[int] = []
        for segment in self.segments:
            out.extend(segment.tokens)
        return out

    def count(self, *kinds: SegmentKind) -> int:
        return sum(len(s.tokens) for s in self.segments if s.kind in kinds)


class PromptBuilder:
    """Turns texts into token segments with the model's probed chat markup."""

    def __init__(self, backend: LlamaBackend, markup: ChatMarkup) -> None:
        self.backend = backend
        self.markup = markup
        self._markup_cache: dict[str, tuple[int, ...]] = {}
        #: Documents tokenized once per (name, text): every plan of a turn holds them.
        self._document_cache: dict[tuple[str, str], Segment] = {}

    def _special(self, text: str, when: datetime.datetime | None = None) -> tuple[int, ...]:
        if when is not None:
            text = fill_dates(text, when)
        cached = self._markup_cache.get(text)
        if cached is None:
            cached = tuple(self.backend.tokenize(text, special=True))
            self._markup_cache[text] = cached
        return cached

    def _text(self, text: str) -> list[int]:
        return self.backend.tokenize(text, special=False)

    def wrap(
        self,
        wrapper: Wrapper,
        content_tokens: list[int] | tuple[int, ...],
        when: datetime.datetime | None = None,
    ) -> tuple[int, ...]:
        return (
            *self._special(wrapper.before, when),
            *content_tokens,
            *self._special(wrapper.after, when),
        )

    def wrapper_sizes(self, wrapper: Wrapper) -> tuple[int, int]:
        """Markup tokens before and after a message's content (the template's own markup)."""
        return len(self._special(wrapper.before)), len(self._special(wrapper.after))

    def user_segment(self, text: str) -> tuple[int, ...]:
        return self.wrap(self.markup.user, self._text(text))

    def assistant_segment(self, content_tokens: list[int]) -> tuple[int, ...]:
        return self.wrap(self.markup.assistant, content_tokens)

    def assistant_segment_from_text(self, text: str) -> tuple[int, ...]:
        return self.assistant_segment(self._text(text))

    def generation_prompt(self) -> tuple[int, ...]:
        return self._special(self.markup.generation_prompt)

    def content_tokens(self, text: str) -> int:
        return len(self._text(text))

    def block_segment(
        self, text: str, placement: BlockPlacement, when: datetime.datetime | None = None
    ) -> tuple[int, ...]:
        body = self._text(placement.label_open + text + placement.label_close)
        tokens = self.wrap(placement.wrapper, body, when)
        if placement.ack is not None:
            tokens = (*tokens, *self.wrap(placement.ack, self._text(BLOCK_ACK)))
        return tokens

    def document_segment(self, name: str, text: str) -> Segment:
        """An attached document: a user turn holding its text, and the assistant's short
        acknowledgement, so any template sees well-formed turns before the history. Its
        tokens depend only on the name and text, so every chat that attaches the same
        document after the same opening holds the same tokens (and pages)."""
        cached = self._document_cache.get((name, text))
        if cached is not None:
            return cached
        body = self._text(f"Document: {name}\n\n{text}")
        tokens = (
            *self.wrap(self.markup.user, body),
            *self.wrap(self.markup.assistant, self._text(BLOCK_ACK)),
        )
        if len(self._document_cache) >= 16:  # a few chats' documents, never unbounded
            self._document_cache.pop(next(iter(self._document_cache)))
        segment = Segment(SegmentKind.DOCUMENT, tokens)
        self._document_cache[(name, text)] = segment
        return segment

    def opening(
        self, layout: Layout, block_text: str, started: datetime.datetime | None = None
    ) -> Segment:
        """What starts every prompt: the block (system-first, when set) or the preamble.

        A date the template writes there (Llama 3.x's "Today Date", ``strftime_now``) is
        ``started``: the chat's first turn, so a chat's opening never changes from one
        day to the next (now when the chat has no turn yet).
        """
        when = started or datetime.datetime.now()
        if layout == Layout.SYSTEM_FIRST and block_text:
            tokens = self.block_segment(block_text, self.markup.block_first, when)
            kind = SegmentKind.BLOCK
        else:
            tokens = self._special(self.markup.preamble, when)
            kind = SegmentKind.PREAMBLE
        if self.backend.adds_bos and (not tokens or tokens[0] != self.backend.bos_token_id):
            tokens = (self.backend.bos_token_id, *tokens)
        return Segment(kind, tokens)

    def later_block(self, block_text: str) -> Segment | None:
        if not block_text:
            return None
        return Segment(SegmentKind.BLOCK, self.block_segment(block_text, self.markup.block_later))

    def rendered_text(self, tokens: list[int]) -> str:
        """The prompt as text, markup included (for the inspector's prompt view)."""
        return self.backend.detokenize(tokens, special=True)
