"""Chat sessions: one model, one KV cache, many persisted chats, and the turn pipeline.

A :class:`ChatSession` chooses target token lists for the :class:`KVMirror` so that
the common prefix with what the cache holds is as long as possible: the layout,
the commit and warm-up steps, trimming and saved states are all ways of choosing
targets. A turn is a :class:`Turn` pipeline object whose steps run in a fixed
order (respond, then commit → warm-up → save in idle time), so no caller can get
the order wrong; each step is separately cancellable and the turn loads its chat's
messages once.

No Qt here: the GUI's worker thread and the CLI drive this class the same way.
It is not thread-safe; cancellation is a ``threading.Event`` set from anywhere.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from app.core.chat_template import ChatMarkup, TemplateProbeError, markup_for, suggest_format
from app.core.errors import DecodeError, ModelLoadCancelled
from app.core.kv_mirror import (
    KVMirror,
    NothingToEvaluate,
    ProgressCallback,
)
from app.core.llama_backend import (
    BuiltinTemplateRenderer,
    LlamaBackend,
    ModelInfo,
    builtin_template_names,
    llama_cpp_version,
)
from app.core.models import (
    IdentityCancelled,
    default_model_path,
    legacy_model_identity,
    model_file_identity,
)
from app.core.prompt import PromptBuilder, PromptPlan, Segment
from app.core.sequences import common_prefix_length
from app.domain import (
    FinishReason,
    KVType,
    Layout,
    Role,
    SegmentKind,
    Step,
    TemplateChoice,
    TemplateKind,
)
from app.session.alternatives import generate_replies, kept_replies
from app.session.context_size import ContextTooSmall, check_context_size
from app.session.continuation import ContinueReply
from app.session.documents import document_segments, document_sizes, shared_cache_note, sync_prompt
from app.session.engine import (
    BACKGROUND_CHUNK,
    IDLE_STEPS,
    CacheView,
    ChatContext,
    ChatEngine,
    ContextOverflowError,
    DraftPrefill,
    EngineDescription,
    GenerationOptions,
    PreparedMessage,
    SessionError,
    StateLoad,
    StateSave,
    StepResult,
    TemplateInfo,
    TokenCallback,
    TrimPreview,
    Turn,
    TurnResult,
    TurnStage,
    Upkeep,
    chat_started,
)
from app.session.generation import GeneratedReply
from app.session.live_prefill import DraftPrefilling
from app.session.saved_state import SavedStates
from app.session.trimming import HistoryTrimming
from app.storage.records import Message
from app.storage.store import Store

__all__ = [
    "BACKGROUND_CHUNK",
    "IDLE_STEPS",
    "CacheView",
    "ChatContext",
    "ChatSession",
    "ContextOverflowError",
    "DecodeError",
    "DraftPrefill",
    "GenerationOptions",
    "ModelLoadCancelled",
    "SessionError",
    "StateLoad",
    "StepResult",
    "TokenCallback",
    "TrimPreview",
    "Turn",
    "TurnResult",
    "TurnStage",
    "Upkeep",
]


#: The inspector's names for the segments of a prompt (any other is "history").
SEGMENT_LABELS = {
    SegmentKind.PREAMBLE: "preamble",
    SegmentKind.BLOCK: "instruction block",
    SegmentKind.DOCUMENT: "document",
}


class ChatSession(ContinueReply, HistoryTrimming, DraftPrefilling, ChatEngine):
    """The local engine: the chats of one store on a model loaded in this process by
    llama.cpp; the cache holds one chat at a time."""

    token_format: str
    shares_saved_pages = True

    def __init__(
        self,
        store: Store,
        model_path: str | Path | None = None,
        *,
        n_ctx: int | None = None,
        kv_type: str = KVType.F16,
        n_threads: int | None = None,
        load_progress: Callable[[float], None] | None = None,
        chat_template: TemplateChoice | None = None,
        load_cancel: threading.Event | None = None,
        backend: LlamaBackend | None = None,
    ) -> None:
        """Load the model (``load_cancel`` set: ModelLoadCancelled within one tensor), or
        run on an already open ``backend``, which the session then owns and closes."""
        super().__init__(store)
        if backend is None:
            path = Path(model_path) if model_path else default_model_path()
            backend = LlamaBackend(
                path,
                n_ctx=n_ctx,
                kv_type=kv_type,
                n_threads=n_threads,
                progress=load_progress,
                cancel=load_cancel,
            )
        self.backend = backend
        try:
            self.model_identity = model_file_identity(
                self.backend.path, load_progress, load_cancel.is_set if load_cancel else None
            )
        except IdentityCancelled as error:
            self.backend.close()
            raise ModelLoadCancelled(str(error)) from error
        self.mirror = KVMirror(self.backend)
        try:
            if chat_template is not None:
                # Chosen now (e.g. --chat-template): refused here if it cannot be used,
                # before anything is written; kept for the model once it works.
                chosen = None if chat_template.kind == TemplateKind.GGUF else chat_template
                self._use_markup(self._markup(chosen), n_ctx)
                self._keep_template(chosen)
            else:
                self._use_markup(self._stored_markup(), n_ctx)
        except (ContextTooSmall, SessionError):
            self.backend.close()
            raise

    # -- chat template ----------------------------------------------------------------

    def _markup(self, choice: TemplateChoice | None) -> ChatMarkup:
        """The markup for ``choice`` (None: the GGUF's template, else ChatML)."""
        info = self.backend.info
        try:
            builtin = (
                BuiltinTemplateRenderer(choice.value)
                if choice is not None and choice.kind == TemplateKind.BUILTIN
                else None
            )
            return markup_for(
                info.chat_template, info.bos_token, info.eos_token, choice, builtin
            )
        except (TemplateProbeError, ValueError) as error:
            raise SessionError(f"the chat template {choice} cannot be used: {error}") from error

    def _stored_markup(self) -> ChatMarkup:
        """The template chosen for this model before, else the GGUF's (or ChatML)."""
        stored = self.template_choice
        try:
            return self._markup(stored)
        except SessionError as error:
            fallback = self._markup(None)
            notes = (f"{error}; the model's own is used", *fallback.notes)
            return replace(fallback, notes=notes)

    def _use_markup(self, markup: ChatMarkup, n_ctx: int | None = None) -> None:
        """Write prompts with ``markup`` from now on (message tokens written with another
        markup are re-tokenized when next used; saved states made with it are not reused)."""
        builder = PromptBuilder(self.backend, markup)
        check_context_size(builder, min(n_ctx or self.backend.n_ctx, self.backend.n_ctx))
        self.markup = markup
        self.builder = builder
        self._end_token, self._end_text = self._end_of_turn(markup)
        self.token_format = f"{self.model_identity}|{markup.markup_hash}"
        self.states = SavedStates(
            self.store,
            self.mirror,
            {
                "model": self.model_identity,
                "n_ctx": self.n_ctx,
                "kv_type": self.kv_type,
                "template": markup.markup_hash,
            },
        )

    def _end_of_turn(self, markup: ChatMarkup) -> tuple[int | None, str]:
        """How a reply ends besides llama.cpp's end-of-generation tokens: the assistant's
        end markup, as a token when it starts with a special token of the vocabulary,
        else as text (stopped at, and cut from the reply)."""
        marker = markup.assistant.after.strip()
        if not marker:
            return None, ""
        tokens = self.backend.tokenize(marker, special=True)
        if tokens and self.backend.is_control(tokens[0]):
            return tokens[0], ""
        return None, marker

    @functools.cached_property
    def model_has_template(self) -> bool:
        """The GGUF holds a chat template that can be used as written."""
        info = self.backend.info
        markup = markup_for(info.chat_template, info.bos_token, info.eos_token)
        return markup.template_origin == "gguf"

    @property
    def suggested_template(self) -> str | None:
        """For a GGUF without a usable template: the llama.cpp format its architecture
        most likely wants (e.g. gemma for gemma3); None when it has one."""
        if self.model_has_template:
            return None
        return suggest_format(self.backend.info.architecture, builtin_template_names())

    @staticmethod
    def builtin_templates() -> list[str]:
        """The names of llama.cpp's built-in chat formats, any of which can be chosen."""
        return builtin_template_names()

    def _keep_template(self, choice: TemplateChoice | None) -> None:
        """Use ``choice`` for this model from now on (under its whole-file identity; a
        choice kept under the earlier identity is dropped, so it never comes back)."""
        self.store.set_model_template(self.model_identity, choice)
        self.store.set_model_template(legacy_model_identity(self.backend.path), None)

    @property
    def template_choice(self) -> TemplateChoice | None:
        """The template chosen for this model (None: its GGUF's own, or ChatML); one
        chosen before models were identified by their whole file is found too."""
        chosen = self.store.model_template(self.model_identity)
        if chosen is None:
            chosen = self.store.model_template(legacy_model_identity(self.backend.path))
        return chosen

    def use_template(self, choice: TemplateChoice | None) -> None:
        """Choose the model's chat template (None: the GGUF's own) and keep the choice.

        The open chat's cache is saved first; the cache is then emptied, since its
        tokens were written with the previous markup.
        """
        if choice is not None and choice.kind == TemplateKind.GGUF:
            choice = None
        markup = self._markup(choice)
        self.save_if_changed()
        self._use_markup(markup)
        self._keep_template(choice)
        self._current_work = None
        self.mirror.reset()
        self.mirror.mark_saved()
        self.cache_chat_id = None

    def template_info(self) -> TemplateInfo:
        markup = self.markup
        return TemplateInfo(
            model_name=self.backend.info.path.name,
            model_has_template=self.model_has_template,
            builtin_names=tuple(self.builtin_templates()),
            choice=self.template_choice,
            in_use=markup.template_origin,
            notes=markup.notes,
            suggested=self.suggested_template,
        )

    def template_warning(self) -> str | None:
        """Said when no template of the model's own is in use (it fell back to ChatML)."""
        if self.markup.template_origin != "builtin-chatml":
            return None
        suggested = self.suggested_template
        hint = f"; this model's format is likely --chat-template {suggested}" if suggested else ""
        return self.markup.notes[0] + hint

    # -- facts ------------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self.backend.n_ctx

    @property
    def kv_type(self) -> str:
        return self.backend.kv_type

    @property
    def model_info(self) -> ModelInfo:
        return self.backend.info

    def describe(self) -> EngineDescription:
        info = self.backend.info
        return EngineDescription(
            kind="local",
            path=str(info.path),
            name=info.name,
            description=info.display_name,
            n_params=info.n_params,
            size_bytes=info.size_bytes,
            n_ctx=self.n_ctx,
            kv_type=self.kv_type,
            backend_version=self.backend_version,
            template=self.markup.template_origin,
            template_notes=self.markup.notes,
            suggested_template=self.suggested_template,
        )

    @property
    def cache_size(self) -> int:
        return len(self.mirror)

    @property
    def local_backend(self) -> LlamaBackend:
        return self.backend

    @property
    def backend_version(self) -> str:
        return llama_cpp_version()

    @property
    def cache_tokens(self) -> tuple[int, ...]:
        """The token ids the KV cache holds now."""
        return self.mirror.tokens

    @property
    def idle_order(self) -> tuple[Step, ...]:
        """The order of the idle-time steps for this model.

        A sliding-window cache is saved with only the window before its last cell, so
        it is saved at the committed history, before the block is warmed up on top:
        later turns then only ever remove cells above what was restored, and stay exact.
        Memory that cannot drop a partial range (recurrent) is saved there too: restored,
        it is the snapshot a later commit goes back to instead of recomputing.
        """
        if self._history_only_saves:
            return (Step.COMMIT, Step.SAVE, Step.WARM_UP)
        return IDLE_STEPS

    @property
    def _history_only_saves(self) -> bool:
        return bool(self.backend.sliding_window) or not self.mirror.partial_removal

    @property
    def has_unsaved_cache(self) -> bool:
        return self.cache_chat_id is not None and self.mirror.changed

    def fingerprint(self) -> dict[str, object]:
        return self.states.fingerprint()

    def close(self) -> None:
        self.backend.close()

    # -- chats and saved states -------------------------------------------------------

    def activate(self, chat_id: int, context: ChatContext | None = None) -> StateLoad:
        """Make ``chat_id`` the cache's chat, restoring its saved state if it is valid.

        A chat with no state of its own restores the pages it shares with another chat
        (a fork): those of the prompt ``context`` says it will want.
        """
        if self.cache_chat_id == chat_id:
            return StateLoad(restored=False, tokens=len(self.mirror))
        self.save_if_changed()
        hint = self._plan(context, with_block=True).tokens if context is not None else []
        shared = common_prefix_length(self.mirror.tokens, hint) if hint else 0
        if shared and not self.states.has_state(chat_id):
            # A new branch or fork of the chat in the cache: its messages begin with the
            # same token ids, so those cells are kept as they are (no restore at all).
            kept = self.mirror.sync(hint[:shared], need_logits=False)
            note = shared_cache_note(self.store, self.cache_chat_id, shared)
            self.cache_chat_id = chat_id
            self.mirror.changed = True  # the branch has no state of its own yet
            if kept.fallback:
                note += f" ({kept.fallback})"
            return StateLoad(restored=False, tokens=len(self.mirror), note=note)
        self.mirror.reset()
        self.mirror.mark_saved()
        self.cache_chat_id = chat_id
        load = self.states.restore(chat_id, hint)
        history_but_no_state = (
            context is not None
            and context.cached_messages
            and not load.restored
            and load.rejected is None
        )
        if history_but_no_state:  # a new or deleted KV store, or the budget evicted it
            note = f"no saved state in {self.store.kv_path.name}: the history is recomputed"
            load = replace(load, note=note)
        if load.restored and load.tokens:
            self.bytes_per_token = load.bytes / load.tokens
            self.mirror.checkpoint()  # recurrent memory: what a commit goes back to
        return load

    def _cache_moved(self, from_chat_id: int, to_chat_id: int) -> None:
        """A regenerated reply went into a branch: the cells (shared prefix and new reply)
        are the branch's now; the original chat keeps its saved state."""
        if self.cache_chat_id == from_chat_id:
            self.cache_chat_id = to_chat_id
            self.mirror.changed = True  # the branch has no state of its own yet

    def save_state(self, chat_id: int) -> StateSave:
        """Persist the cache of ``chat_id`` with its token ids."""
        if self.cache_chat_id != chat_id:
            raise SessionError("the cache does not hold this chat")
        if self._history_only_saves and list(self.mirror.tokens) != self.history_plan(
            chat_id
        ).tokens:
            # Only the committed history is worth a sliding-window save (see idle_order);
            # the saved one stays, and the block on top is warmed up again after a restore.
            self.mirror.mark_saved()
            return StateSave(0, 0.0)
        save = self.states.save(chat_id)
        if save.bytes and len(self.mirror):
            self.bytes_per_token = save.bytes / len(self.mirror)
        return save

    def save_if_changed(self) -> StateSave | None:
        """Save the cache's chat if its cells changed since they were last saved."""
        if not self.has_unsaved_cache:
            return None
        assert self.cache_chat_id is not None
        return self.save_state(self.cache_chat_id)

    def drop_cache(self) -> None:
        """Empty the cache without saving it (the next turn recomputes everything); the
        chat's saved state stays as it is, never overwritten by the empty cache."""
        self.mirror.reset()
        self.mirror.mark_saved()

    def forget_chat(self, chat_id: int) -> None:
        """Drop the cache if it belongs to ``chat_id`` (the chat is closed or deleted)."""
        if self.cache_chat_id == chat_id:
            self.mirror.reset()
            self.mirror.mark_saved()
            self.cache_chat_id = None

    # -- prompt plans -----------------------------------------------------------------

    def _stored_tokens_usable(self, message: Message) -> bool:
        """Stored ids are used only if they were written for this model and template and
        name tokens the model has: ids edited into the database must not block the chat."""
        ids = message.token_ids
        return (
            message.token_format == self.token_format
            and bool(ids)
            and min(ids) >= 0
            and max(ids) < self.backend.n_vocab
        )

    def _message_tokens(self, message: Message) -> tuple[int, ...]:
        if self._stored_tokens_usable(message):
            return tuple(message.token_ids)
        # Another model or template wrote these tokens: only now is text re-tokenized.
        if message.role == Role.USER:
            tokens = self.builder.user_segment(message.text)
        else:
            tokens = self.builder.assistant_segment_from_text(message.text)
        self.store.set_message_tokens(message.id, list(tokens), self.token_format)
        return tokens

    def _plan(
        self,
        context: ChatContext,
        *,
        with_block: bool,
        pending: Segment | None = None,
        exclude: int | None = None,
        block_text: str | None = None,
    ) -> PromptPlan:
        """Opening + cached history, then (history-first) the block, then the new message.

        Without ``pending`` this is the committed history (``with_block``: plus the
        block on top, which is what warm-up evaluates).
        """
        chat = context.chat
        block = context.block_text if block_text is None else block_text
        layout = Layout(chat.layout)
        opening = self.builder.opening(layout, block, chat_started(context.messages))
        plan = PromptPlan(layout, [opening, *document_segments(self.builder, context.documents)])
        plan.segments.extend(
            Segment(SegmentKind.MESSAGE, self._message_tokens(m), m.id, m.role)
            for m in context.cached_messages
            if m.id != exclude
        )
        if with_block and chat.layout == Layout.HISTORY_FIRST:
            later = self.builder.later_block(block)
            if later is not None:
                plan.segments.append(later)
        if pending is not None:
            plan.segments.append(pending)
            plan.segments.append(Segment(SegmentKind.GENERATION, self.builder.generation_prompt()))
        return plan

    def prompt_plan(self, chat_id: int, new_message: str | None = None) -> PromptPlan:
        """The prompt the next turn would send (for the inspector and tests)."""
        context = self._load_context(chat_id)
        messages = context.messages
        if new_message is None and messages and messages[-1].role == Role.USER:
            last = messages[-1]
            pending = Segment(SegmentKind.PENDING, self._message_tokens(last), last.id, Role.USER)
            return self._plan(context, with_block=True, pending=pending, exclude=last.id)
        tokens = self.builder.user_segment(new_message or "")
        pending = Segment(SegmentKind.PENDING, tokens, None, Role.USER)
        return self._plan(context, with_block=True, pending=pending)

    def history_plan(self, chat_id: int, *, with_block: bool = False) -> PromptPlan:
        """What the cache holds after commit (``with_block``: after warm-up)."""
        return self._plan(self._load_context(chat_id), with_block=with_block)

    def rendered_prompt(self, chat_id: int, new_message: str | None = None) -> str:
        return self.builder.rendered_text(self.prompt_plan(chat_id, new_message).tokens)

    def _prepare_message(
        self,
        context: ChatContext,
        text: str,
        options: GenerationOptions,
        exclude: int | None = None,
    ) -> PreparedMessage:
        """The message's token segment (stored ids when it was stored before), and the
        turns dropped so that it and a reply fit the context."""
        if exclude is not None:
            tokens = self._message_tokens(self.store.message(exclude))
        else:
            tokens = self.builder.user_segment(text)
        return PreparedMessage(tokens, self._fit(context, tokens, options, exclude))

    # -- a turn -----------------------------------------------------------------------

    def _respond(
        self,
        turn: Turn,
        on_token: TokenCallback | None,
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
    ) -> TurnResult:
        context, user, options = turn.context, turn.user, turn.options
        chat = context.chat
        pending = Segment(SegmentKind.PENDING, self._message_tokens(user), user.id, Role.USER)
        plan = self._plan(context, with_block=True, pending=pending, exclude=user.id)
        prompt = plan.tokens
        metrics = self._turn_metrics(turn)
        metrics.prompt_tokens = len(prompt)
        metrics.message_tokens = self.builder.content_tokens(user.text)
        metrics.block_tokens = plan.count(SegmentKind.BLOCK)
        metrics.history_tokens = plan.count(SegmentKind.PREAMBLE, SegmentKind.MESSAGE) + (
            plan.count(SegmentKind.BLOCK) if chat.layout == Layout.SYSTEM_FIRST else 0
        )
        metrics.notes.extend(
            f"message {m.seq}: stored token ids were unreadable; re-tokenized from its text"
            for m in context.messages
            if m.tokens_unreadable
            or (m.token_ids and m.token_format == self.token_format
                and not self._stored_tokens_usable(m))
        )
        try:
            synced = sync_prompt(self.mirror, plan, metrics, options, cancel, progress)
        except NothingToEvaluate as error:
            raise SessionError(str(error)) from error
        if synced.fallback:
            metrics.notes.append(synced.fallback)
        if self.mirror.recomputed_for_window:
            metrics.notes.append(
                "sliding-window model: the restored cache holds only the window before its "
                "end, so a change below it recomputes from the start"
            )
        metrics.reused_tokens = synced.reused
        metrics.typed_ahead_tokens = self._typed_ahead_tokens(chat.id, synced.reused)
        metrics.prefill_tokens = synced.evaluated
        metrics.prefill_ms = synced.ms
        if synced.ms > 0 and synced.evaluated:
            metrics.prefill_tokens_per_s = synced.evaluated / (synced.ms / 1000)
        if (
            chat.layout == Layout.SYSTEM_FIRST
            and synced.reused < metrics.history_tokens
            and metrics.history_tokens
        ):
            metrics.notes.append(
                f"system-first: {metrics.history_tokens - synced.reused} history tokens recomputed"
            )
        replies = [GeneratedReply(FinishReason.CANCELLED)]
        if synced.completed:
            replies = generate_replies(
                self.backend, self.mirror, (self._end_token, self._end_text),
                options, metrics, turn.started, prompt, on_token, cancel,
            )  # fmt: skip
        reply, token_ids, others = kept_replies(replies, metrics, self.builder.assistant_segment)
        metrics.finish_reason = reply.finish
        metrics.seed = options.seed
        result = self._store_reply(turn, reply.text, metrics, token_ids)
        return self._store_alternatives(turn, result, others)

    # -- idle-time steps --------------------------------------------------------------

    def _commit(self, context: ChatContext, cancel: threading.Event | None) -> StepResult:
        """Make the cache hold exactly the committed history (no instruction block in it).

        history-first: the block and everything after it leave the cache, then the new
        user message and the reply are evaluated on top of the history.
        """
        self.activate(context.chat.id)
        turns, tokens = self._enforce_limit(context)
        synced = self.mirror.sync(
            self._plan(context, with_block=False).tokens,
            need_logits=False,
            cancel=cancel,
            chunk=BACKGROUND_CHUNK,
            step=Step.COMMIT,
        )
        if synced.completed:
            # Recurrent memory cannot drop the block, the message or a cancelled reply
            # later: a copy of the state at the committed history is what it goes back to.
            self.mirror.checkpoint()
        notes = (synced.fallback,) if synced.fallback else ()
        return StepResult(
            Step.COMMIT, synced.evaluated, synced.ms, synced.completed, turns, tokens, notes
        )

    def _warm_up(self, context: ChatContext, cancel: threading.Event | None) -> StepResult:
        """history-first: evaluate the current instruction block on top of the history."""
        self.activate(context.chat.id)
        synced = self.mirror.sync(
            self._plan(context, with_block=True).tokens,
            need_logits=False,
            cancel=cancel,
            chunk=BACKGROUND_CHUNK,
            step=Step.WARM_UP,
        )
        notes = (synced.fallback,) if synced.fallback else ()
        return StepResult(
            Step.WARM_UP, synced.evaluated, synced.ms, synced.completed, notes=notes
        )

    def prefill_history(
        self, chat_id: int, *, with_block: bool, cancel: threading.Event | None = None
    ) -> bool:
        steps = (Step.COMMIT, Step.WARM_UP) if with_block else (Step.COMMIT,)
        return self.upkeep(chat_id, steps).run(cancel)

    # -- inspector helpers ------------------------------------------------------------

    def edit_cost(
        self, chat_id: int, block_text: str, layout: str | None = None
    ) -> tuple[int, float | None]:
        """Tokens (and seconds at the measured speed) a new instruction block would recompute."""
        context = self._load_context(chat_id)
        if layout and layout != context.chat.layout:
            context.chat = replace(context.chat, layout=layout)
        target = self._plan(context, with_block=True, block_text=block_text).tokens
        if self.cache_chat_id == chat_id:
            held = self.mirror.tokens
        else:
            held = tuple(self.states.held_token_ids(chat_id))
        cost = len(target) - common_prefix_length(held, target)
        return cost, self._seconds_for(cost)

    def cache_view(self, chat_id: int) -> CacheView:
        context = self._load_context(chat_id)
        plan = self._plan(context, with_block=True)
        held = self.mirror.tokens if self.cache_chat_id == chat_id else ()
        segments: list[tuple[str, int]] = []
        for segment in plan.segments:
            label = SEGMENT_LABELS.get(segment.kind, "history")
            if segments and segments[-1][0] == label:
                segments[-1] = (label, segments[-1][1] + len(segment.tokens))
            else:
                segments.append((label, len(segment.tokens)))
        target = plan.tokens
        matching = common_prefix_length(held, target)
        if len(held) > matching:
            segments.append(("new message + reply", len(held) - matching))
        usage = self.store.kv.usage(chat_id)
        return CacheView(
            chat_id=self.cache_chat_id,
            segments=segments,
            cache_tokens=len(held),
            matching_tokens=matching,
            n_ctx=self.n_ctx,
            bytes_per_token=self.bytes_per_token,
            saved_bytes=usage[0].bytes if usage else 0,
            saved_shared_bytes=usage[0].shared_bytes if usage else 0,
            store_bytes=self.store.kv.total_bytes(),
            budget_bytes=self.store.kv.budget_bytes,
            documents=document_sizes(self.builder, context.documents),
        )
