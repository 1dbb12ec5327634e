"""The engine contract: one turn API, two engines (llama.cpp here, a server in app/remote).

A turn is a :class:`Turn` pipeline whose steps run in a fixed order (respond, then
commit → warm-up → save in idle time), so no caller can get the order wrong; each step
is separately cancellable and the turn loads its chat's messages once. The turn API
(start, send, regenerate, upkeep, idle work, after-reply) lives once, in
:class:`ChatEngine`; an engine supplies only what differs: how a prompt is evaluated
(``_respond``), what the cache holds after a reply (``_commit``, ``_warm_up``), how a
state is saved and restored, and what the inspector sees.

Nothing here imports llama.cpp or Qt: the server engine, read-only commands and the GUI
thread use these types without loading the backend.
"""

from __future__ import annotations

import datetime
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING

from app import limits
from app.core.metrics import TurnMetrics
from app.core.prompt import render_instructions
from app.domain import FinishReason, MessageStatus, Role, Sampling, Step, TemplateChoice
from app.storage.records import Chat, Document, Message, unanswered_ids
from app.storage.store import Store

if TYPE_CHECKING:  # a type only: this module never loads llama.cpp
    from app.core.llama_backend import LlamaBackend

BACKGROUND_CHUNK = 128  # tokens per llama_decode call in commit/warm-up: cancellable in ~0.3 s
#: The idle-time steps after a reply, in the only order that is correct: the history is
#: committed before the block is warmed up on top of it, and saved once both are done.
IDLE_STEPS = (Step.COMMIT, Step.WARM_UP, Step.SAVE)
COMMIT_SKIPPED = "skipped: each question starts from the documents"

TokenCallback = Callable[[str], None]
#: (phase, done, total) while a prompt is evaluated.
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class StateLoad:
    """What happened when a chat became the cache's chat."""

    restored: bool
    tokens: int = 0
    ms: float | None = None
    rejected: str | None = None
    bytes: int = 0
    note: str | None = None  # e.g. a prefix restored because later pages were evicted


@dataclass(frozen=True)
class StateSave:
    bytes: int  # size of the state
    ms: float
    written: int = 0  # bytes actually written: new pages only
    copied: int = 0  # bytes of state the engine serialized for this save
    note: str | None = None  # e.g. the KV file was found damaged and set aside


@dataclass(frozen=True)
class EngineDescription:
    """What an engine says about its model, for the status bar, About and the CLI."""

    kind: str  # "local" (llama.cpp in this process) or "server"
    path: str  # the GGUF file, or the server's API base
    name: str  # the model's own name (general.name) or the server's model id
    description: str
    n_params: int
    size_bytes: int
    n_ctx: int
    kv_type: str
    backend_version: str
    #: The chat template in use ("" on a server) and what to tell the user about it.
    template: str = ""
    template_notes: tuple[str, ...] = ()
    suggested_template: str | None = None


@dataclass(frozen=True)
class TemplateInfo:
    """What the Chat template dialog offers and shows (plain data, safe between threads)."""

    model_name: str
    model_has_template: bool  # the GGUF holds a usable template of its own
    builtin_names: tuple[str, ...]  # llama.cpp's built-in formats
    choice: TemplateChoice | None  # chosen for this model; None: the GGUF's own (or ChatML)
    in_use: str  # the markup's origin, e.g. "gguf", "builtin:gemma", "builtin-chatml"
    notes: tuple[str, ...] = ()
    suggested: str | None = None  # the likely format of a GGUF without a template


@dataclass(frozen=True)
class DraftPrefill:
    """What one live prefill of a draft did: the prompt the message would be sent as,
    evaluated on top of the warm cache while the user types, so Send pays only what
    differs. ``discarded`` counts the tokens an edit (or a BPE merge at the end) threw
    away: work done while typing that the send will not use."""

    chat_id: int
    evaluated: int = 0  # tokens computed by this call
    reused: int = 0  # tokens of the draft's prompt the cache already held
    discarded: int = 0  # tokens the cache held past the common prefix, dropped
    completed: bool = True  # False: cancelled between two batches
    ms: float = 0.0
    skipped: str | None = None  # why nothing was evaluated (e.g. the setting is off)


