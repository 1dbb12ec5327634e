"""The cache-aware chat engine: one model, one KV cache, many persisted chats.

The engine keeps ``cache``: the exact token ids held in llama.cpp's sequence 0,
and which chat they belong to. Every request is a target token list; the engine
keeps the longest common prefix with the cache, removes the rest and evaluates
only the remainder. Layout, commit, warm-up, trim and saved states are all ways
of choosing targets so that the common prefix is as long as possible.

No Qt here: the GUI's worker thread and the CLI drive this class the same way.
It is not thread-safe; cancellation is a ``threading.Event`` set from anywhere.
"""

from __future__ import annotations

import codecs
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from app.core.chat_template import ChatMarkup, markup_for
from app.core.llama_backend import ContextFullError, DecodeError, LlamaBackend, llama_cpp_version
from app.core.metrics import TurnMetrics
from app.core.models import default_model_path, model_file_identity
from app.core.prompt import PromptBuilder, PromptPlan, Segment, render_instructions
from app.storage.records import Chat, Message, SavedState
from app.storage.store import Store

STATE_FORMAT_VERSION = 1
BACKGROUND_CHUNK = 128  # tokens per llama_decode call in commit/warm-up: cancellable in ~0.3 s
MIN_REPLY_ROOM = 16

TokenCallback = Callable[[str], None]
ProgressCallback = Callable[[str, int, int], None]


class EngineError(Exception):
    """A request the engine refuses, explained in one line."""


class ContextOverflowError(EngineError):
    def __init__(self, over: int, n_ctx: int) -> None:
        super().__init__(
            f"the message is {over} tokens over the context size of {n_ctx} tokens; "
            "shorten it or open the model with a larger context"
        )
        self.over = over
        self.n_ctx = n_ctx


@dataclass
class GenerationOptions:
    max_tokens: int = 256
    temperature: float = 0.7
    seed: int = 0


@dataclass
class StateLoad:
    restored: bool
    tokens: int = 0
    ms: float | None = None
    rejected: str | None = None


@dataclass
class TurnResult:
    chat_id: int
    user_message_id: int
    reply_message_id: int | None
    reply: str
    metrics: TurnMetrics
    metrics_id: int


@dataclass
class StepResult:
    """One background step (commit or warm-up)."""

    tokens: int
    ms: float
    completed: bool
    trimmed_turns: int = 0


@dataclass
class TrimPreview:
    limit: int | None
    mode: str
    cache_start_seq: int
    dropped_message_ids: list[int] = field(default_factory=list)
    turns_change: int = 0  # > 0: turns leave the cache; < 0: turns come back
    kept_history_tokens: int = 0
    recompute_tokens: int = 0
    recompute_seconds: float | None = None


@dataclass
class CacheView:
    """What the cache holds for the inspector: segments and sizes."""

    chat_id: int | None
    segments: list[tuple[str, int]]
    cache_tokens: int
    matching_tokens: int
    n_ctx: int
    bytes_per_token: float


def common_prefix_length(a: list[int], b: list[int]) -> int:
    limit = min(len(a), len(b))
    index = 0
    while index < limit and a[index] == b[index]:
        index += 1
    return index


def _turns(messages: list[Message]) -> list[list[Message]]:
    """Group messages into turns: a user message and the replies after it."""
    groups: list[list[Message]] = []
    for message in messages:
        if message.role == "user" or not groups:
            groups.append([message])
        else:
            groups[-1].append(message)
    return groups


