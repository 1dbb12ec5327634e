"""The cached-history limit and fitting a prompt into the context, for the local engine.

Trimming chooses the first message the cache holds (``chats.cache_start_seq``): the
chat's own limit first, then as many of the oldest turns as a prompt and its reply need
to fit the context. In ``shift`` mode the KV cells of the dropped turns are removed and
the rest slide down (no recompute); otherwise the rest is recomputed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.core.prompt import PromptPlan, Segment
from app.domain import SegmentKind
from app.session.engine import (
    ChatContext,
    ContextOverflowError,
    GenerationOptions,
    StateLoad,
    TrimPreview,
    group_turns,
)
from app.storage.records import Message
from app.storage.store import Store

if TYPE_CHECKING:
    from app.core.kv_mirror import KVMirror
    from app.core.llama_backend import LlamaBackend

#: Tokens kept free for a reply whatever the context: a prompt that leaves less is trimmed.
MIN_REPLY_ROOM = 16


class HistoryTrimming:
    """The local engine's trimming (a part of :class:`ChatSession`, kept on its own)."""

    store: Store
    backend: LlamaBackend
    mirror: KVMirror
    cache_chat_id: int | None

    if TYPE_CHECKING:  # provided by ChatSession; declared here for the type checker only

        @property
        def n_ctx(self) -> int:
            raise NotImplementedError

        def activate(self, chat_id: int, context: ChatContext | None = None) -> StateLoad:
            raise NotImplementedError

        def _load_context(self, chat_id: int) -> ChatContext:
            raise NotImplementedError

        def _message_tokens(self, message: Message) -> tuple[int, ...]:
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

    def _seconds_for(self, tokens: int) -> float | None:
        """Seconds a recompute of ``tokens`` takes at the measured prefill speed."""
        rate = self.mirror.prefill_tokens_per_s
        return tokens / rate if rate else None

    def _trim_start(self, messages: list[Message], limit: int | None) -> int:
        """First message seq kept so that cached history tokens stay within ``limit``."""
        if limit is None:
            return 0
        total = 0
        start = messages[-1].seq + 1 if messages else 0
        for turn in reversed(group_turns(messages)):
            size = sum(len(self._message_tokens(m)) for m in turn)
            if total + size > limit:
                break
            total += size
            start = turn[0].seq
        return start

    def _move_cache_start(self, context: ChatContext, new_start: int) -> tuple[int, int]:
        """Persist a new first cached message; in shift mode move the KV cells along.

        Returns (turns dropped, tokens dropped); ``context.chat`` is updated.
        """
        chat = context.chat
        if new_start == chat.cache_start_seq:
            return 0, 0
        old_plan = self._plan(context, with_block=False)
        dropped = [m for m in context.messages if chat.cache_start_seq <= m.seq < new_start]
        dropped_tokens = sum(len(self._message_tokens(m)) for m in dropped)
        context.chat = self.store.update_chat(chat.id, cache_start_seq=new_start)
        if (
            new_start > chat.cache_start_seq
            and chat.trim_mode == "shift"
            and self.cache_chat_id == chat.id
        ):
            anchor = len(old_plan.segments[0].tokens)
            end = anchor + dropped_tokens
            held = self.mirror.tokens
            if len(held) >= end and list(held[:end]) == old_plan.tokens[:end]:
                self.mirror.drop_range(anchor, end)  # slide the rest down: no recompute
        return (len(group_turns(dropped)) if dropped else 0), dropped_tokens

    def _drop_oldest_turn(self, context: ChatContext, exclude: int | None) -> tuple[int, int]:
        history = [m for m in context.cached_messages if m.id != exclude]
        if not history:
            return 0, 0
        groups = group_turns(history)
        next_start = groups[1][0].seq if len(groups) > 1 else history[-1].seq + 1
        return self._move_cache_start(context, next_start)

    def _enforce_limit(self, context: ChatContext) -> tuple[int, int]:
        """Apply the chat's trim limit, and keep history + block within the context."""
        start = max(
            context.chat.cache_start_seq,
            self._trim_start(context.cached_messages, context.chat.trim_tokens),
        )
        turns, tokens = self._move_cache_start(context, start)
        while len(self._plan(context, with_block=True).tokens) + 2 * MIN_REPLY_ROOM > self.n_ctx:
            more_turns, more_tokens = self._drop_oldest_turn(context, None)
            if not more_turns:
                break
            turns += more_turns
            tokens += more_tokens
        return turns, tokens

    def _fit(
        self,
        context: ChatContext,
        pending: tuple[int, ...],
        options: GenerationOptions,
        exclude: int | None = None,
    ) -> tuple[int, int]:
        """Apply the trim limit, then drop oldest turns until the prompt fits the context."""
        turns, tokens = self._enforce_limit(context)
        room = min(max(options.max_tokens, 1), max(MIN_REPLY_ROOM, self.n_ctx // 4))
        while True:
            plan = self._plan(
                context,
                with_block=True,
                pending=Segment(SegmentKind.PENDING, pending),
                exclude=exclude,
            )
            over = len(plan.tokens) + room - self.n_ctx
            if over <= 0:
                return turns, tokens
            more_turns, more_tokens = self._drop_oldest_turn(context, exclude)
            if not more_turns:
                raise ContextOverflowError(over, self.n_ctx, plan.count(SegmentKind.DOCUMENT))
            turns += more_turns
            tokens += more_tokens

    def preview_trim(self, chat_id: int, limit: int | None, mode: str | None = None) -> TrimPreview:
        context = self._load_context(chat_id)
        chat, messages = context.chat, context.messages
        start = self._trim_start(messages, limit)
        mode = mode or chat.trim_mode
        kept = [m for m in messages if m.seq >= start]
        kept_tokens = sum(len(self._message_tokens(m)) for m in kept)
        low, high = sorted((start, chat.cache_start_seq))
        moved = [m for m in messages if low <= m.seq < high]
        turns_change = len(group_turns(moved)) if moved else 0
        if start < chat.cache_start_seq:
            turns_change = -turns_change  # turns come back into the cache
        shifts = mode == "shift" and start > chat.cache_start_seq and self.backend.can_shift
        recompute = 0 if start == chat.cache_start_seq or shifts else kept_tokens
        return TrimPreview(
            limit=limit,
            mode=mode,
            cache_start_seq=start,
            dropped_message_ids=[m.id for m in messages if m.seq < start],
            turns_change=turns_change,
            kept_history_tokens=kept_tokens,
            recompute_tokens=recompute,
            recompute_seconds=self._seconds_for(recompute),
        )

    def set_trim(self, chat_id: int, limit: int | None, mode: str | None = None) -> TrimPreview:
        """Set the chat's cached-history limit and apply it now (turns may also come back)."""
        preview = self.preview_trim(chat_id, limit, mode)
        self.activate(chat_id)
        context = self._load_context(chat_id)
        context.chat = self.store.update_chat(
            chat_id, trim_tokens=limit, trim_mode=mode or context.chat.trim_mode
        )
        self._move_cache_start(context, preview.cache_start_seq)
        return preview