@dataclass(frozen=True)
class PreparedMessage:
    """A message made ready for the prompt: its stored token ids (None: the engine does
    not tokenize) and the turns the context had to drop to fit it."""

    token_ids: tuple[int, ...] | None
    trimmed: tuple[int, int] = (0, 0)


class SessionError(Exception):
    """A request the session refuses, explained in one line."""


class ContextOverflowError(SessionError):
    def __init__(self, over: int, n_ctx: int, documents: int = 0) -> None:
        if documents:
            text = (
                f"the attached documents ({documents} tokens) and the message are {over} "
                f"tokens over the context size of {n_ctx} tokens; detach a document or "
                "open the model with a larger context"
            )
        else:
            text = (
                f"the message is {over} tokens over the context size of {n_ctx} tokens; "
                "shorten it or open the model with a larger context"
            )
        super().__init__(text)
        self.over = over
        self.n_ctx = n_ctx


@dataclass
class GenerationOptions:
    max_tokens: int = 256
    temperature: float = 0.7
    seed: int = 0  # -1: random (see app.limits)
    sampling: Sampling = field(default_factory=Sampling)
    #: Replies sampled from the one prompt, stored as versions of the reply; the first
    #: is the one the turn keeps (see :meth:`Turn.keep`).
    alternatives: int = 1

    def __post_init__(self) -> None:
        # Refused here, before a turn stores the user's message.
        limits.check_max_tokens(self.max_tokens)
        limits.check_alternatives(self.alternatives)
        limits.check_temperature(self.temperature)
        limits.check_seed(self.seed)
        sampling = self.sampling
        limits.check_sampling(
            sampling.top_k, sampling.top_p, sampling.min_p, sampling.repeat_penalty
        )


@dataclass(frozen=True)
class Alternative:
    """One reply of alternatives, stored as a version of the reply (its chat: the branch
    of the family that holds it)."""

    chat_id: int
    message_id: int
    text: str


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
    #: Regenerate: the chat whose reply this one is a new version of (the reply is in a
    #: branch of its family, ``chat_id``; the old reply stays in that chat).
    version_of: int | None = None
    #: Alternatives: every reply stored, the kept one (this result's) first.
    alternatives: list[Alternative] = field(default_factory=list)


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
    #: The chat's attached documents in prompt order: (document id, tokens).
    documents: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class ChatContext:
    """A chat as one piece of work sees it: loaded once, kept current in memory."""

    chat: Chat
    messages: list[Message]
    block_text: str
    instruction_version: int | None
    documents: list[Document] = field(default_factory=list)

    @property
    def cached_messages(self) -> list[Message]:
        """History in the cache: from the trim point on, without unanswered user messages,
        so a prompt never holds two user messages in a row (Retry answers those). None
        when each question starts from the documents (the replies are kept, not prompted)."""
        if self.chat.no_history:
            return []
        unanswered = unanswered_ids(self.messages)
        return [
            m
            for m in self.messages
            if m.seq >= self.chat.cache_start_seq and m.id not in unanswered
        ]


def current_block(store: Store, chat_id: int) -> tuple[str, int | None]:
    """The chat's instruction block as the model sees it, and its version."""
    current = store.current_instructions(chat_id)
    if current is None:
        return "", None
    return render_instructions(current.text, current.variables), current.version


def chat_started(messages: list[Message]) -> datetime.datetime | None:
    """When the chat's first turn was sent (None before it): the date its template shows."""
    return datetime.datetime.fromtimestamp(messages[0].created_at) if messages else None


def load_chat_context(store: Store, chat_id: int) -> ChatContext:
    """A chat, its messages and its block, read once for one piece of work."""
    block, version = current_block(store, chat_id)
    return ChatContext(
        store.chat(chat_id), store.messages(chat_id), block, version, store.documents(chat_id)
    )


