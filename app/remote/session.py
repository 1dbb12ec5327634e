"""Chats on an OpenAI-compatible server, driven exactly like the local :class:`ChatSession`.

The server keeps the KV cache; the client decides what it holds next by what it sends,
just as the local session does with target token lists. The prompt is a list of chat
messages in the layout's order (history-first: history, the instruction block, the new
message), so the server's prefix cache reuses the history after an instruction edit.
The idle-time steps keep their meaning:

- commit + warm-up are one request here (history, new message, reply, then the block,
  with ``max_tokens`` 0, or 1 where the server refuses 0): a chat-completions request
  cannot end on a finished assistant turn, and the warm-up prompt starts with exactly
  what the commit would have evaluated;
- live prefill (``prefill_draft``, off unless ``live_prefill`` is set: it costs server
  work per burst of keystrokes) sends the draft the same way, as the pending user
  message with ``max_tokens`` 0. llama-server evaluates the prompt into the chat's slot
  (reusing its longest common prefix with what the slot holds, ``cache_prompt``) and
  answers at once with no token; the slot then holds the draft's prompt, so the send
  reuses it up to the first token that differs;
- save writes the chat's llama-server slot to a file on the server
  (``/slots/{id}?action=save``) and the next activation restores it, when the server
  runs with ``--slot-save-path``.

The turn API is :class:`ChatEngine`'s; this class supplies only what differs. Figures
come from the server: ``reused_tokens`` is its cached count, ``prefill_tokens`` the
prompt tokens it did not have cached. TTFT and decode speed are measured on the client.
Messages are stored without token ids (the server tokenizes), so the local engine
re-tokenizes them if the chat is opened there later.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, replace

from app import limits
from app.core.chat_template import BLOCK_ACK, BLOCK_LABEL_CLOSE, BLOCK_LABEL_OPEN
from app.core.metrics import TurnMetrics
from app.domain import FinishReason, Layout, Sampling, Step
from app.remote.client import (
    DEFAULT_SERVER_TIMEOUT_S,
    ChatCompletion,
    ServerClient,
    ServerError,
    ServerInfo,
    ServerRefused,
    StreamDropped,
)
from app.session.engine import (
    IDLE_STEPS,
    CacheView,
    ChatContext,
    ChatEngine,
    DraftPrefill,
    EngineDescription,
    GenerationOptions,
    PreparedMessage,
    ProgressCallback,
    SessionError,
    StateLoad,
    StateSave,
    StepResult,
    TokenCallback,
    TrimPreview,
    Turn,
    TurnResult,
)
from app.storage.store import Store

ENGINE = "server"
#: Placements of the instruction block after the history, best first: the marked user
#: turn is for servers whose template refuses a system message after the history.
BLOCK_ROLES = ("system", "user", "user+ack")

__all__ = ["ENGINE", "RemoteChatSession", "ServerCache", "ServerError"]


@dataclass
class ServerCache:
    """What the client knows one server slot holds (the server has the cells)."""

    chat_id: int | None = None
    tokens: int = 0
    changed: bool = False

    def __len__(self) -> int:
        return self.tokens


def _finish(completion: ChatCompletion) -> FinishReason:
    if completion.cancelled:
        return FinishReason.CANCELLED
    if completion.finish_reason == "length":
        return FinishReason.LENGTH
    return FinishReason.STOP


class RemoteChatSession(ChatEngine):
    """The server engine: the chats of one store on one server model; each chat is
    pinned to one slot."""

    def __init__(
        self,
        store: Store,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_SERVER_TIMEOUT_S,
    ) -> None:
        super().__init__(store)
        self.client = ServerClient(base_url, model, api_key=api_key, read_timeout=timeout_s)
        try:
            self.info: ServerInfo = self.client.connect()
        except BaseException:
            self.client.close()
            raise
        self.slots: dict[int, ServerCache] = {}
        self.prefill_tokens_per_s = 0.0
        self.block_role = BLOCK_ROLES[0]
        self.warmup_max_tokens = 0  # 1 once the server refuses 0
        identity = f"{store.path.resolve()}|{self.info.model}|{self.info.build}"
        self._file_key = hashlib.sha1(identity.encode()).hexdigest()[:12]
        self.model_identity = f"server|{self.info.base_url}|{self.info.model}"
        self._skip_cache_once = False
        #: Live prefill of drafts (requests that generate nothing): off by default.
        self.live_prefill = False

    # -- facts ------------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self.info.n_ctx

    @property
    def kv_type(self) -> str:
        return ENGINE

    @property
    def backend_version(self) -> str:
        return self.info.build or self.info.kind

    @property
    def model_info(self) -> ServerInfo:
        return self.info

    def describe(self) -> EngineDescription:
        return EngineDescription(
            kind=ENGINE,
            path=self.info.base_url,
            name=self.info.model.rsplit("/", 1)[-1],
            description=self.info.summary(),
            n_params=0,
            size_bytes=0,
            n_ctx=self.n_ctx,
            kv_type=self.kv_type,
            backend_version=self.backend_version,
        )

    @property
    def idle_order(self) -> tuple[Step, ...]:
        """The server keeps its own cells: the usual order of the idle-time steps applies."""
        return IDLE_STEPS

    @property
    def held(self) -> ServerCache:
        """What the slot of the cache's chat holds."""
        if self.cache_chat_id is None:
            return ServerCache()
        slot = self.slot_for(self.cache_chat_id)
        return self.slots.setdefault(slot, ServerCache(self.cache_chat_id))

    @property
    def cache_size(self) -> int:
        return self.held.tokens

    @property
    def has_unsaved_cache(self) -> bool:
        return any(cache.changed for cache in self.slots.values())

    def slot_for(self, chat_id: int) -> int:
        return chat_id % max(1, self.info.total_slots)

    def state_file(self, chat_id: int) -> str:
        """The slot file's name on the server: one per store, model and chat."""
        return f"kvchat-{self._file_key}-{chat_id}.bin"

    def close(self) -> None:
        self.client.close()

    # -- chats and saved slots ------------------------------------------------------------

    def activate(self, chat_id: int, context: ChatContext | None = None) -> StateLoad:
        """Make ``chat_id`` its slot's chat: save the slot's previous chat, restore this one."""
        self.cache_chat_id = chat_id
        slot = self.slot_for(chat_id)
        held = self.slots.get(slot)
        if held is not None and held.chat_id == chat_id:
            return StateLoad(restored=False, tokens=held.tokens)
        if held is not None and held.changed and held.chat_id is not None:
            self._save_slot(slot, held)
        cache = ServerCache(chat_id)
        self.slots[slot] = cache
        if not self.info.slot_save:
            return StateLoad(restored=False)
        started = time.perf_counter()
        try:
            done = self.client.slot_action(slot, "restore", self.state_file(chat_id))
        except ServerError:
            return StateLoad(restored=False)  # no saved slot yet (or the server lost it)
        cache.tokens = max(0, done.n_restored)
        read = max(0, done.n_read)
        if cache.tokens:
            self.bytes_per_token = read / cache.tokens
        ms = (time.perf_counter() - started) * 1000
        return StateLoad(restored=True, tokens=cache.tokens, ms=ms, bytes=read)

    def _cache_moved(self, from_chat_id: int, to_chat_id: int) -> None:
        """A regenerated reply went into a branch: when both chats use the same slot, the
        slot's cells are the branch's now (else the branch's own slot is filled later)."""
        slot = self.slot_for(from_chat_id)
        held = self.slots.get(slot)
        if held is None or held.chat_id != from_chat_id or slot != self.slot_for(to_chat_id):
            return
        held.chat_id = to_chat_id
        if self.cache_chat_id == from_chat_id:
            self.cache_chat_id = to_chat_id

    def _save_slot(self, slot: int, cache: ServerCache) -> StateSave:
        if cache.chat_id is None or not self.info.slot_save:
            cache.changed = False
            return StateSave(bytes=0, ms=0.0)
        started = time.perf_counter()
        done = self.client.slot_action(slot, "save", self.state_file(cache.chat_id))
        cache.changed = False
        written = max(0, done.n_written)
        saved_tokens = max(0, done.n_saved)
        if saved_tokens:
            cache.tokens = saved_tokens
            self.bytes_per_token = written / saved_tokens
        ms = (time.perf_counter() - started) * 1000
        return StateSave(bytes=written, ms=ms, written=written)  # the whole slot, on the server

    def save_state(self, chat_id: int) -> StateSave:
        """Write the chat's slot to its file on the server (nothing without slot saving)."""
        slot = self.slot_for(chat_id)
        cache = self.slots.get(slot)
        if cache is None or cache.chat_id != chat_id:
            raise SessionError("the server slot does not hold this chat")
        return self._save_slot(slot, cache)

    def save_if_changed(self) -> StateSave | None:
        saved = None
        for slot, cache in self.slots.items():
            if cache.changed:
                saved = self._save_slot(slot, cache)
        return saved

    def drop_cache(self) -> None:
        """Empty this session's slots on the server: the next turn recomputes everything."""
        for slot in self.slots:
            if self.info.slot_save:
                self.client.slot_action(slot, "erase", "")
            else:
                self._skip_cache_once = True  # cannot erase: ask for no reuse instead
        self.slots.clear()

    def forget_chat(self, chat_id: int) -> None:
        slot = self.slot_for(chat_id)
        if slot in self.slots and self.slots[slot].chat_id == chat_id:
            del self.slots[slot]
        if self.cache_chat_id == chat_id:
            self.cache_chat_id = None

    # -- prompts ------------------------------------------------------------------------

    def _later_block(self, block: str) -> list[dict[str, str]]:
        if self.block_role == "system":
            return [{"role": "system", "content": block}]
        marked = [{"role": "user", "content": BLOCK_LABEL_OPEN + block + BLOCK_LABEL_CLOSE}]
        if self.block_role == "user+ack":
            marked.append({"role": "assistant", "content": BLOCK_ACK})
        return marked

    def chat_messages(
        self,
        context: ChatContext,
        *,
        with_block: bool,
        pending: str | None = None,
        exclude: int | None = None,
    ) -> list[dict[str, str]]:
        """The layout's order as chat messages (what the server renders and caches)."""
        chat, block = context.chat, context.block_text
        messages: list[dict[str, str]] = []
        if chat.layout == Layout.SYSTEM_FIRST and block:
            messages.append({"role": "system", "content": block})
        messages.extend(
            {"role": str(m.role), "content": m.text}
            for m in context.cached_messages
            if m.id != exclude
        )
        if with_block and chat.layout == Layout.HISTORY_FIRST and block:
            messages.extend(self._later_block(block))
        if pending is not None:
            messages.append({"role": "user", "content": pending})
        return messages

    def _has_late_block(self, context: ChatContext) -> bool:
        return context.chat.layout == Layout.HISTORY_FIRST and bool(context.block_text)

    def _complete(
        self,
        context: ChatContext,
        *,
        pending: str | None,
        exclude: int | None,
        max_tokens: int,
        options: GenerationOptions,
        on_text: TokenCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> ChatCompletion:
        """One request; a template that refuses the late system message gets the fallback."""
        while True:
            messages = self.chat_messages(
                context, with_block=True, pending=pending, exclude=exclude
            )
            try:
                reuse = not self._skip_cache_once
                self._skip_cache_once = False
                return self.client.chat(
                    messages,
                    reuse=reuse,
                    max_tokens=max_tokens,
                    temperature=options.temperature,
                    seed=options.seed,
                    sampling=_request_sampling(options.sampling),
                    slot=self.slot_for(context.chat.id),
                    on_text=on_text,
                    cancel=cancel,
                )
            except ServerRefused as error:
                if not self._refused_block(error, context):
                    raise
                self.block_role = BLOCK_ROLES[BLOCK_ROLES.index(self.block_role) + 1]

    def _refused_block(self, error: ServerRefused, context: ChatContext) -> bool:
        """The template refused the late instruction block's role: try the next role."""
        return (
            error.refused_roles
            and self._has_late_block(context)
            and self.block_role != BLOCK_ROLES[-1]
        )

    def _count(self, text: str, cancel: threading.Event | None = None) -> int:
        """Content tokens of ``text`` as the server counts them (0 if it cannot say)."""
        if not text or self.info.kind != "llama-server":
            return 0
        return self.client.tokenize(text, cancel) or 0

    # -- a turn -------------------------------------------------------------------------

    def _prepare_message(
        self,
        context: ChatContext,
        text: str,
        options: GenerationOptions,
        exclude: int | None = None,
    ) -> PreparedMessage:
        """The server tokenizes (no ids are stored) and fits its own context. Documents
        are refused before the message is stored: the server engine does not send them."""
        if context.documents or context.chat.no_history:
            raise SessionError(
                "documents and independent questions need the local engine (not a server yet)"
            )
        return PreparedMessage(None)

    def _respond(
        self,
        turn: Turn,
        on_token: TokenCallback | None,
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
    ) -> TurnResult:
        context, user, options = turn.context, turn.user, turn.options
        chat = context.chat
        load = turn.load
        metrics = self._turn_metrics(turn)
        metrics.engine = ENGINE
        metrics.message_tokens = self._count(user.text, cancel)
        metrics.block_tokens = self._count(context.block_text, cancel)
        if load.restored:
            metrics.notes.append(f"server slot restored: {load.tokens} tokens")
        sent = time.perf_counter()
        try:
            completion = self._complete(
                context,
                pending=user.text,
                exclude=user.id,
                max_tokens=options.max_tokens,
                options=options,
                on_text=on_token,
                cancel=cancel,
            )
        except StreamDropped as dropped:
            partial = dropped.partial
            if not partial.text:
                raise
            metrics.finish_reason = FinishReason.CANCELLED
            metrics.decode_tokens = partial.pieces
            metrics.notes.append(str(dropped))
            self.held.changed = True
            self._store_reply(turn, partial.text, metrics)
            raise ServerError(f"{dropped}; the partial reply is stored as cancelled") from dropped
        self._fill_metrics(metrics, completion, turn.started, sent)
        if chat.layout == Layout.SYSTEM_FIRST and completion.evaluated_tokens > (
            metrics.message_tokens + metrics.block_tokens
        ):
            metrics.notes.append(
                f"system-first: {completion.evaluated_tokens} prompt tokens recomputed"
            )
        cache = self.held
        cache.tokens = completion.prompt_tokens + completion.completion_tokens
        cache.changed = True
        others = self._more_alternatives(turn, metrics, cancel)
        if others is None:  # stopped: nothing is stored, the chat keeps the reply it had
            metrics.finish_reason = FinishReason.CANCELLED
            return self._store_reply(turn, "", metrics)
        result = self._store_reply(turn, completion.text, metrics)
        return self._store_alternatives(turn, result, [(text, None) for text in others])

    def _more_alternatives(
        self, turn: Turn, metrics: TurnMetrics, cancel: threading.Event | None
    ) -> list[str] | None:
        """Alternatives 2..N: requests one after another for the same prompt, which the
        slot then holds cached (only the reply is computed again). The server's ``n``
        (llama-server's ``n_cmpl``) is not asked for: it needs a free slot per reply and
        streams the replies interleaved. None when stopped (nothing is kept)."""
        options, user = turn.options, turn.user
        if options.alternatives == 1:
            return []
        if metrics.finish_reason == FinishReason.CANCELLED:
            return None
        metrics.alternatives = options.alternatives
        texts: list[str] = []
        reused: list[int] = []
        for index in range(1, options.alternatives):
            seeded = replace(options, seed=limits.alternative_seed(options.seed, index))
            completion = self._complete(
                turn.context, pending=user.text, exclude=user.id,
                max_tokens=options.max_tokens, options=seeded, cancel=cancel,
            )  # fmt: skip
            if cancel is not None and cancel.is_set():
                metrics.notes.append(
                    f"stopped: the {options.alternatives} partial alternatives are not stored"
                )
                return None
            metrics.decode_tokens += completion.completion_tokens or completion.pieces
            metrics.decode_ms += completion.decode_ms
            self.held.tokens = completion.prompt_tokens + completion.completion_tokens
            reused.append(completion.reused_tokens)
            texts.append(completion.text)
        metrics.notes.append(
            f"server: {options.alternatives} alternatives as {options.alternatives} requests "
            f"one after another (the API's n is not used); the later ones found {min(reused)} "
            f"of the prompt's {metrics.prompt_tokens} tokens cached"
        )
        if options.temperature <= 0:
            metrics.notes.append("temperature 0: every alternative is the same reply")
        return texts

    def _respond_continue(
        self,
        turn: Turn,
        on_token: TokenCallback | None,
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
    ) -> TurnResult:
        """Continue: the history ending on the open reply, which the server extends (a
        final assistant message is a prefill to llama-server); its slot already holds the
        history and the reply, so only what follows is evaluated."""
        context, options, continued = turn.context, turn.options, turn.continues
        assert continued is not None
        metrics = self._turn_metrics(turn)
        metrics.engine = ENGINE
        metrics.continued_from_tokens = self._count(continued.text, cancel)
        metrics.notes.append("continued a reply")
        sent = time.perf_counter()
        completion = self.client.chat(
            self.chat_messages(context, with_block=False),
            reuse=not self._skip_cache_once,
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            seed=options.seed,
            sampling=_request_sampling(options.sampling),
            slot=self.slot_for(context.chat.id),
            on_text=on_token,
            cancel=cancel,
        )
        self._skip_cache_once = False
        self._fill_metrics(metrics, completion, turn.started, sent)
        cache = self.held
        cache.tokens = completion.prompt_tokens + completion.completion_tokens
        cache.changed = True
        return self._store_reply(turn, completion.text, metrics)

    def _fill_metrics(
        self, metrics: TurnMetrics, completion: ChatCompletion, started: float, sent: float
    ) -> None:
        """The server's token figures and the client's clock."""
        metrics.prompt_tokens = completion.prompt_tokens
        metrics.reused_tokens = completion.reused_tokens
        metrics.prefill_tokens = max(0, completion.prompt_tokens - completion.reused_tokens)
        metrics.history_tokens = max(
            0, completion.prompt_tokens - metrics.prefill_tokens
        ) if metrics.layout == Layout.HISTORY_FIRST else 0
        metrics.prefill_ms = completion.timings.get("prompt_ms", completion.ttft_ms)
        rate = completion.timings.get("prompt_per_second", 0.0)
        if not rate and metrics.prefill_ms > 0 and metrics.prefill_tokens:
            rate = metrics.prefill_tokens / (metrics.prefill_ms / 1000)
        metrics.prefill_tokens_per_s = rate
        if rate and metrics.prefill_tokens >= 16:
            self.prefill_tokens_per_s = rate
        metrics.ttft_ms = (sent - started) * 1000 + completion.ttft_ms
        metrics.decode_tokens = completion.completion_tokens or completion.pieces
        metrics.decode_ms = completion.decode_ms
        if metrics.decode_ms > 0 and metrics.decode_tokens > 1:
            metrics.decode_tokens_per_s = (metrics.decode_tokens - 1) / (metrics.decode_ms / 1000)
        metrics.finish_reason = _finish(completion)
        if completion.clamped:
            metrics.notes.append(
                "the server's own figures were impossible and are clamped: "
                + "; ".join(completion.clamped)
            )
        if completion.cut:
            metrics.notes.append(completion.cut)

    # -- idle-time steps ------------------------------------------------------------------

    def _commit(self, context: ChatContext, cancel: threading.Event | None) -> StepResult:
        """Nothing to send: the warm-up request evaluates the commit's tokens first."""
        self.activate(context.chat.id)
        return StepResult(Step.COMMIT, 0, 0.0, completed=not (cancel and cancel.is_set()))

    def _warm_up(self, context: ChatContext, cancel: threading.Event | None) -> StepResult:
        """history, new message, reply, then the block: what the next turn starts with."""
        self.activate(context.chat.id)
        if cancel is not None and cancel.is_set():
            return StepResult(Step.WARM_UP, completed=False)
        if not context.block_text:
            return StepResult(Step.WARM_UP)  # the slot already ends with the reply
        started = time.perf_counter()
        options = GenerationOptions(max_tokens=1, temperature=0.0, seed=0)
        try:
            completion = self._complete(
                context, pending=None, exclude=None, max_tokens=self.warmup_max_tokens,
                options=options, cancel=cancel,
            )
        except ServerError:
            if self.warmup_max_tokens != 0:
                raise
            self.warmup_max_tokens = 1  # e.g. vLLM: max_tokens must be at least 1
            completion = self._complete(
                context, pending=None, exclude=None, max_tokens=1, options=options, cancel=cancel
            )
        cache = self.held
        cache.tokens = completion.prompt_tokens + completion.completion_tokens
        cache.changed = True
        ms = (time.perf_counter() - started) * 1000
        return StepResult(
            Step.WARM_UP, completion.evaluated_tokens, ms, completed=not completion.cancelled
        )

    def prefill_draft(
        self,
        chat_id: int,
        text: str,
        *,
        block_text: str | None = None,
        cancel: threading.Event | None = None,
        progress: ProgressCallback | None = None,
    ) -> DraftPrefill:
        """The draft's prompt sent with ``max_tokens`` 0 (see the module's notes), when
        ``live_prefill`` is on; the server's own counts say what it reused."""
        if not self.live_prefill:
            return DraftPrefill(chat_id, skipped="live prefill is off for this server")
        if not self._finish_idle_work(chat_id, cancel) or (cancel and cancel.is_set()):
            return DraftPrefill(chat_id, completed=False, skipped="cancelled")
        started = time.perf_counter()
        context = self._load_context(chat_id)
        self.activate(chat_id, context)
        if block_text is not None:
            context.block_text = block_text
        options = GenerationOptions(max_tokens=1, temperature=0.0, seed=0)
        held = self.held.tokens
        completion = self._complete(
            context, pending=text if text.strip() else None, exclude=None,
            max_tokens=self.warmup_max_tokens, options=options, cancel=cancel,
        )  # fmt: skip
        cache = self.held
        cache.tokens = completion.prompt_tokens + completion.completion_tokens
        cache.changed = True
        return DraftPrefill(
            chat_id,
            evaluated=completion.evaluated_tokens,
            reused=completion.reused_tokens,
            discarded=max(0, held - completion.reused_tokens),
            completed=not completion.cancelled,
            ms=(time.perf_counter() - started) * 1000,
        )

    def prefill_history(
        self, chat_id: int, *, with_block: bool, cancel: threading.Event | None = None
    ) -> bool:
        """One request that ends on the history (commit is part of the warm-up here: a
        request cannot end on a finished reply); the block comes with it when it is
        the layout's, whatever ``with_block`` says."""
        return self.upkeep(chat_id, (Step.WARM_UP, Step.SAVE)).run(cancel)

    # -- inspector helpers ----------------------------------------------------------------

    def edit_cost(
        self, chat_id: int, block_text: str, layout: str | None = None
    ) -> tuple[int, float | None]:
        """Tokens a new block would make the server recompute (and seconds at its speed)."""
        layout = layout or self.store.chat(chat_id).layout
        tokens = self._count(block_text) or len(block_text) // 4
        if layout == Layout.SYSTEM_FIRST:
            slot = self.slots.get(self.slot_for(chat_id))
            held = slot.tokens if slot is not None and slot.chat_id == chat_id else 0
            tokens = max(tokens, held)
        rate = self.prefill_tokens_per_s
        return tokens, (tokens / rate if rate else None)

    def cache_view(self, chat_id: int) -> CacheView:
        slot = self.slots.get(self.slot_for(chat_id))
        held = slot.tokens if slot is not None and slot.chat_id == chat_id else 0
        return CacheView(
            chat_id=chat_id if held else None,
            segments=[(f"server slot {self.slot_for(chat_id)}", held)] if held else [],
            cache_tokens=held,
            matching_tokens=held,
            n_ctx=self.n_ctx,
            bytes_per_token=self.bytes_per_token,
        )

    def preview_trim(self, chat_id: int, limit: int | None, mode: str | None = None) -> TrimPreview:
        raise SessionError("limiting the cached history is not available on a server yet")

    def set_trim(self, chat_id: int, limit: int | None, mode: str | None = None) -> TrimPreview:
        raise SessionError("limiting the cached history is not available on a server yet")


def _request_sampling(sampling: Sampling) -> dict[str, float]:
    """The request's sampling fields: top_p always, llama-server's only when changed."""
    fields: dict[str, float] = {"top_p": sampling.top_p}
    default = Sampling()
    for name in ("top_k", "min_p", "repeat_penalty"):
        if getattr(sampling, name) != getattr(default, name):
            fields[name] = getattr(sampling, name)
    return fields
