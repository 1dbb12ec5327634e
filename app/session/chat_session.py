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

import codecs
import datetime
import functools
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

from app import limits
from app.core.chat_template import ChatMarkup, TemplateProbeError, markup_for, suggest_format
from app.core.kv_mirror import (
    KVMirror,
    NothingToEvaluate,
    ProgressCallback,
    SyncResult,
    common_prefix_length,
)
from app.core.llama_backend import (
    BuiltinTemplateRenderer,
    DecodeError,
    LlamaBackend,
    ModelInfo,
    ModelLoadCancelled,
    builtin_template_names,
    llama_cpp_version,
)
from app.core.metrics import TurnMetrics
from app.core.models import (
    IdentityCancelled,
    default_model_path,
    legacy_model_identity,
    model_file_identity,
)
from app.core.prompt import PromptBuilder, PromptPlan, Segment, render_instructions
from app.domain import (
    FinishReason,
    KVType,
    Layout,
    MessageStatus,
    Role,
    SegmentKind,
    Step,
    TemplateChoice,
    TemplateKind,
)
from app.session.context_size import ContextTooSmall, check_context_size
from app.session.saved_state import SavedStates, StateLoad, StateSave
from app.storage.records import Chat, Message, unanswered_ids
from app.storage.store import Store

BACKGROUND_CHUNK = 128  # tokens per llama_decode call in commit/warm-up: cancellable in ~0.3 s
MIN_REPLY_ROOM = 16
#: The idle-time steps after a reply, in the only order that is correct: the history is
#: committed before the block is warmed up on top of it, and saved once both are done.
IDLE_STEPS = (Step.COMMIT, Step.WARM_UP, Step.SAVE)

TokenCallback = Callable[[str], None]