def group_turns(messages: list[Message]) -> list[list[Message]]:
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


class IdleWork:
    """Steps that run after a reply or an edit, one ``advance`` at a time, in a fixed order."""

    def __init__(self, session: ChatEngine, chat_id: int, steps: Sequence[Step]) -> None:
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

    def _context(self) -> ChatContext:
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
        if step == Step.COMMIT and context.chat.no_history:
            # Each question starts from the documents: nothing joins the prompt; the
            # warm-up takes the cache back to preamble · documents · block.
            result = StepResult(Step.COMMIT, notes=(COMMIT_SKIPPED,))
        elif step == Step.COMMIT:
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


class Upkeep(IdleWork):
    """Idle-time work with no reply: after an instruction edit or a trim change."""

    def _context(self) -> ChatContext:
        # Upkeep is rare and may follow other requests: it reads the chat anew each step.
        return self.session._load_context(self.chat_id)


class Turn(IdleWork):
    """One turn: ``respond`` first, then ``advance`` through commit, warm-up and save."""

    def __init__(
        self,
        session: ChatEngine,
        context: ChatContext,
        user: Message,
        options: GenerationOptions,
        load: StateLoad,
        started: float,
        trimmed: tuple[int, int],
        *,
        regenerated: bool,
        idle_steps: Sequence[Step] = IDLE_STEPS,
        replaces: Message | None = None,
        continues: Message | None = None,
    ) -> None:
        super().__init__(session, context.chat.id, idle_steps)
        self.context = context
        self.user = user
        self.options = options
        self.load = load
        self.started = started
        self.trimmed = trimmed
        self.regenerated = regenerated
        #: Regenerate: the reply the new one is a version of (never deleted).
        self.replaces = replaces
        #: Continue: the reply this turn extends (the same message, stored longer).
        self.continues = continues
        self.version_of: int | None = None
        self.stage = TurnStage.NEW
        self.result: TurnResult | None = None

    def _context(self) -> ChatContext:
        return self.context

    def store_reply(
        self,
        text: str,
        *,
        status: str,
        token_ids: list[int] | None = None,
        token_format: str | None = None,
    ) -> Message:
        """Store the reply after the chat's messages; for a regenerate, as a new version
        of the reply it replaces: a branch of the chat's family holding the messages
        before it and the new reply, written at once (the old reply is never deleted,
        so a failed regenerate loses nothing). The turn, and the cache, then continue in
        the branch."""
        store, chat = self.session.store, self.context.chat
        if self.continues is not None:
            reply = store.extend_reply(
                self.continues.id, self.continues.text + text, token_ids=token_ids,
                token_format=token_format, status=status,
            )  # fmt: skip
            self.context.messages[-1] = reply
            return reply
        if self.replaces is None:
            reply = store.add_message(
                chat.id, Role.ASSISTANT, text, token_ids=token_ids, token_format=token_format,
                status=status, instruction_version=self.context.instruction_version,
            )  # fmt: skip
            self.context.messages.append(reply)
            return reply
        branch, reply = store.add_reply_version(
            chat.id, self.replaces.seq, text,
            token_ids=token_ids, token_format=token_format, status=status,
        )  # fmt: skip
        self.session._cache_moved(chat.id, branch.id)
        self.version_of, self.chat_id = chat.id, branch.id
        self.context = self.session._load_context(branch.id)
        self.user = self.context.messages[-2]  # the branch's copy of the message answered
        return reply

    def keep_replaced(self) -> None:
        """No new reply (stopped before its first token): the idle steps see the chat as
        stored, with the reply a regenerate would have replaced."""
        if self.replaces is not None:
            self.context = self.session._load_context(self.chat_id)

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
        session = self.session
        respond = session._respond if self.continues is None else session._respond_continue
        self.result = respond(self, on_token, progress, cancel)
        self.stage = TurnStage.REPLIED
        return self.result

    def keep(self, index: int) -> Alternative:
        """Keep alternative ``index`` instead of the first: the idle steps then commit and
        save its chat (the prompt's cells are reused, its reply is evaluated on them)."""
        choices = self.result.alternatives if self.result is not None else []
        if self.stage != TurnStage.REPLIED or not 0 <= index < len(choices):
            raise SessionError("only a replied turn's alternatives can be kept, before commit")
        chosen = choices[index]
        if chosen.chat_id != self.chat_id:
            self.session._cache_moved(self.chat_id, chosen.chat_id)
            self.chat_id = chosen.chat_id
            self.context = self.session._load_context(chosen.chat_id)
            self.user = self.context.messages[-2]
        self.session.store.touch_chat(chosen.chat_id)  # the family opens on it
        return chosen

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
        metrics.cache_tokens = self.session.cache_size
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
        metrics.cache_tokens = self.session.cache_size
        if save.note:
            metrics.notes.append(save.note)
        self.session.store.update_metrics(self.result.metrics_id, metrics.as_dict())


