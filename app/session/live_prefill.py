"""Live prefill for the local engine: the draft's prompt evaluated while it is typed.

A person types a few characters a second while the model prefills a hundred tokens or
more, so the message can be in the KV cache before Send: the draft's prompt (history ·
block · the message as a user turn · the generation prompt) is synced into the cache on
top of the warm history and block; an edit keeps the common prefix. Send then evaluates
only what differs.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from app.core.prompt import PromptPlan, Segment
from app.domain import Role, SegmentKind, Step
from app.session.engine import (
    BACKGROUND_CHUNK,
    ChatContext,
    DraftPrefill,
    ProgressCallback,
    StateLoad,
)

if TYPE_CHECKING:
    from app.core.kv_mirror import KVMirror
    from app.core.prompt import PromptBuilder

#: A draft longer than this many bytes per context token cannot fit: refused before it is
#: tokenized (a 1 MB paste must not hold the worker), as Send would refuse it.
DRAFT_BYTES_PER_TOKEN = 64


class DraftPrefilling:
    """The local engine's live prefill (a part of :class:`ChatSession`, kept on its own)."""

    mirror: KVMirror
    builder: PromptBuilder

    if TYPE_CHECKING:  # provided by ChatSession; declared here for the type checker only

        @property
        def n_ctx(self) -> int:
            raise NotImplementedError

        def activate(self, chat_id: int, context: ChatContext | None = None) -> StateLoad:
            raise NotImplementedError

        def _load_context(self, chat_id: int) -> ChatContext:
            raise NotImplementedError

        def _finish_idle_work(self, chat_id: int, cancel: threading.Event | None) -> bool:
            raise NotImplementedError

        def _plan(
            self,
            context: ChatContext,
            *,
            with_block: bool,
            pending: Segment | None = None,
            exclude: int | None = None,
            block_text: str | None = None,
        ) -> PromptPlan:
            raise NotImplementedError

    #: The chat whose draft was prefilled last, and where its message began in the
    #: prompt: what the next turn counts as typed ahead.
    _typed_ahead: tuple[int, int] | None = None

    def prefill_draft(
        self,
        chat_id: int,
        text: str,
        *,
        block_text: str | None = None,
        cancel: threading.Event | None = None,
        progress: ProgressCallback | None = None,
    ) -> DraftPrefill:
        """Evaluate the draft's prompt on top of the warm cache (see ChatEngine).

        The target ends with the generation prompt: the prompt as Send will make it, so
        Send re-evaluates only its last token (for the logits) when nothing changed. An
        edit keeps the common prefix; the mirror drops the rest (counted as discarded).
        """
        started = time.perf_counter()
        if not self.mirror.partial_removal:
            return DraftPrefill(chat_id, skipped="this model's memory cannot roll a draft back")
        if len(text.encode("utf-8", "surrogatepass")) > DRAFT_BYTES_PER_TOKEN * self.n_ctx:
            return DraftPrefill(chat_id, skipped="the draft does not fit the context")
        if not self._finish_idle_work(chat_id, cancel):
            cut = "the idle-time steps were cut short"
            return DraftPrefill(chat_id, completed=False, skipped=cut)
        context = self._load_context(chat_id)
        self.activate(chat_id, context)
        pending = None
        if text.strip():
            pending = Segment(SegmentKind.PENDING, self.builder.user_segment(text), None, Role.USER)
        base = self._plan(context, with_block=True, block_text=block_text)
        target = base.tokens
        if pending is not None:
            target = self._plan(
                context, with_block=True, pending=pending, block_text=block_text
            ).tokens
        if len(target) >= self.n_ctx:
            return DraftPrefill(chat_id, skipped="the draft does not fit the context")
        held = len(self.mirror)
        common = self.mirror.matching(target)
        synced = self.mirror.sync(
            target,
            need_logits=False,
            cancel=cancel,
            chunk=BACKGROUND_CHUNK,
            progress=progress,
            step=Step.TYPE_AHEAD,
        )
        self._typed_ahead = (chat_id, len(base.tokens)) if pending is not None else None
        return DraftPrefill(
            chat_id,
            evaluated=synced.evaluated,
            reused=synced.reused,
            discarded=max(0, held - common),
            completed=synced.completed,
            ms=(time.perf_counter() - started) * 1000,
        )

    def _typed_ahead_tokens(self, chat_id: int, reused: int) -> int:
        """The message tokens a turn reused because its draft was prefilled while typed."""
        mark, self._typed_ahead = self._typed_ahead, None
        if mark is None or mark[0] != chat_id:
            return 0
        return max(0, reused - mark[1])