__all__ = [
    "BACKGROUND_CHUNK",
    "IDLE_STEPS",
    "CacheView",
    "ChatContext",
    "ChatSession",
    "ContextOverflowError",
    "DecodeError",
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


class SessionError(Exception):
    """A request the session refuses, explained in one line."""


class ContextOverflowError(SessionError):
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
    seed: int = 0  # -1: random (see app.limits)

    def __post_init__(self) -> None:
        # Refused here, before a turn stores the user's message.
        limits.check_max_tokens(self.max_tokens)
        limits.check_temperature(self.temperature)
        limits.check_seed(self.seed)


@dataclass
class TurnResult:
    """A finished (or stopped) reply."""

    chat_id: int
    user_message_id: int
    reply_message_id: int | None
    reply: str
    metrics: TurnMetrics
    metrics_id: int
    regenerated: bool = False


@dataclass(frozen=True)
class StepResult:
    """One idle-time step (commit, warm-up or save)."""

    step: Step
    tokens: int = 0
    ms: float = 0.0
    completed: bool = True
    trimmed_turns: int = 0
    trimmed_tokens: int = 0
    notes: tuple[str, ...] = ()  # e.g. a fallback the memory needed (see SyncResult.fallback)


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
    #: The chat's saved state on disk, and how much of it other chats share (forks).
    saved_bytes: int = 0
    saved_shared_bytes: int = 0
    #: Every chat's saved states (each page once) and the budget they are kept under.
    store_bytes: int = 0
    budget_bytes: int = 0


@dataclass
class _ChatContext:
    """A chat as one piece of work sees it: loaded once, kept current in memory."""

    chat: Chat
    messages: list[Message]
    block_text: str
    instruction_version: int | None

    @property
    def cached_messages(self) -> list[Message]:
        """History in the cache: from the trim point on, without unanswered user messages,
        so a prompt never holds two user messages in a row (Retry answers those)."""
        unanswered = unanswered_ids(self.messages)
        return [
            m
            for m in self.messages
            if m.seq >= self.chat.cache_start_seq and m.id not in unanswered
        ]


#: Public name for other sessions that run the same turn pipeline (e.g. on a server).
ChatContext = _ChatContext


def current_block(store: Store, chat_id: int) -> tuple[str, int | None]:
    """The chat's instruction block as the model sees it, and its version."""
    current = store.current_instructions(chat_id)
    if current is None:
        return "", None
    return render_instructions(current.text, current.variables), current.version


def chat_started(messages: list[Message]) -> datetime.datetime | None:
    """When the chat's first turn was sent (None before it): the date its template shows."""
    return datetime.datetime.fromtimestamp(messages[0].created_at) if messages else None


def load_chat_context(store: Store, chat_id: int) -> _ChatContext:
    """A chat, its messages and its block, read once for one piece of work."""
    block, version = current_block(store, chat_id)
    return _ChatContext(store.chat(chat_id), store.messages(chat_id), block, version)


def _turns(messages: list[Message]) -> list[list[Message]]:
    """Group messages into turns: a user message and the replies after it."""
    groups: list[list[Message]] = []
    for message in messages:
        if message.role == Role.USER or not groups:
            groups.append([message])
        else:
            groups[-1].append(message)
    return groups


class TurnStage(StrEnum):
    """Where a turn is in its pipeline; each stage allows only the next step."""

    NEW = "new"
    REPLIED = "replied"
    COMMITTED = "committed"
    WARMED = "warmed"
    SAVED = "saved"
    SUPERSEDED = "superseded"  # a newer turn or upkeep took the cache first


class _IdleWork:
    """Steps that run after a reply or an edit, one ``advance`` at a time, in a fixed order."""

    def __init__(self, session: ChatSession, chat_id: int, steps: Sequence[Step]) -> None:
        self.session = session
        self.chat_id = chat_id
        # Whatever subset is asked for, the steps run in the one order that is correct.
        self.remaining = [step for step in session.idle_order if step in steps]
        self.stopped = False

    @property
    def done(self) -> bool:
        return self.stopped or not self.remaining

    @property
    def next_step(self) -> Step | None:
        return None if self.done else self.remaining[0]

    def _is_current(self) -> bool:
        return self.session._current_work is self

    def _context(self) -> _ChatContext:
        raise NotImplementedError

    def advance(self, cancel: threading.Event | None = None) -> StepResult | None:
        """Run the next step; None when there is nothing left (done, stopped or superseded)."""
        if self.done:
            return None
        if not self._is_current():
            self.stopped = True
            return None
        # The order can change once the memory turns out not to drop partial ranges.
        order = self.session.idle_order
        self.remaining.sort(key=lambda s: order.index(s) if s in order else len(order))
        step = self.remaining[0]
        context = self._context()
        if step == Step.COMMIT:
            result = self.session._commit(context, cancel)
        elif step == Step.WARM_UP:
            context.block_text, context.instruction_version = self.session._block(context.chat.id)
            result = self.session._warm_up(context, cancel)
        else:
            save = self.session.save_state(self.chat_id)
            result = StepResult(Step.SAVE, ms=save.ms)
            self._saved(save)
        if result.completed:
            self.remaining.pop(0)
        else:
            self.stopped = True
        self._record(result)
        return result

    def run(self, cancel: threading.Event | None = None) -> bool:
        """Run every remaining step; False if one was cancelled or superseded."""
        while not self.done:
            if self.advance(cancel) is None:
                break
        return not self.remaining

    def _record(self, result: StepResult) -> None:
        pass

    def _saved(self, save: StateSave) -> None:
        pass


class Upkeep(_IdleWork):
    """Idle-time work with no reply: after an instruction edit or a trim change."""

    def _context(self) -> _ChatContext:
        # Upkeep is rare and may follow other requests: it reads the chat anew each step.
        return self.session._load_context(self.chat_id)


class Turn(_IdleWork):
    """One turn: ``respond`` first, then ``advance`` through commit, warm-up and save."""

    def __init__(
        self,
        session: ChatSession,
        context: _ChatContext,
        user: Message,
        options: GenerationOptions,
        load: StateLoad,
        started: float,
        trimmed: tuple[int, int],
        *,
        regenerated: bool,
        idle_steps: Sequence[Step] = IDLE_STEPS,
    ) -> None:
        super().__init__(session, context.chat.id, idle_steps)
        self.context = context
        self.user = user
        self.options = options
        self.load = load
        self.started = started
        self.trimmed = trimmed
        self.regenerated = regenerated
        self.stage = TurnStage.NEW
        self.result: TurnResult | None = None

    def _context(self) -> _ChatContext:
        return self.context

    def respond(
        self,
        *,
        on_token: TokenCallback | None = None,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> TurnResult:
        """Prefill what the cache lacks, generate and store the reply (the critical path)."""
        if self.stage != TurnStage.NEW:
            raise SessionError(f"this turn has already replied (stage {self.stage})")
        self.result = self.session._respond(self, on_token, progress, cancel)
        self.stage = TurnStage.REPLIED
        return self.result

    def advance(self, cancel: threading.Event | None = None) -> StepResult | None:
        if self.stage == TurnStage.NEW:
            raise SessionError("respond() comes before the idle-time steps")
        result = super().advance(cancel)
        if result is None and self.stopped and not self._is_current():
            self.stage = TurnStage.SUPERSEDED
        elif result is not None and result.completed:
            self.stage = {
                Step.COMMIT: TurnStage.COMMITTED,
                Step.WARM_UP: TurnStage.WARMED,
                Step.SAVE: TurnStage.SAVED,
            }[result.step]
        return result

    @property
    def metrics(self) -> TurnMetrics | None:
        return self.result.metrics if self.result else None

    def _record(self, result: StepResult) -> None:
        metrics = self.metrics
        if metrics is None:
            return
        if result.step == Step.COMMIT:
            metrics.commit_tokens += result.tokens
            metrics.commit_ms += result.ms
            metrics.trimmed_turns += result.trimmed_turns
            metrics.trimmed_tokens += result.trimmed_tokens
        elif result.step == Step.WARM_UP:
            metrics.warmup_tokens += result.tokens
            metrics.warmup_ms += result.ms
        metrics.background_tokens = metrics.commit_tokens + metrics.warmup_tokens
        metrics.cache_tokens = len(self.session.mirror)
        metrics.notes.extend(f"{result.step}: {note}" for note in result.notes)
        if result.step != Step.SAVE and metrics.state_save_ms is not None and self.result:
            # A step after the save (the warm-up of a sliding-window or recurrent model):
            # its figures and notes reach the stored row too.
            self.session.store.update_metrics(self.result.metrics_id, metrics.as_dict())

    def _saved(self, save: StateSave) -> None:
        if self.result is None:
            return
        metrics = self.result.metrics
        metrics.state_bytes = save.bytes
        metrics.state_bytes_written = save.written
        metrics.state_save_ms = save.ms
        metrics.cache_tokens = len(self.session.mirror)
        if save.note:
            metrics.notes.append(save.note)
        self.session.store.update_metrics(self.result.metrics_id, metrics.as_dict())


class _ReplyText:
    """A reply's text as it streams, cut at the end-of-turn marker when the model writes
    it as text (a marker that is not one special token of its vocabulary, e.g. ChatML's
    ``<|im_end|>`` on Gemma). Text that may be the marker's beginning is held back, so
    the marker never reaches the screen, the stored reply or its token ids."""

    def __init__(self, end_text: str, on_token: TokenCallback | None) -> None:
        self.end_text = end_text
        self.on_token = on_token
        self.text = ""
        self.ends: list[int] = [0]  # the text's length after each token
        self.shown = 0
        self.ended = False

    def add(self, piece: str) -> bool:
        """Add a token's text; True when the marker is complete (the reply ends before it)."""
        self.text += piece
        self.ends.append(len(self.text))
        if not self.end_text:
            self._show(len(self.text))
            return False
        at = self.text.find(self.end_text, max(0, self.shown - len(self.end_text)))
        if at >= 0:
            self.text = self.text[:at]
            self.ended = True
            self._show(at)
            return True
        held = next(
            (
                size
                for size in range(min(len(self.end_text) - 1, len(self.text)), 0, -1)
                if self.end_text.startswith(self.text[-size:])
            ),
            0,
        )
        self._show(len(self.text) - held)
        return False

    def tokens_before_end(self) -> int | None:
        """How many tokens hold exactly the reply before the marker; None when the marker
        starts inside a token (the reply's text is then tokenized again)."""
        cut = len(self.text)
        return self.ends.index(cut) if cut in self.ends else None

    def flush(self) -> None:
        self._show(len(self.text))

    def _show(self, upto: int) -> None:
        if upto > self.shown:
            if self.on_token is not None:
                self.on_token(self.text[self.shown : upto])
            self.shown = upto


class ChatSession:
    """The chats of one store on one loaded model; the cache holds one chat at a time."""

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
        self.store = store
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
        self.cache_chat_id: int | None = None
        self.bytes_per_token: float = 0.0
        self._current_work: _IdleWork | None = None

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

    def use_template(self, choice: TemplateChoice | None) -> ChatMarkup:
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
        return markup

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

    def activate(self, chat_id: int, context: _ChatContext | None = None) -> StateLoad:
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
            self.cache_chat_id = chat_id
            self.mirror.changed = True  # the branch has no state of its own yet
            note = f"{len(self.mirror)} tokens shared with the previous chat's cache are reused"
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

    def prefetch(self, chat_id: int) -> StateLoad:
        """Restore a chat's state before its next turn (e.g. when the user selects it)."""
        if self.cache_chat_id == chat_id:
            return StateLoad(restored=False, tokens=len(self.mirror))
        return self.activate(chat_id, self._load_context(chat_id))

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

    def _block(self, chat_id: int) -> tuple[str, int | None]:
        return current_block(self.store, chat_id)

    def _load_context(self, chat_id: int) -> _ChatContext:
        return load_chat_context(self.store, chat_id)

    def _message_tokens(self, message: Message) -> tuple[int, ...]:
        if message.token_format == self.token_format and message.token_ids:
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
        context: _ChatContext,
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
        opening = self.builder.opening(chat.layout, block, chat_started(context.messages))
        plan = PromptPlan(chat.layout, [opening])
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

    # -- trimming ---------------------------------------------------------------------

    def _trim_start(self, messages: list[Message], limit: int | None) -> int:
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

    def _move_cache_start(self, context: _ChatContext, new_start: int) -> tuple[int, int]:
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
        return (len(_turns(dropped)) if dropped else 0), dropped_tokens

    def _drop_oldest_turn(self, context: _ChatContext, exclude: int | None) -> tuple[int, int]:
        history = [m for m in context.cached_messages if m.id != exclude]
        if not history:
            return 0, 0
        groups = _turns(history)
        next_start = groups[1][0].seq if len(groups) > 1 else history[-1].seq + 1
        return self._move_cache_start(context, next_start)

    def _enforce_limit(self, context: _ChatContext) -> tuple[int, int]:
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
        context: _ChatContext,
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
                raise ContextOverflowError(over, self.n_ctx)
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
        turns_change = len(_turns(moved)) if moved else 0
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

    def _seconds_for(self, tokens: int) -> float | None:
        rate = self.mirror.prefill_tokens_per_s
        return tokens / rate if rate else None

    # -- a turn -----------------------------------------------------------------------

    def start_turn(
        self,
        chat_id: int,
        text: str | None,
        options: GenerationOptions | None = None,
        *,
        idle_steps: Sequence[Step] = IDLE_STEPS,
    ) -> Turn:
        """Store the user's message (``None``: answer the last one again) and open a turn.

        The new turn supersedes any idle-time work still pending for any chat.
        """
        started = time.perf_counter()
        if text is not None and not text.strip():
            raise SessionError("the message is empty")
        context = self._load_context(chat_id)
        load = self.activate(chat_id, context)
        options = options or GenerationOptions()
        if text is None and options.temperature > 0:
            # Another reply, not the same one again: greedy replies stay reproducible.
            options = replace(options, seed=secrets.randbelow(limits.MAX_SEED + 1))
        if text is None:
            while context.messages and context.messages[-1].role == Role.ASSISTANT:
                self.store.delete_message(context.messages.pop().id)
            if not context.messages:
                raise SessionError("there is no message to reply to")
            user = context.messages[-1]
            trimmed = self._fit(context, self._message_tokens(user), options, user.id)
        else:
            pending_tokens = self.builder.user_segment(text)
            trimmed = self._fit(context, pending_tokens, options)
            user = self.store.add_message(
                chat_id,
                Role.USER,
                text,
                token_ids=list(pending_tokens),
                token_format=self.token_format,
                instruction_version=context.instruction_version,
            )
            context.messages.append(user)
        turn = Turn(
            self,
            context,
            user,
            options,
            load,
            started,
            trimmed,
            regenerated=text is None,
            idle_steps=idle_steps,
        )
        self._current_work = turn
        return turn

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
        turn = self.start_turn(chat_id, text, options)
        return turn.respond(on_token=on_token, progress=progress, cancel=cancel)

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
        turn = self.start_turn(chat_id, None, options)
        return turn.respond(on_token=on_token, progress=progress, cancel=cancel)

    @property
    def current_turn(self) -> Turn | None:
        """The latest turn, while its idle-time steps may still run."""
        work = self._current_work
        return work if isinstance(work, Turn) else None

    def upkeep(self, chat_id: int, steps: Sequence[Step] = IDLE_STEPS) -> Upkeep:
        """Idle-time work after an edit or trim change (supersedes any pending work)."""
        work = Upkeep(self, chat_id, steps)
        self._current_work = work
        return work

    def idle_work(self, chat_id: int) -> _IdleWork:
        """The chat's pending turn if it is the latest work, otherwise a fresh upkeep."""
        work = self._current_work
        if isinstance(work, Turn) and work.chat_id == chat_id and not work.done:
            return work
        return self.upkeep(chat_id)

    def after_reply(
        self, chat_id: int, cancel: threading.Event | None = None
    ) -> TurnMetrics | None:
        """Commit, warm up and save: what the CLI runs before exiting.

        Returns the turn's completed metrics when the chat's latest turn finished.
        """
        work = self.idle_work(chat_id)
        finished = work.run(cancel)
        return work.metrics if isinstance(work, Turn) and finished else None

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
        trimmed_turns, trimmed_tokens = turn.trimmed
        plan = self._plan(context, with_block=True, pending=pending, exclude=user.id)
        prompt = plan.tokens
        load = turn.load
        metrics = TurnMetrics(
            layout=chat.layout,
            trim_mode=chat.trim_mode,
            prompt_tokens=len(prompt),
            message_tokens=self.builder.content_tokens(user.text),
            block_tokens=plan.count(SegmentKind.BLOCK),
            history_tokens=plan.count(SegmentKind.PREAMBLE, SegmentKind.MESSAGE)
            + (plan.count(SegmentKind.BLOCK) if chat.layout == Layout.SYSTEM_FIRST else 0),
            state_load_ms=load.ms if (load.restored or load.rejected) else None,
            state_rejected=load.rejected,
            trimmed_turns=trimmed_turns,
            trimmed_tokens=trimmed_tokens,
        )
        if load.rejected:
            metrics.notes.append(f"saved state discarded: {load.rejected}")
        if load.note:
            metrics.notes.append(load.note)
        metrics.notes.extend(
            f"message {m.seq}: stored token ids were unreadable; re-tokenized from its text"
            for m in context.messages
            if m.tokens_unreadable
        )
        try:
            synced: SyncResult = self.mirror.sync(
                prompt, need_logits=True, cancel=cancel, progress=progress
            )
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
        content: list[int] = []
        text_parts: list[str] = []
        finish = FinishReason.CANCELLED
        if synced.completed:
            finish = self._generate(
                options, content, text_parts, metrics, turn.started, on_token, cancel
            )
        metrics.finish_reason = finish
        metrics.seed = options.seed
        reply_text = "".join(text_parts)
        reply_id = None
        if content:
            reply = self.store.add_message(
                chat.id,
                Role.ASSISTANT,
                reply_text,
                token_ids=list(self.builder.assistant_segment(content)),
                token_format=self.token_format,
                status=MessageStatus.CANCELLED
                if finish == FinishReason.CANCELLED
                else MessageStatus.COMPLETE,
                instruction_version=context.instruction_version,
            )
            context.messages.append(reply)
            reply_id = reply.id
        metrics.cache_tokens = len(self.mirror)
        metrics_id = self.store.add_metrics(chat.id, reply_id or user.id, metrics.as_dict())
        return TurnResult(
            chat.id, user.id, reply_id, reply_text, metrics, metrics_id, turn.regenerated
        )

    def _generate(
        self,
        options: GenerationOptions,
        content: list[int],
        text_parts: list[str],
        metrics: TurnMetrics,
        started: float,
        on_token: TokenCallback | None,
        cancel: threading.Event | None,
    ) -> FinishReason:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        reply = _ReplyText(self._end_text, on_token)
        finish = FinishReason.LENGTH
        decode_started = time.perf_counter()
        with self.backend.make_sampler(options.temperature, options.seed) as sampler:
            for index in range(options.max_tokens):
                if cancel is not None and cancel.is_set():
                    finish = FinishReason.CANCELLED
                    break
                token = sampler.sample()
                if index == 0:
                    metrics.ttft_ms = (time.perf_counter() - started) * 1000
                    decode_started = time.perf_counter()
                if self.backend.is_end_of_generation(token) or token == self._end_token:
                    finish = FinishReason.STOP
                    break
                content.append(token)
                if reply.add(decoder.decode(self.backend.token_bytes(token))):
                    finish = FinishReason.STOP  # the end-of-turn marker, written as text
                    kept = reply.tokens_before_end()
                    content[:] = (
                        content[:kept]
                        if kept is not None
                        else self.backend.tokenize(reply.text, special=False)
                    )
                    break
                if index == options.max_tokens - 1:
                    break  # the last token need not be evaluated
                if not self.mirror.append(token):
                    finish = FinishReason.CONTEXT_FULL
                    break
        if not reply.ended:
            reply.add(decoder.decode(b"", final=True))
        reply.flush()
        text_parts[:] = [reply.text]
        metrics.decode_tokens = len(content)
        metrics.decode_ms = (time.perf_counter() - decode_started) * 1000
        if metrics.decode_ms > 0 and len(content) > 1:
            metrics.decode_tokens_per_s = (len(content) - 1) / (metrics.decode_ms / 1000)
        return finish

    # -- idle-time steps --------------------------------------------------------------

    def _commit(self, context: _ChatContext, cancel: threading.Event | None) -> StepResult:
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

    def _warm_up(self, context: _ChatContext, cancel: threading.Event | None) -> StepResult:
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
            label = {
                SegmentKind.PREAMBLE: "preamble",
                SegmentKind.BLOCK: "instruction block",
            }.get(segment.kind, "history")
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
        )