class ChatEngine(ABC):
    """The chats of one store on one model, whoever runs the model.

    Callers (the CLI, the GUI's worker, the benchmark) use only this interface; the
    local llama.cpp engine (:class:`app.session.chat_session.ChatSession`) and the server
    engine (:class:`app.remote.session.RemoteChatSession`) implement it. Not thread-safe:
    one thread drives an engine; cancellation is a ``threading.Event`` set from anywhere.
    """

    #: Message token ids written by this engine are valid for this format (None: the
    #: engine stores no token ids, e.g. a server that tokenizes for itself).
    token_format: str | None = None

    def __init__(self, store: Store) -> None:
        self.store = store
        self.cache_chat_id: int | None = None
        self.bytes_per_token: float = 0.0
        self._current_work: IdleWork | None = None

    # -- facts ------------------------------------------------------------------------

    @property
    @abstractmethod
    def n_ctx(self) -> int: ...

    @property
    @abstractmethod
    def kv_type(self) -> str: ...

    @property
    @abstractmethod
    def backend_version(self) -> str: ...

    @abstractmethod
    def describe(self) -> EngineDescription:
        """The model as the status bar, About and ``chat --json`` show it."""

    @property
    @abstractmethod
    def cache_size(self) -> int:
        """Tokens the cache of the current chat holds now."""

    @property
    @abstractmethod
    def idle_order(self) -> tuple[Step, ...]:
        """The order of the idle-time steps for this model."""

    @property
    @abstractmethod
    def has_unsaved_cache(self) -> bool: ...

    #: What this engine's measurements are filed under (e.g. the eval's rates): the
    #: model file's identity, or the server's model.
    model_identity: str = ""

    @property
    def local_backend(self) -> LlamaBackend | None:
        """The llama.cpp model this engine runs in this process (None on a server): what
        work that needs the model's own context, such as the eval, borrows."""
        return None

    def template_warning(self) -> str | None:
        """A line to tell the user about the chat template in use (None: nothing)."""
        return None

    def template_info(self) -> TemplateInfo:
        """What can be chosen as this model's chat template."""
        raise SessionError("a server writes prompts with its own chat template")

    def use_template(self, choice: TemplateChoice | None) -> None:
        """Choose the model's chat template (None: the GGUF's own) and keep the choice."""
        raise SessionError("a server writes prompts with its own chat template")

    @abstractmethod
    def close(self) -> None: ...

    # -- chats and saved states -------------------------------------------------------

    @abstractmethod
    def activate(self, chat_id: int, context: ChatContext | None = None) -> StateLoad:
        """Make ``chat_id`` the cache's chat, restoring its saved state if it is valid."""

    def prefetch(self, chat_id: int) -> StateLoad:
        """Restore a chat's state before its next turn (e.g. when the user selects it)."""
        if self.cache_chat_id == chat_id:
            return StateLoad(restored=False, tokens=self.cache_size)
        return self.activate(chat_id, self._load_context(chat_id))

    @abstractmethod
    def save_state(self, chat_id: int) -> StateSave:
        """Persist the cache of ``chat_id``."""

    @abstractmethod
    def save_if_changed(self) -> StateSave | None:
        """Save the cache's chat if it changed since it was last saved."""

    @abstractmethod
    def drop_cache(self) -> None:
        """Empty the cache without saving it (the next turn recomputes everything)."""

    @abstractmethod
    def forget_chat(self, chat_id: int) -> None:
        """Drop the cache if it belongs to ``chat_id`` (the chat is closed or deleted)."""

    #: Saved states are pages in this store's KV file, so chats with the same history
    #: can share them (a copied state row); a server keeps its own slot files.
    shares_saved_pages: bool = False

    @abstractmethod
    def prefill_history(
        self, chat_id: int, *, with_block: bool, cancel: threading.Event | None = None
    ) -> bool:
        """Bring the chat's committed history (``with_block``: and its block) into the
        cache now, as after a long session (untimed set-up, e.g. the benchmark's);
        False if cancelled."""

    def prefill_draft(
        self,
        chat_id: int,
        text: str,
        *,
        block_text: str | None = None,
        cancel: threading.Event | None = None,
        progress: ProgressCallback | None = None,
    ) -> DraftPrefill:
        """Evaluate the prompt ``text`` would be sent as (history · block · the message
        as a user turn with the generation prompt) on top of the warm cache, so that Send
        pays only what differs. ``text`` empty: only the block (``block_text``: an edited
        version not stored yet) on top of the history. Cancellable between batches."""
        return DraftPrefill(chat_id, skipped="this engine does not prefill drafts")

    def _finish_idle_work(self, chat_id: int, cancel: threading.Event | None) -> bool:
        """Run the chat's pending idle-time steps (commit, warm-up, save): a draft goes on
        top of what they leave. False if cancelled or superseded first."""
        work = self._current_work
        if work is None or work.chat_id != chat_id or work.done:
            return True
        return work.run(cancel)

    # -- inspector --------------------------------------------------------------------

    @abstractmethod
    def edit_cost(
        self, chat_id: int, block_text: str, layout: str | None = None
    ) -> tuple[int, float | None]:
        """Tokens (and seconds at the measured speed) a new instruction block would cost."""

    @abstractmethod
    def cache_view(self, chat_id: int) -> CacheView: ...

    @abstractmethod
    def preview_trim(
        self, chat_id: int, limit: int | None, mode: str | None = None
    ) -> TrimPreview: ...

    @abstractmethod
    def set_trim(self, chat_id: int, limit: int | None, mode: str | None = None) -> TrimPreview: ...

    # -- what each engine does its own way --------------------------------------------

    @abstractmethod
    def _prepare_message(
        self,
        context: ChatContext,
        text: str,
        options: GenerationOptions,
        exclude: int | None = None,
    ) -> PreparedMessage:
        """Tokenize the message (if the engine does) and fit the context around it."""

    @abstractmethod
    def _respond(
        self,
        turn: Turn,
        on_token: TokenCallback | None,
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
    ) -> TurnResult:
        """Evaluate the prompt, generate and store the reply."""

    @abstractmethod
    def _respond_continue(
        self,
        turn: Turn,
        on_token: TokenCallback | None,
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
    ) -> TurnResult:
        """Continue: evaluate the history ending on the open reply, generate and store more
        of it (the same message)."""

    @abstractmethod
    def _cache_moved(self, from_chat_id: int, to_chat_id: int) -> None:
        """A regenerated reply went into a branch: what the cache holds is the branch's."""

    @abstractmethod
    def _commit(self, context: ChatContext, cancel: threading.Event | None) -> StepResult:
        """Make the cache hold exactly the committed history (no instruction block)."""

    @abstractmethod
    def _warm_up(self, context: ChatContext, cancel: threading.Event | None) -> StepResult:
        """history-first: put the current instruction block on top of the history."""

    # -- what every engine does the same way -------------------------------------------

    def _turn_metrics(self, turn: Turn) -> TurnMetrics:
        """A turn's metrics as it starts: its layout, how its state was loaded and why
        one was not used."""
        chat, load = turn.context.chat, turn.load
        metrics = TurnMetrics(
            layout=chat.layout,
            trim_mode=chat.trim_mode,
            state_load_ms=load.ms if (load.restored or load.rejected) else None,
            state_rejected=load.rejected,
            trimmed_turns=turn.trimmed[0],
            trimmed_tokens=turn.trimmed[1],
        )
        metrics.sampling = asdict(turn.options.sampling)
        if load.rejected:
            metrics.notes.append(f"saved state discarded: {load.rejected}")
        if load.note:
            metrics.notes.append(load.note)
        earlier = len(turn.context.messages) - 1
        if chat.no_history and earlier > 0:
            metrics.notes.append(
                f"each question starts from the documents: the {earlier} earlier messages are"
                " not in the prompt"
            )
        return metrics

    def _store_reply(
        self,
        turn: Turn,
        text: str,
        metrics: TurnMetrics,
        token_ids: Sequence[int] | None = None,
    ) -> TurnResult:
        """Store the reply (a stopped one as cancelled; nothing when no token came) and the
        turn's metrics row; the reply joins the turn's context for the idle-time steps."""
        reply_id = None
        status = (
            MessageStatus.CANCELLED
            if metrics.finish_reason == FinishReason.CANCELLED
            else MessageStatus.COMPLETE
        )
        if turn.continues is not None and not text:
            status = MessageStatus(turn.continues.status)  # nothing added: nothing changes
        if text or token_ids or turn.continues is not None:
            reply_id = turn.store_reply(
                text,
                token_ids=list(token_ids) if token_ids is not None else None,
                token_format=self.token_format if token_ids is not None else None,
                status=status,
            ).id
        else:
            turn.keep_replaced()
        metrics.cache_tokens = self.cache_size
        metrics_id = self.store.add_metrics(
            turn.chat_id, reply_id or turn.user.id, metrics.as_dict()
        )
        return TurnResult(
            turn.chat_id,
            turn.user.id,
            reply_id,
            text,
            metrics,
            metrics_id,
            turn.regenerated,
            turn.version_of,
        )

    def _store_alternatives(
        self,
        turn: Turn,
        result: TurnResult,
        others: Sequence[tuple[str, Sequence[int] | None]],
    ) -> TurnResult:
        """Store the other replies of alternatives (text, token ids) as versions of the
        kept one, ``result``'s: each a branch of the family, written at once; the family
        still opens on the kept one."""
        if result.reply_message_id is None or not others:
            return result
        kept = self.store.message(result.reply_message_id)
        versions = [Alternative(turn.chat_id, kept.id, result.reply)]
        for text, token_ids in others:
            if not text and not token_ids:
                result.metrics.notes.append("an alternative ended at once: not stored")
                continue
            branch, message = self.store.add_reply_version(
                turn.chat_id, kept.seq, text,
                token_ids=list(token_ids) if token_ids is not None else None,
                token_format=self.token_format if token_ids is not None else None,
                status=MessageStatus.COMPLETE,
            )  # fmt: skip
            versions.append(Alternative(branch.id, message.id, text))
        self.store.touch_chat(turn.chat_id)
        result.alternatives = versions
        return result

    # -- the turn API (the same for every engine) --------------------------------------

    def _block(self, chat_id: int) -> tuple[str, int | None]:
        return current_block(self.store, chat_id)

    def _load_context(self, chat_id: int) -> ChatContext:
        return load_chat_context(self.store, chat_id)

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
        replaced = None
        if text is None:
            while context.messages and context.messages[-1].role == Role.ASSISTANT:
                replaced = context.messages.pop()  # kept: the new reply is a version of it
            if not context.messages:
                raise SessionError("there is no message to reply to")
            user = context.messages[-1]
            trimmed = self._prepare_message(context, user.text, options, user.id).trimmed
        else:
            prepared = self._prepare_message(context, text, options)
            tokens = prepared.token_ids
            user = self.store.add_message(
                chat_id,
                Role.USER,
                text,
                token_ids=list(tokens) if tokens is not None else None,
                token_format=self.token_format if tokens is not None else None,
                instruction_version=context.instruction_version,
            )
            context.messages.append(user)
            trimmed = prepared.trimmed
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
            replaces=replaced,
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
        """A new version of the last reply (the old one is kept: see ``Turn.store_reply``),
        or the answer to a last unanswered message."""
        turn = self.start_turn(chat_id, None, options)
        return turn.respond(on_token=on_token, progress=progress, cancel=cancel)

    def start_continue(
        self,
        chat_id: int,
        options: GenerationOptions | None = None,
        *,
        idle_steps: Sequence[Step] = IDLE_STEPS,
    ) -> Turn:
        """Open a turn that extends the chat's last reply (e.g. one cut at max tokens).

        The prompt is the committed history with the reply left open (no end-of-turn
        markup), so the reply's cells are reused from the cache, as the turn left them or
        as the saved state restores them. The reply stays one message, stored longer.
        """
        started = time.perf_counter()
        context = self._load_context(chat_id)
        messages = context.messages
        if not messages or messages[-1].role != Role.ASSISTANT:
            raise SessionError("there is no reply to continue: the last message is not one")
        reply = messages[-1]
        if reply.seq < context.chat.cache_start_seq:
            raise SessionError("the reply to continue is outside the cached history")
        load = self.activate(chat_id, context)
        options = options or GenerationOptions()
        # The message the reply answers (the metrics of an empty continuation go nowhere else).
        user = next((m for m in reversed(messages[:-1]) if m.role == Role.USER), reply)
        turn = Turn(
            self, context, user, options, load, started, (0, 0),
            regenerated=False, idle_steps=idle_steps, continues=reply,
        )  # fmt: skip
        self._current_work = turn
        return turn

    def continue_reply(
        self,
        chat_id: int,
        options: GenerationOptions | None = None,
        *,
        on_token: TokenCallback | None = None,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> TurnResult:
        """Extend the chat's last reply from the cache (see :meth:`start_continue`)."""
        turn = self.start_continue(chat_id, options)
        return turn.respond(on_token=on_token, progress=progress, cancel=cancel)

    def edit_reply(self, chat_id: int, seq: int, text: str) -> tuple[Chat, Upkeep]:
        """Store ``text`` as a new version of the reply ``seq`` (the old one is kept) and
        return the branch holding it with the idle-time work that brings the cache to it:
        the cells of the common prefix stay, only the edited tokens are evaluated.

        The edited reply is complete, so it can be continued (:meth:`continue_reply`).
        """
        if not text.strip():
            raise SessionError("an edited reply cannot be empty; Regenerate writes a new one")
        context = self._load_context(chat_id)
        before = [m for m in context.messages if m.seq < seq]
        if not any(m.seq == seq and m.role == Role.ASSISTANT for m in context.messages):
            raise SessionError(f"message {seq} of this chat is not a reply")
        token_ids = self._reply_tokens(text)
        if token_ids is not None:
            used = sum(len(self._history_tokens(m)) for m in before)
            if used + len(token_ids) >= self.n_ctx:
                raise ContextOverflowError(used + len(token_ids) - self.n_ctx + 1, self.n_ctx)
        branch, _reply = self.store.add_reply_version(
            chat_id, seq, text, token_ids=list(token_ids) if token_ids is not None else None,
            token_format=self.token_format if token_ids is not None else None,
        )  # fmt: skip
        self._cache_moved(chat_id, branch.id)
        return branch, self.upkeep(branch.id)

    def _reply_tokens(self, text: str) -> tuple[int, ...] | None:
        """A reply's stored token ids for ``text`` (None: the engine does not tokenize)."""
        return None

    def _history_tokens(self, message: Message) -> tuple[int, ...]:
        """A message's tokens in the history (empty: the engine does not tokenize)."""
        return ()

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

    def idle_work(self, chat_id: int) -> IdleWork:
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