class Engine:
    def __init__(
        self,
        store: Store,
        model_path: str | Path | None = None,
        *,
        n_ctx: int | None = None,
        kv_type: str = "f16",
        n_threads: int | None = None,
        load_progress: Callable[[float], None] | None = None,
    ) -> None:
        self.store = store
        path = Path(model_path) if model_path else default_model_path()
        self.backend = LlamaBackend(
            path, n_ctx=n_ctx, kv_type=kv_type, n_threads=n_threads, progress=load_progress
        )
        info = self.backend.info
        self.markup: ChatMarkup = markup_for(info.chat_template, info.bos_token, info.eos_token)
        self.builder = PromptBuilder(self.backend, self.markup)
        self.model_identity = model_file_identity(self.backend.path)
        self.token_format = f"{self.model_identity}|{self.markup.markup_hash}"
        self.cache: list[int] = []
        self.cache_chat_id: int | None = None
        self.cache_dirty = False
        self.prefill_tokens_per_s: float | None = None
        self.bytes_per_token: float = 0.0
        self._open_turn: tuple[int, int, TurnMetrics] | None = None

    # -- facts ------------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self.backend.n_ctx

    @property
    def kv_type(self) -> str:
        return self.backend.kv_type

    @property
    def backend_version(self) -> str:
        return llama_cpp_version()

    def fingerprint(self, layout: str) -> dict[str, object]:
        """What a saved state must match to be reused: anything that changes the KV values."""
        return {
            "format": STATE_FORMAT_VERSION,
            "model": self.model_identity,
            "n_ctx": self.n_ctx,
            "kv_type": self.kv_type,
            "template": self.markup.markup_hash,
            "layout": layout,
            "llama_cpp": llama_cpp_version(),
        }

    def close(self) -> None:
        self.backend.close()

    # -- the one primitive: make the cache equal a target -----------------------------

    def _sync(
        self,
        target: list[int],
        *,
        need_logits: bool,
        cancel: threading.Event | None = None,
        chunk: int | None = None,
        progress: ProgressCallback | None = None,
        phase: str = "prefill",
    ) -> tuple[int, int, bool]:
        """Keep the common prefix, evaluate the rest. Returns (reused, evaluated, completed)."""
        reused = common_prefix_length(self.cache, target)
        if need_logits and reused == len(target):
            reused -= 1  # the last token must be evaluated again to get its logits
        if reused < 0:
            raise EngineError("nothing to evaluate: the prompt is empty")
        if reused < len(self.cache):
            self.backend.remove_cells(reused, -1)
            del self.cache[reused:]
            self.cache_dirty = True
        step = min(chunk or self.backend.n_batch, self.backend.n_batch)
        position = reused
        started = time.perf_counter()
        while position < len(target):
            if cancel is not None and cancel.is_set():
                return reused, position - reused, False
            run = target[position : position + step]
            last = position + len(run) == len(target)
            try:
                self.backend.decode(run, position, logits_for_last=need_logits and last)
            except DecodeError:
                self._resync_after_error()
                raise
            self.cache.extend(run)
            self.cache_dirty = True
            position += len(run)
            if progress is not None:
                progress(phase, position - reused, len(target) - reused)
        evaluated = position - reused
        elapsed = time.perf_counter() - started
        if evaluated >= 32 and elapsed > 0:
            rate = evaluated / elapsed
            previous = self.prefill_tokens_per_s
            self.prefill_tokens_per_s = rate if previous is None else 0.5 * previous + 0.5 * rate
        return reused, evaluated, True

    def _resync_after_error(self) -> None:
        held = self.backend.last_position() + 1
        if held != len(self.cache):
            self.backend.clear()
            self.cache.clear()

    # -- chats and saved states -------------------------------------------------------

    def activate(self, chat_id: int) -> StateLoad:
        """Make ``chat_id`` the cache's chat, restoring its saved state if it is valid."""
        if self.cache_chat_id == chat_id:
            return StateLoad(restored=False, tokens=len(self.cache))
        if self.cache_chat_id is not None and self.cache_dirty:
            self.save_state(self.cache_chat_id)
        started = time.perf_counter()
        self.backend.clear()
        self.cache = []
        self.cache_chat_id = chat_id
        self.cache_dirty = False
        saved = self.store.load_state(chat_id)
        if saved is None:
            return StateLoad(restored=False)
        chat = self.store.chat(chat_id)
        reason = self._reject_reason(saved, chat)
        if reason is None and not self.backend.set_state(saved.state):
            reason = "llama.cpp rejected the saved state"
        if reason is None:
            held = self.backend.last_position() + 1
            if held != len(saved.token_ids) or self.backend.first_position() not in (0, -1):
                reason = f"the saved state holds {held} cells but {len(saved.token_ids)} token ids"
        if reason is not None:
            self.backend.clear()
            self.store.delete_state(chat_id)
            return StateLoad(
                restored=False, ms=(time.perf_counter() - started) * 1000, rejected=reason
            )
        self.cache = list(saved.token_ids)
        if self.cache:
            self.bytes_per_token = len(saved.state) / len(self.cache)
        return StateLoad(
            restored=True, tokens=len(self.cache), ms=(time.perf_counter() - started) * 1000
        )

    def _reject_reason(self, saved: SavedState, chat: Chat) -> str | None:
        if saved.format_version != STATE_FORMAT_VERSION:
            return f"saved-state format {saved.format_version} is not {STATE_FORMAT_VERSION}"
        expected = self.fingerprint(chat.layout)
        differences = [
            f"{key} {saved.fingerprint.get(key)!r} != {value!r}"
            for key, value in expected.items()
            if saved.fingerprint.get(key) != value
        ]
        if differences:
            return "saved with different settings: " + "; ".join(differences)
        if zlib.crc32(saved.state) != saved.checksum:
            return "checksum mismatch: the saved state is truncated or corrupt"
        return None

    def save_state(self, chat_id: int) -> tuple[int, float]:
        """Persist the cache of ``chat_id`` (its token ids travel with it). Returns (bytes, ms)."""
        if self.cache_chat_id != chat_id:
            raise EngineError("the cache does not hold this chat")
        started = time.perf_counter()
        if not self.cache:
            self.store.delete_state(chat_id)
            self.cache_dirty = False
            return 0, (time.perf_counter() - started) * 1000
        chat = self.store.chat(chat_id)
        data = self.backend.get_state()
        history = self._history_plan(chat)
        history_tokens = common_prefix_length(self.cache, history.tokens)
        self.store.save_state(
            SavedState(
                chat_id=chat_id,
                format_version=STATE_FORMAT_VERSION,
                fingerprint=self.fingerprint(chat.layout),
                token_ids=list(self.cache),
                history_tokens=history_tokens,
                state=data,
                checksum=zlib.crc32(data),
            )
        )
        self.cache_dirty = False
        self.bytes_per_token = len(data) / len(self.cache)
        return len(data), (time.perf_counter() - started) * 1000

    def forget_chat(self, chat_id: int) -> None:
        """Drop the cache if it belongs to ``chat_id`` (the chat is being deleted)."""
        if self.cache_chat_id == chat_id:
            self.backend.clear()
            self.cache = []
            self.cache_chat_id = None
            self.cache_dirty = False

    # -- prompt plans -----------------------------------------------------------------

    def _block_text(self, chat_id: int) -> str:
        current = self.store.current_instructions(chat_id)
        if current is None:
            return ""
        return render_instructions(current.text, current.variables)

    def _message_tokens(self, message: Message) -> tuple[int, ...]:
        if message.token_format == self.token_format and message.token_ids:
            return tuple(message.token_ids)
        # Another model or template wrote these tokens: only now is text re-tokenized.
        if message.role == "user":
            tokens = self.builder.user_segment(message.text)
        else:
            tokens = self.builder.assistant_segment_from_text(message.text)
        self.store.set_message_tokens(message.id, list(tokens), self.token_format)
        return tokens

    def _history_segments(self, chat: Chat, messages: list[Message]) -> list[Segment]:
        return [
            Segment("message", self._message_tokens(m), m.id, m.role)
            for m in messages
            if m.seq >= chat.cache_start_seq
        ]

    def _history_plan(
        self, chat: Chat, *, with_block: bool = False, block_text: str | None = None
    ) -> PromptPlan:
        """The committed history (plus the block on top, for history-first warm-up)."""
        block = self._block_text(chat.id) if block_text is None else block_text
        messages = self.store.messages(chat.id)
        plan = PromptPlan(chat.layout, [self.builder.opening(chat.layout, block)])
        plan.segments.extend(self._history_segments(chat, messages))
        if with_block and chat.layout == "history-first":
            later = self.builder.later_block(block)
            if later is not None:
                plan.segments.append(later)
        return plan

    def _turn_plan(self, chat: Chat, messages: list[Message], pending: Segment) -> PromptPlan:
        block = self._block_text(chat.id)
        plan = PromptPlan(chat.layout, [self.builder.opening(chat.layout, block)])
        plan.segments.extend(self._history_segments(chat, messages))
        if chat.layout == "history-first":
            later = self.builder.later_block(block)
            if later is not None:
                plan.segments.append(later)
        plan.segments.append(pending)
        plan.segments.append(Segment("generation", self.builder.generation_prompt()))
        return plan

    def prompt_plan(self, chat_id: int, new_message: str | None = None) -> PromptPlan:
        """The prompt the next turn would send (for the inspector and tests)."""
        chat = self.store.chat(chat_id)
        messages = self.store.messages(chat_id)
        if new_message is None and messages and messages[-1].role == "user":
            pending = Segment(
                "pending", self._message_tokens(messages[-1]), messages[-1].id, "user"
            )
            messages = messages[:-1]
        else:
            pending = Segment("pending", self.builder.user_segment(new_message or ""), None, "user")
        return self._turn_plan(chat, messages, pending)

    def rendered_prompt(self, chat_id: int, new_message: str | None = None) -> str:
        return self.builder.rendered_text(self.prompt_plan(chat_id, new_message).tokens)

    # -- trimming ---------------------------------------------------------------------

    def _trim_start(self, chat: Chat, messages: list[Message], limit: int | None) -> int:
        """First message seq kept so that cached history tokens stay within ``limit``."""
        if limit is None:
            return 0
        total = 0
        start = messages[-1].seq + 1 if messages else 0
        for turn in reversed(_turns(messages)):
            size = sum(len(self._message_tokens(m)) for m in turn)
            if total + size > limit:
                break
            total += size
            start = turn[0].seq
        return start

    def _move_cache_start(self, chat: Chat, new_start: int) -> tuple[Chat, int, int]:
        """Persist a new first cached message; in shift mode move the KV cells along.

        Returns (chat, turns dropped, tokens dropped).
        """
        if new_start == chat.cache_start_seq:
            return chat, 0, 0
        messages = self.store.messages(chat.id)
        old_plan = self._history_plan(chat)
        dropped = [m for m in messages if chat.cache_start_seq <= m.seq < new_start]
        dropped_tokens = sum(len(self._message_tokens(m)) for m in dropped)
        updated = self.store.update_chat(chat.id, cache_start_seq=new_start)
        if (
            new_start > chat.cache_start_seq
            and chat.trim_mode == "shift"
            and self.cache_chat_id == chat.id
            and self.backend.can_shift
        ):
            anchor = len(old_plan.segments[0].tokens)
            end = anchor + dropped_tokens
            if len(self.cache) >= end and self.cache[:end] == old_plan.tokens[:end]:
                # Drop the oldest turns' cells and slide the rest down: no recompute.
                self.backend.remove_cells(anchor, end)
                if len(self.cache) > end:
                    self.backend.shift_cells(end, -1, -dropped_tokens)
                self.cache = self.cache[:anchor] + self.cache[end:]
                self.cache_dirty = True
        return updated, len(_turns(dropped)) if dropped else 0, dropped_tokens

    def _drop_oldest_turn(self, chat: Chat, exclude: int | None = None) -> tuple[Chat, int, int]:
        history = [
            m
            for m in self.store.messages(chat.id)
            if m.seq >= chat.cache_start_seq and m.id != exclude
        ]
        if not history:
            return chat, 0, 0
        groups = _turns(history)
        next_start = groups[1][0].seq if len(groups) > 1 else history[-1].seq + 1
        return self._move_cache_start(chat, next_start)

    def _enforce_limit(self, chat: Chat) -> tuple[Chat, int, int]:
        """Apply the chat's trim limit, and keep history + block within the context."""
        messages = [m for m in self.store.messages(chat.id) if m.seq >= chat.cache_start_seq]
        start = max(chat.cache_start_seq, self._trim_start(chat, messages, chat.trim_tokens))
        chat, turns, tokens = self._move_cache_start(chat, start)
        while (
            len(self._history_plan(chat, with_block=True).tokens) + 2 * MIN_REPLY_ROOM > self.n_ctx
        ):
            chat, more_turns, more_tokens = self._drop_oldest_turn(chat)
            if not more_turns:
                break
            turns += more_turns
            tokens += more_tokens
        return chat, turns, tokens

    def preview_trim(self, chat_id: int, limit: int | None, mode: str | None = None) -> TrimPreview:
        chat = self.store.chat(chat_id)
        messages = self.store.messages(chat_id)
        start = self._trim_start(chat, messages, limit)
        mode = mode or chat.trim_mode
        kept = [m for m in messages if m.seq >= start]
        kept_tokens = sum(len(self._message_tokens(m)) for m in kept)
        low, high = sorted((start, chat.cache_start_seq))
        moved = [m for m in messages if low <= m.seq < high]
        turns_change = len(_turns(moved)) if moved else 0
        if start < chat.cache_start_seq:
            turns_change = -turns_change  # turns come back into the cache
        shifts = mode == "shift" and start > chat.cache_start_seq and self.backend.can_shift
        recompute = 0 if start == chat.cache_start_seq or shifts else kept_tokens
        seconds = recompute / self.prefill_tokens_per_s if self.prefill_tokens_per_s else None
        return TrimPreview(
            limit=limit,
            mode=mode,
            cache_start_seq=start,
            dropped_message_ids=[m.id for m in messages if m.seq < start],
            turns_change=turns_change,
            kept_history_tokens=kept_tokens,
            recompute_tokens=recompute,
            recompute_seconds=seconds,
        )

    def set_trim(self, chat_id: int, limit: int | None, mode: str | None = None) -> TrimPreview:
        """Set the chat's cached-history limit and apply it now (turns may also come back)."""
        preview = self.preview_trim(chat_id, limit, mode)
        chat = self.store.update_chat(
            chat_id, trim_tokens=limit, trim_mode=mode or self.store.chat(chat_id).trim_mode
        )
        self._move_cache_start(chat, preview.cache_start_seq)
        return preview

    # -- a turn -----------------------------------------------------------------------

    def send(
        self,
        chat_id: int,
        text: str,
        options: GenerationOptions | None = None,
        *,
        on_token: TokenCallback | None = None,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> TurnResult:
        """Store the user's message, then generate and store the reply."""
        if not text.strip():
            raise EngineError("the message is empty")
        options = options or GenerationOptions()
        started = time.perf_counter()
        load = self.activate(chat_id)
        chat = self.store.chat(chat_id)
        pending_tokens = self.builder.user_segment(text)
        chat, trimmed_turns, trimmed_tokens = self._fit(chat, pending_tokens, options)
        instructions = self.store.current_instructions(chat_id)
        user = self.store.add_message(
            chat_id,
            "user",
            text,
            token_ids=list(pending_tokens),
            token_format=self.token_format,
            instruction_version=instructions.version if instructions else None,
        )
        return self._respond(
            chat,
            user,
            load,
            options,
            started,
            trimmed_turns,
            trimmed_tokens,
            on_token=on_token,
            progress=progress,
            cancel=cancel,
        )

    def regenerate(
        self,
        chat_id: int,
        options: GenerationOptions | None = None,
        *,
        on_token: TokenCallback | None = None,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> TurnResult:
        """Replace the last reply (or answer a last unanswered message)."""
        options = options or GenerationOptions()
        started = time.perf_counter()
        load = self.activate(chat_id)
        messages = self.store.messages(chat_id)
        while messages and messages[-1].role == "assistant":
            self.store.delete_message(messages.pop().id)
        if not messages:
            raise EngineError("there is no message to reply to")
        chat = self.store.chat(chat_id)
        user = messages[-1]
        chat, trimmed_turns, trimmed_tokens = self._fit(
            chat, self._message_tokens(user), options, exclude=user.id
        )
        return self._respond(
            chat,
            user,
            load,
            options,
            started,
            trimmed_turns,
            trimmed_tokens,
            on_token=on_token,
            progress=progress,
            cancel=cancel,
        )

    def _fit(
        self,
        chat: Chat,
        pending: tuple[int, ...],
        options: GenerationOptions,
        exclude: int | None = None,
    ) -> tuple[Chat, int, int]:
        """Apply the trim limit, then drop oldest turns until the prompt fits the context."""
        chat, turns, tokens = self._enforce_limit(chat)
        room = min(max(options.max_tokens, 1), max(MIN_REPLY_ROOM, self.n_ctx // 4))
        while True:
            messages = [m for m in self.store.messages(chat.id) if m.id != exclude]
            plan = self._turn_plan(chat, messages, Segment("pending", pending))
            over = len(plan.tokens) + room - self.n_ctx
            if over <= 0:
                return chat, turns, tokens
            chat, more_turns, more_tokens = self._drop_oldest_turn(chat, exclude)
            if not more_turns:
                raise ContextOverflowError(over, self.n_ctx)
            turns += more_turns
            tokens += more_tokens

    def _respond(
        self,
        chat: Chat,
        user: Message,
        load: StateLoad,
        options: GenerationOptions,
        started: float,
        trimmed_turns: int,
        trimmed_tokens: int,
        *,
        on_token: TokenCallback | None,
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
    ) -> TurnResult:
        messages = [m for m in self.store.messages(chat.id) if m.id != user.id]
        pending = Segment("pending", self._message_tokens(user), user.id, "user")
        plan = self._turn_plan(chat, messages, pending)
        prompt = plan.tokens
        metrics = TurnMetrics(
            layout=chat.layout,
            trim_mode=chat.trim_mode,
            prompt_tokens=len(prompt),
            message_tokens=self.builder.content_tokens(user.text),
            block_tokens=plan.count("block"),
            history_tokens=plan.count("preamble", "message")
            + (plan.count("block") if chat.layout == "system-first" else 0),
            state_load_ms=load.ms if (load.restored or load.rejected) else None,
            state_rejected=load.rejected,
            trimmed_turns=trimmed_turns,
            trimmed_tokens=trimmed_tokens,
        )
        if load.rejected:
            metrics.notes.append(f"saved state discarded: {load.rejected}")
        prefill_started = time.perf_counter()
        reused, evaluated, completed = self._sync(
            prompt, need_logits=True, cancel=cancel, progress=progress
        )
        metrics.reused_tokens = reused
        metrics.prefill_tokens = evaluated
        metrics.prefill_ms = (time.perf_counter() - prefill_started) * 1000
        if metrics.prefill_ms > 0 and evaluated:
            metrics.prefill_tokens_per_s = evaluated / (metrics.prefill_ms / 1000)
        if (
            chat.layout == "system-first"
            and reused < metrics.history_tokens
            and metrics.history_tokens
        ):
            metrics.notes.append(
                f"system-first: {metrics.history_tokens - reused} history tokens recomputed"
            )
        content: list[int] = []
        text_parts: list[str] = []
        finish = "cancelled"
        if completed:
            finish = self._generate(
                options, content, text_parts, metrics, started, on_token, cancel
            )
        metrics.finish_reason = finish
        reply_text = "".join(text_parts)
        reply_id = None
        instructions = self.store.current_instructions(chat.id)
        if content:
            reply = self.store.add_message(
                chat.id,
                "assistant",
                reply_text,
                token_ids=list(self.builder.assistant_segment(content)),
                token_format=self.token_format,
                status="complete" if finish != "cancelled" else "cancelled",
                instruction_version=instructions.version if instructions else None,
            )
            reply_id = reply.id
        metrics.cache_tokens = len(self.cache)
        metrics_id = self.store.add_metrics(chat.id, reply_id or user.id, metrics.as_dict())
        self._open_turn = (chat.id, metrics_id, metrics)
        return TurnResult(chat.id, user.id, reply_id, reply_text, metrics, metrics_id)

    def _generate(
        self,
        options: GenerationOptions,
        content: list[int],
        text_parts: list[str],
        metrics: TurnMetrics,
        started: float,
        on_token: TokenCallback | None,
        cancel: threading.Event | None,
    ) -> str:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        finish = "length"
        decode_started = time.perf_counter()
        with self.backend.make_sampler(options.temperature, options.seed) as sampler:
            for index in range(options.max_tokens):
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                token = sampler.sample()
                if index == 0:
                    metrics.ttft_ms = (time.perf_counter() - started) * 1000
                    decode_started = time.perf_counter()
                if self.backend.is_end_of_generation(token):
                    finish = "stop"
                    break
                content.append(token)
                piece = decoder.decode(self.backend.token_bytes(token))
                if piece:
                    text_parts.append(piece)
                    if on_token is not None:
                        on_token(piece)
                if index == options.max_tokens - 1:
                    break  # the last token need not be evaluated
                if len(self.cache) >= self.n_ctx:
                    finish = "context full"
                    break
                try:
                    self.backend.decode([token], len(self.cache), logits_for_last=True)
                except ContextFullError:
                    finish = "context full"
                    break
                self.cache.append(token)
                self.cache_dirty = True
        tail = decoder.decode(b"", final=True)
        if tail:
            text_parts.append(tail)
            if on_token is not None:
                on_token(tail)
        metrics.decode_tokens = len(content)
        metrics.decode_ms = (time.perf_counter() - decode_started) * 1000
        if metrics.decode_ms > 0 and len(content) > 1:
            metrics.decode_tokens_per_s = (len(content) - 1) / (metrics.decode_ms / 1000)
        return finish

    # -- background steps -------------------------------------------------------------

    def commit(self, chat_id: int, cancel: threading.Event | None = None) -> StepResult:
        """Make the cache hold exactly the committed history (no instruction block in it).

        history-first: the block and everything after it leave the cache, then the new
        user message and the reply are evaluated on top of the history.
        """
        self.activate(chat_id)
        chat = self.store.chat(chat_id)
        chat, turns, tokens = self._enforce_limit(chat)
        started = time.perf_counter()
        target = self._history_plan(chat).tokens
        _, evaluated, completed = self._sync(
            target, need_logits=False, cancel=cancel, chunk=BACKGROUND_CHUNK, phase="commit"
        )
        result = StepResult(evaluated, (time.perf_counter() - started) * 1000, completed, turns)
        self._record_background("commit", result, tokens)
        return result

    def warm_up(self, chat_id: int, cancel: threading.Event | None = None) -> StepResult:
        """history-first: evaluate the current instruction block on top of the history."""
        self.activate(chat_id)
        chat = self.store.chat(chat_id)
        started = time.perf_counter()
        target = self._history_plan(chat, with_block=True).tokens
        _, evaluated, completed = self._sync(
            target, need_logits=False, cancel=cancel, chunk=BACKGROUND_CHUNK, phase="warm-up"
        )
        result = StepResult(evaluated, (time.perf_counter() - started) * 1000, completed)
        self._record_background("warm-up", result, 0)
        return result

    def finish_turn(self, chat_id: int) -> TurnMetrics | None:
        """Save the state and complete the last turn's metrics with background figures."""
        size, save_ms = self.save_state(chat_id)
        turn = self._open_turn
        if turn is None or turn[0] != chat_id:
            return None
        _, metrics_id, metrics = turn
        metrics.state_bytes = size
        metrics.state_save_ms = save_ms
        metrics.cache_tokens = len(self.cache)
        self.store.update_metrics(metrics_id, metrics.as_dict())
        self._open_turn = None
        return metrics

    def after_reply(
        self, chat_id: int, cancel: threading.Event | None = None
    ) -> TurnMetrics | None:
        """Commit, warm up and save: what the CLI runs before exiting."""
        self.commit(chat_id, cancel)
        self.warm_up(chat_id, cancel)
        return self.finish_turn(chat_id)

    def _record_background(self, step: str, result: StepResult, trimmed_tokens: int) -> None:
        turn = self._open_turn
        if turn is None or turn[0] != self.cache_chat_id:
            return
        metrics = turn[2]
        if step == "commit":
            metrics.commit_tokens += result.tokens
            metrics.commit_ms += result.ms
            metrics.trimmed_turns += result.trimmed_turns
            metrics.trimmed_tokens += trimmed_tokens
        else:
            metrics.warmup_tokens += result.tokens
            metrics.warmup_ms += result.ms
        metrics.background_tokens = metrics.commit_tokens + metrics.warmup_tokens
        metrics.cache_tokens = len(self.cache)

    # -- inspector helpers ------------------------------------------------------------

    def edit_cost(
        self, chat_id: int, block_text: str, layout: str | None = None
    ) -> tuple[int, float | None]:
        """Tokens (and seconds at the measured speed) a new instruction block would recompute."""
        chat = self.store.chat(chat_id)
        if layout and layout != chat.layout:
            chat = Chat(**{**chat.__dict__, "layout": layout})
        target = self._history_plan(chat, with_block=True, block_text=block_text).tokens
        if self.cache_chat_id == chat_id:
            held = self.cache
        else:
            saved = self.store.load_state(chat_id)
            held = saved.token_ids if saved else []
        cost = len(target) - common_prefix_length(held, target)
        seconds = cost / self.prefill_tokens_per_s if self.prefill_tokens_per_s else None
        return cost, seconds

    def cache_view(self, chat_id: int) -> CacheView:
        chat = self.store.chat(chat_id)
        plan = self._history_plan(chat, with_block=True)
        held = self.cache if self.cache_chat_id == chat_id else []
        segments: list[tuple[str, int]] = []
        for segment in plan.segments:
            label = {"preamble": "preamble", "block": "instruction block"}.get(
                segment.kind, "history"
            )
            if segments and segments[-1][0] == label:
                segments[-1] = (label, segments[-1][1] + len(segment.tokens))
            else:
                segments.append((label, len(segment.tokens)))
        target = plan.tokens
        matching = common_prefix_length(held, target)
        if len(held) > matching:
            segments.append(("new message + reply", len(held) - matching))
        return CacheView(
            chat_id=self.cache_chat_id,
            segments=segments,
            cache_tokens=len(held),
            matching_tokens=matching,
            n_ctx=self.n_ctx,
            bytes_per_token=self.bytes_per_token,
        )
