"""Continue a reply with the local engine (a part of :class:`ChatSession`, kept on its own).

The prompt is the committed history with the reply left open: what the commit puts in
the cache minus the reply's end-of-turn markup. After the idle steps (or a restore from
the saved state) only the last token is evaluated again, for its logits; right after the
reply, what the commit would do is done now. The reply stays one message, stored longer.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from app.core.kv_mirror import KVMirror, NothingToEvaluate
from app.core.llama_backend import LlamaBackend
from app.core.metrics import TurnMetrics
from app.domain import FinishReason
from app.session.engine import (
    ChatContext,
    ProgressCallback,
    SessionError,
    TokenCallback,
    Turn,
    TurnResult,
)
from app.session.generation import GeneratedReply, generate_reply
from app.storage.records import Message

if TYPE_CHECKING:
    from collections.abc import Sequence

    from app.core.chat_template import ChatMarkup
    from app.core.prompt import PromptBuilder, PromptPlan


class ContinueReply:
    """Continue (and the token ids an edited reply is stored with) for the local engine."""

    backend: LlamaBackend
    mirror: KVMirror
    builder: PromptBuilder
    markup: ChatMarkup
    _end_token: int | None
    _end_text: str

    if TYPE_CHECKING:  # provided by ChatSession; declared here for the type checker only

        def _message_tokens(self, message: Message) -> tuple[int, ...]: ...
        def _plan(
            self, context: ChatContext, *, with_block: bool, exclude: int | None = None
        ) -> PromptPlan: ...
        def _turn_metrics(self, turn: Turn) -> TurnMetrics: ...
        def _store_reply(
            self,
            turn: Turn,
            text: str,
            metrics: TurnMetrics,
            token_ids: Sequence[int] | None = None,
        ) -> TurnResult: ...

    def _respond_continue(
        self,
        turn: Turn,
        on_token: TokenCallback | None,
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
    ) -> TurnResult:
        """The committed history with the last reply left open, then more of it."""
        context, options, continued = turn.context, turn.options, turn.continues
        assert continued is not None
        before, after = self.builder.wrapper_sizes(self.markup.assistant)
        segment = self._message_tokens(continued)
        content = list(segment[before : len(segment) - after])
        plan = self._plan(context, with_block=False, exclude=continued.id)
        prompt = plan.tokens + list(segment[: len(segment) - after])
        metrics = self._turn_metrics(turn)
        metrics.prompt_tokens = len(prompt)
        metrics.history_tokens = len(prompt)
        metrics.continued_from_tokens = len(content)
        metrics.notes.append(f"continued a reply of {len(content)} tokens")
        try:
            synced = self.mirror.sync(prompt, need_logits=True, cancel=cancel, progress=progress)
        except NothingToEvaluate as error:
            raise SessionError(str(error)) from error
        if synced.fallback:
            metrics.notes.append(synced.fallback)
        metrics.reused_tokens = synced.reused
        metrics.prefill_tokens = synced.evaluated
        metrics.prefill_ms = synced.ms
        if synced.ms > 0 and synced.evaluated:
            metrics.prefill_tokens_per_s = synced.evaluated / (synced.ms / 1000)
        reply = GeneratedReply(FinishReason.CANCELLED)
        if synced.completed:
            reply = generate_reply(
                self.backend,
                self.mirror,
                self._end_token,
                self._end_text,
                options,
                metrics,
                turn.started,
                on_token,
                cancel,
            )
        metrics.finish_reason = reply.finish
        metrics.seed = options.seed
        token_ids = self.builder.assistant_segment(content + reply.tokens)
        return self._store_reply(turn, reply.text, metrics, token_ids)

    def _reply_tokens(self, text: str) -> tuple[int, ...]:
        return self.builder.assistant_segment_from_text(text)

    def _history_tokens(self, message: Message) -> tuple[int, ...]:
        return self._message_tokens(message)
