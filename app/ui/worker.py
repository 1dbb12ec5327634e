"""The engine's thread: one QObject that owns the ChatSession and its own Store connection.

The GUI thread never calls llama.cpp. It posts requests through queued signals of
:class:`EngineHost`; the :class:`EngineWorker` runs them one at a time in its own
QThread and answers with signals. Cancellation cannot wait in the queue behind the
job it is meant to stop, so it goes through ``threading.Event`` objects that the GUI
thread sets directly: one per turn (Stop/Esc), one per turn's background work
(commit, warm-up, save), which the next send pre-empts, and one per model load. llama.cpp
polls them inside a decode (its abort callback) and between a load's tensors.

No request is ever lost: whatever a slot raises, it still ends with its own outcome
signal (``turn_failed``, ``model_failed``, ``background_finished``, ...) and, for
errors the user did not cause, a line on ``error``; shutdown closes the engine and the
store even after a failure.
"""

from __future__ import annotations

import contextlib
import copy
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Qt, QThread, QTimer, Signal, Slot

from app.core.errors import DecodeError, ModelLoadCancelled
from app.core.metrics import TurnMetrics
from app.core.models import ModelFileError, check_gguf_file
from app.core.prompt import render_instructions
from app.domain import Step, TemplateChoice
from app.limits import DEFAULT_SERVER_TIMEOUT_S
from app.remote.client import ServerClient, ServerError
from app.remote.session import RemoteChatSession
from app.session.engine import (
    CacheView,
    ChatEngine,
    ContextOverflowError,
    DraftPrefill,
    EngineDescription,
    GenerationOptions,
    SessionError,
    TrimPreview,
    Turn,
    Upkeep,
)
from app.storage.errors import ChatNotFound
from app.storage.store import StorageError, Store

#: How long cut-short idle-time steps wait before they are redone: the request that
#: pre-empted them is queued by then and runs first.
RESUME_DELAY_MS = 50


def unexpected(error: BaseException) -> str:
    """One line for an error no handler expected; the traceback goes to stderr."""
    traceback.print_exception(error)
    return f"unexpected error: {type(error).__name__}: {error}"


def default_thread_count() -> int:
    """All cores but one: llama.cpp's busy threads must leave the GUI thread a core."""
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass(frozen=True)
class ModelStatus(EngineDescription):
    """What the window shows about the loaded model: the engine's description and how long
    the load took (plain data, safe to pass between threads)."""

    load_ms: float = 0.0

    @staticmethod
    def of(engine: ChatEngine, load_ms: float) -> ModelStatus:
        return ModelStatus(**asdict(engine.describe()), load_ms=load_ms)


@dataclass
class BackgroundOutcome:
    """Commit + warm-up + save after a reply, or why they stopped early.

    ``metrics_id`` is the turn's metrics row (None after an edit or a trim); ``metrics``
    is that row completed by the save, None when the steps were pre-empted.
    """

    chat_id: int
    metrics_id: int | None
    metrics: TurnMetrics | None
    completed: bool
    cache: CacheView | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class TurnRequest:
    chat_id: int
    text: str | None  # None: regenerate the last reply
    options: GenerationOptions
    cancel: threading.Event
    background_cancel: threading.Event
    continues: bool = False  # extend the last reply instead (Continue)


class EngineWorker(QObject):
    """Runs every model operation in its thread; talks to the GUI only through signals."""

    model_loading = Signal(str)
    load_progress = Signal(float)
    model_loaded = Signal(object)  # ModelStatus
    model_failed = Signal(str)
    model_load_cancelled = Signal(str)  # what was being loaded
    turn_started = Signal(int)
    token = Signal(int, str)  # chat id, text piece
    progress = Signal(int, str, int, int)  # chat id, phase, done, total
    reply_finished = Signal(object)  # TurnResult
    turn_failed = Signal(int, str, str)  # chat id, kind ("overflow" | "error"), message
    background_finished = Signal(object)  # BackgroundOutcome
    edit_cost_ready = Signal(int, int, int, object)  # request id, chat id, tokens, seconds
    trim_preview_ready = Signal(int, int, object)  # request id, chat id, TrimPreview
    trim_applied = Signal(int, object)  # chat id, TrimPreview
    cache_view_ready = Signal(int, object)  # chat id, CacheView
    chat_deleted = Signal(int)
    server_probed = Signal(int, bool, str)  # request id, reachable, description or error
    template_info = Signal(object)  # TemplateInfo, for the Chat template dialog
    template_changed = Signal(object)  # TemplateInfo, after a choice was applied
    error = Signal(str)
    store_changed = Signal(int, object)  # request id, what the change returned (or None)
    reply_edited = Signal(int, int, bool)  # chat id, the branch holding the edit, continue next
    draft_prefilled = Signal(object)  # DraftPrefill
    _continue_background = Signal(object)

    def __init__(
        self,
        store: Store,
        *,
        n_ctx: int | None = None,
        kv_type: str = "f16",
        n_threads: int | None = None,
        chat_template: TemplateChoice | None = None,
    ) -> None:
        super().__init__()
        self.store = store
        self.session: ChatEngine | None = None
        self.n_ctx = n_ctx
        self.kv_type = kv_type
        self.n_threads = n_threads
        #: A template given at start-up (--chat-template): applied to the first model
        #: loaded, which keeps it from then on.
        self.chat_template = chat_template
        self.shutting_down = threading.Event()
        self._changes: queue.SimpleQueue[tuple[int, StoreChange]] = queue.SimpleQueue()
        #: Chats whose idle-time steps were pre-empted or superseded before they finished:
        #: each gets a fresh upkeep once the worker is idle again, so the saved state always
        #: catches up with the committed history (insertion-ordered set).
        self.owed_upkeep: dict[int, None] = {}
        #: The host's current background flag, handed over when it pre-empts (an Event is
        #: thread-safe; the attribute is only ever replaced). Owed upkeep runs under it.
        self.latest_background_cancel = threading.Event()
        self._queued_jobs = 0  # idle-time steps waiting in this thread's queue
        self._resume_timer = QTimer(self)  # moves to the worker's thread with it
        self._resume_timer.setSingleShot(True)
        self._resume_timer.setInterval(RESUME_DELAY_MS)
        self._resume_timer.timeout.connect(self._resume_owed_upkeep)
        self._continue_background.connect(self._background_step, Qt.ConnectionType.QueuedConnection)

    # -- model ----------------------------------------------------------------------

    @Slot(object, str)
    def configure(self, n_ctx: int | None, kv_type: str) -> None:
        """Context size and KV type for the next model load."""
        self.n_ctx = n_ctx
        self.kv_type = kv_type

    @Slot(str, object)
    def load_model(self, path: str, cancel: threading.Event | None = None) -> None:
        """Load a GGUF; on failure keep the previous engine so the app stays usable.

        ``cancel`` set (the progress bar's Cancel) stops the load within one tensor.
        """
        if self.shutting_down.is_set():
            return
        self.model_loading.emit(path)
        started = time.perf_counter()
        if cancel is not None and cancel.is_set():
            self.model_load_cancelled.emit(path)
            return
        template, self.chat_template = self.chat_template, None  # the first load only
        try:
            # llama.cpp is loaded here, on the worker thread, and only for a local model.
            from app.session.chat_session import ChatSession

            model_path = check_gguf_file(path) if path else None
            engine = ChatSession(
                self.store,
                model_path,
                n_ctx=self.n_ctx,
                kv_type=self.kv_type,
                n_threads=self.n_threads,
                load_progress=self._on_load_progress,
                chat_template=template,
                load_cancel=cancel,
            )
        except ModelLoadCancelled:
            self.model_load_cancelled.emit(path)
            return
        except (ModelFileError, ValueError, OSError, SessionError) as error:
            self.model_failed.emit(str(error))
            return
        except Exception as error:  # e.g. an unreadable chat template: report, keep running
            self.model_failed.emit(unexpected(error))
            return
        self._replace_session(engine)
        self.model_loaded.emit(ModelStatus.of(engine, (time.perf_counter() - started) * 1000))
        self._schedule_owed_upkeep()

    @Slot()
    def describe_templates(self) -> None:
        """What Model → Chat template… offers for the loaded model."""
        try:
            self.template_info.emit(self._require_session().template_info())
        except (SessionError, StorageError) as error:
            self.error.emit(str(error))
        except Exception as error:
            self.error.emit(f"could not list the chat templates: {unexpected(error)}")

    @Slot(object)
    def set_chat_template(self, choice: TemplateChoice | None) -> None:
        """Use ``choice`` for the loaded model from now on (None: the GGUF's own)."""
        if self.shutting_down.is_set():
            return
        try:
            session = self._require_session()
            session.use_template(choice)
            self.template_changed.emit(session.template_info())
            self._schedule_owed_upkeep()
        except (SessionError, StorageError, ValueError) as error:
            self.error.emit(f"could not use the chat template: {error}")
        except Exception as error:
            self.error.emit(f"could not use the chat template: {unexpected(error)}")

    @Slot(str, str, float)
    def connect_server(self, url: str, model: str, timeout_s: float) -> None:
        """Use a server's model instead of the local one; every chat stays as it is."""
        if self.shutting_down.is_set():
            return
        self.model_loading.emit(url)
        started = time.perf_counter()
        try:
            remote = RemoteChatSession(self.store, url, model or None, timeout_s=timeout_s)
        except ServerError as error:
            self.model_failed.emit(str(error))
            return
        except Exception as error:  # a bug must not kill the worker thread
            traceback.print_exc()
            self.model_failed.emit(f"{type(error).__name__}: {error}")
            return
        self._replace_session(remote)
        self.model_loaded.emit(ModelStatus.of(remote, (time.perf_counter() - started) * 1000))
        self._schedule_owed_upkeep()

    @Slot(int, str, str)
    def probe_server(self, request_id: int, url: str, model: str) -> None:
        """The dialog's "Test connection": name, model and cache features, or why not."""
        try:
            client = ServerClient(url, model or None, connect_timeout=3.0, read_timeout=10.0)
            try:
                info = client.connect()
            finally:
                client.close()
        except ServerError as error:
            self.server_probed.emit(request_id, False, str(error))
            return
        except Exception as error:
            self.server_probed.emit(request_id, False, unexpected(error))
            return
        self.server_probed.emit(request_id, True, info.summary())

    def _on_load_progress(self, fraction: float) -> None:
        self.load_progress.emit(fraction)
        self.apply_changes()

    def _replace_session(self, engine: ChatEngine) -> None:
        """Make ``engine`` the session; the previous one is saved (if it can be) and closed."""
        previous, self.session = self.session, engine
        if previous is not None:
            self._close_session(previous)

    def _close_session(self, engine: ChatEngine) -> None:
        try:
            self._save_dirty_cache(engine)
        finally:
            try:
                engine.close()
            except Exception as error:
                self.error.emit(f"could not close the previous model: {unexpected(error)}")

    def _save_dirty_cache(self, engine: ChatEngine) -> None:
        try:
            engine.save_if_changed()
        except (SessionError, StorageError, DecodeError) as error:
            self.error.emit(f"could not save the cache of the open chat: {error}")
        except Exception as error:
            self.error.emit(f"could not save the cache of the open chat: {unexpected(error)}")

    def _require_session(self) -> ChatEngine:
        if self.session is None:
            raise SessionError("no model is loaded; pick one in the Model menu")
        return self.session

    # -- turns ----------------------------------------------------------------------

    @Slot(object)
    def run_turn(self, request: TurnRequest) -> None:
        """Send a message (or regenerate), then queue the turn's idle-time steps."""
        if self.shutting_down.is_set():
            return
        chat_id = request.chat_id
        self.turn_started.emit(chat_id)
        try:
            session = self._require_session()

            def on_token(piece: str) -> None:
                self.token.emit(chat_id, piece)
                self.apply_changes()

            def on_progress(phase: str, done: int, total: int) -> None:
                self.progress.emit(chat_id, phase, done, total)
                self.apply_changes()

            if request.continues:
                turn = session.start_continue(chat_id, request.options)
            else:
                turn = session.start_turn(chat_id, request.text, request.options)
            result = turn.respond(on_token=on_token, progress=on_progress, cancel=request.cancel)
        except ContextOverflowError as error:
            self.turn_failed.emit(chat_id, "overflow", str(error))
            return
        except (SessionError, StorageError, ValueError) as error:
            self.turn_failed.emit(chat_id, "error", str(error))
            return
        except DecodeError as error:  # llama.cpp failed; the cache was put back in step
            self.turn_failed.emit(chat_id, "error", f"the model failed: {error}")
            return
        except Exception as error:  # a bug must not kill the worker thread
            self.turn_failed.emit(chat_id, "error", unexpected(error))
            return
        # A snapshot: the turn's own metrics keep changing in this thread (commit, warm-up).
        self.reply_finished.emit(replace(result, metrics=copy.deepcopy(result.metrics)))
        self._queue_job(_IdleJob(turn, request.background_cancel))

    @Slot(int, int, str, bool, object)
    def edit_reply(
        self, chat_id: int, seq: int, text: str, then_continue: bool, cancel: threading.Event
    ) -> None:
        """Store an edited reply as a new version; its cache follows in idle time."""
        if self.shutting_down.is_set():
            return
        try:
            branch, upkeep = self._require_session().edit_reply(chat_id, seq, text)
        except (SessionError, StorageError, ValueError) as error:
            self.error.emit(f"The reply was not edited: {error}")
            return
        except Exception as error:
            self.error.emit(f"The reply was not edited: {unexpected(error)}")
            return
        self.reply_edited.emit(chat_id, branch.id, then_continue)
        if not then_continue:
            self._queue_job(_IdleJob(upkeep, cancel))

    @Slot(int, object)
    def prepare_chat(self, chat_id: int, cancel: threading.Event) -> None:
        """Warm up a chat's instruction block in idle time (after an edit)."""
        if self.shutting_down.is_set() or self.session is None:
            return
        try:
            upkeep = self.session.upkeep(chat_id, (Step.WARM_UP, Step.SAVE))
        except Exception as error:
            self.error.emit(f"could not prepare the chat: {unexpected(error)}")
            self.background_finished.emit(
                BackgroundOutcome(chat_id, None, None, False, notes=["failed to start"])
            )
            return
        self._queue_job(_IdleJob(upkeep, cancel))

    @Slot(int, object)
    def prefetch_chat(self, chat_id: int, cancel: threading.Event) -> None:
        """Restore a selected chat's saved state now, so its next send starts warm.

        Skipped when a send came first (it pre-empts background work and restores anyway).
        """
        if self.session is None or self.shutting_down.is_set() or cancel.is_set():
            return
        try:
            self.session.prefetch(chat_id)
        except ChatNotFound:
            return
        except (SessionError, StorageError, ValueError, DecodeError) as error:
            self.error.emit(f"could not restore the chat's saved state: {error}")
            return
        except Exception as error:
            self.error.emit(f"could not restore the chat's saved state: {unexpected(error)}")
            return
        view = self._cache_view(chat_id)
        if view is not None:
            self.cache_view_ready.emit(chat_id, view)

    @Slot(object)
    def _background_step(self, job: _IdleJob) -> None:
        """One idle-time step per queued call, so queued requests can run in between."""
        self._queued_jobs -= 1
        if self.session is None or self.shutting_down.is_set():
            return
        work = job.work
        failure: str | None = None
        if not job.cancel.is_set() and not work.done:
            step = work.next_step
            try:
                work.advance(job.cancel)
            except ChatNotFound:
                failure = "the chat was deleted"  # meanwhile: nothing to report
            except (SessionError, StorageError, ValueError, DecodeError) as error:
                failure = f"background {step} failed: {error}"
                self.error.emit(failure)
            except Exception as error:  # a bug must not leave the turn's steps hanging
                failure = f"background {step} failed: {unexpected(error)}"
                self.error.emit(failure)
            if failure is not None:
                work.stopped = True
            elif not work.done and not job.cancel.is_set():
                self._queue_job(job)
                return
        completed = not work.remaining
        if completed:
            self.owed_upkeep.pop(work.chat_id, None)
        elif failure is None:  # pre-empted or superseded: redo it when idle again
            self.owed_upkeep[work.chat_id] = None
        turn = work if isinstance(work, Turn) else None
        metrics = None
        if turn and turn.metrics and completed:
            metrics = copy.deepcopy(turn.metrics)  # the engine's own goes on changing
        self.background_finished.emit(
            BackgroundOutcome(
                chat_id=work.chat_id,
                metrics_id=turn.result.metrics_id if turn and turn.result else None,
                metrics=metrics,
                completed=completed,
                cache=self._cache_view(work.chat_id),
                notes=[] if completed else [failure or "pre-empted by a new request"],
            )
        )
        self._schedule_owed_upkeep()

    @Slot(object)
    def prefill_draft(self, request: DraftRequest) -> None:
        """Live prefill: the draft's prompt on top of the warm cache, as idle work that
        any newer request cancels (its flag is set by the host before the request is
        queued, so a stale draft never starts)."""
        if self.session is None or self.shutting_down.is_set() or request.cancel.is_set():
            return
        block = None
        if request.block is not None:
            block = render_instructions(*request.block)
        try:
            done: DraftPrefill = self.session.prefill_draft(
                request.chat_id, request.text, block_text=block, cancel=request.cancel
            )
        except (ChatNotFound, SessionError, StorageError, ValueError):
            return  # a draft is a bet: a chat gone or a refusal costs nothing
        except DecodeError as error:
            self.error.emit(f"the live prefill failed: {error}")
            return
        except Exception as error:
            self.error.emit(f"the live prefill failed: {unexpected(error)}")
            return
        self.draft_prefilled.emit(done)

    def _queue_job(self, job: _IdleJob) -> None:
        self._queued_jobs += 1
        self._continue_background.emit(job)

    def _schedule_owed_upkeep(self) -> None:
        """Resume cut-short steps shortly: a request that pre-empted them runs first."""
        if self.owed_upkeep and not self.shutting_down.is_set():
            self._resume_timer.start()

    @Slot()
    def _resume_owed_upkeep(self) -> None:
        """Queue the upkeep of one chat whose idle-time steps were cut short.

        Only when no other idle-time step is queued and nothing pre-empted background
        work meanwhile (a turn's own steps must never be superseded by this); the
        upkeep's completion then schedules the next owed chat, one at a time.
        """
        cancel = self.latest_background_cancel
        if self.session is None or self.shutting_down.is_set() or cancel.is_set():
            return
        if not self.owed_upkeep or self._queued_jobs:
            return
        chat_id = next(iter(self.owed_upkeep))
        del self.owed_upkeep[chat_id]
        try:
            upkeep = self.session.upkeep(chat_id)
        except Exception as error:
            self.error.emit(f"could not resume the chat's idle-time steps: {unexpected(error)}")
            return
        self._queue_job(_IdleJob(upkeep, cancel))

    def _cache_view(self, chat_id: int) -> CacheView | None:
        if self.session is None:
            return None
        try:
            return self.session.cache_view(chat_id)
        except (SessionError, StorageError):
            return None
        except Exception as error:
            self.error.emit(f"could not describe the cache: {unexpected(error)}")
            return None

    # -- previews and settings ------------------------------------------------------

    @Slot(int, int, str, object, str)
    def edit_cost(
        self, request_id: int, chat_id: int, text: str, variables: dict[str, str], layout: str
    ) -> None:
        if self.session is None or self.shutting_down.is_set():
            return
        try:
            block = render_instructions(text, variables)
            tokens, seconds = self.session.edit_cost(chat_id, block, layout or None)
        except (SessionError, StorageError, ValueError):
            return
        except Exception as error:
            self.error.emit(f"could not estimate the edit's cost: {unexpected(error)}")
            return
        self.edit_cost_ready.emit(request_id, chat_id, tokens, seconds)

    @Slot(int, int, object, str)
    def preview_trim(self, request_id: int, chat_id: int, limit: int | None, mode: str) -> None:
        if self.session is None or self.shutting_down.is_set():
            return
        try:
            preview: TrimPreview = self.session.preview_trim(chat_id, limit, mode)
        except (SessionError, StorageError, ValueError):
            return
        except Exception as error:
            self.error.emit(f"could not preview the limit: {unexpected(error)}")
            return
        self.trim_preview_ready.emit(request_id, chat_id, preview)

    @Slot(int, object, str, object)
    def apply_trim(
        self, chat_id: int, limit: int | None, mode: str, background_cancel: threading.Event
    ) -> None:
        """Set the limit now (turns may leave or come back), then warm up in idle time."""
        if self.session is None or self.shutting_down.is_set():
            return
        try:
            self.session.activate(chat_id)
            preview = self.session.set_trim(chat_id, limit, mode)
            upkeep = self.session.upkeep(chat_id)
        except (SessionError, StorageError, ValueError, DecodeError) as error:
            self.error.emit(f"could not change the cached-history limit: {error}")
            return
        except Exception as error:
            self.error.emit(f"could not change the cached-history limit: {unexpected(error)}")
            return
        self.trim_applied.emit(chat_id, preview)
        self._queue_job(_IdleJob(upkeep, background_cancel))

    @Slot(int)
    def refresh_cache_view(self, chat_id: int) -> None:
        if self.shutting_down.is_set():
            return
        view = self._cache_view(chat_id)
        if view is not None:
            self.cache_view_ready.emit(chat_id, view)

    @Slot(int)
    def delete_chat(self, chat_id: int) -> None:
        """Forget the chat's cache, then delete it (after any turn still running for it)."""
        try:
            doomed = [chat.id for chat in self.store.family(chat_id)]
            if self.store.chat(chat_id).root_chat_id is not None:
                doomed = [chat_id]  # a branch alone; the first chat takes its branches along
            if self.session is not None:
                for doomed_id in doomed:
                    self.session.forget_chat(doomed_id)
            self.store.delete_chat(chat_id)
        except ChatNotFound:
            return  # already gone
        except StorageError as error:
            self.error.emit(f"could not delete the chat: {error}")
            return
        except Exception as error:
            self.error.emit(f"could not delete the chat: {unexpected(error)}")
            return
        self.chat_deleted.emit(chat_id)
        self._schedule_owed_upkeep()

    def submit_change(self, request_id: int, change: StoreChange) -> None:
        """Queue a change the window asks for (called from the GUI thread)."""
        self._changes.put((request_id, change))

    @Slot()
    def apply_changes(self) -> None:
        """Apply the window's queued changes: this thread is the database's one writer,
        so the GUI thread never waits on a write lock. Also run between the tokens of a
        reply and the batches of a prefill or a model load, so a change waits for one
        step, not for the whole reply."""
        while True:
            try:
                request_id, change = self._changes.get_nowait()
            except queue.Empty:
                return
            try:
                result = change.apply(self.store)
            except (ValueError, StorageError) as error:
                self.error.emit(f"{change.what}: {error}")
                result = None
            except Exception as error:
                self.error.emit(f"{change.what}: {unexpected(error)}")
                result = None
            self.store_changed.emit(request_id, result)

    @Slot()
    def shutdown(self) -> None:
        """Save the open chat's cache if it changed, free the model, close the database.

        The model and the database are closed even if saving (or closing) raised.
        """
        self.shutting_down.set()
        self.apply_changes()  # the window's last changes are written, not dropped
        self._resume_timer.stop()
        session, self.session = self.session, None
        try:
            if session is not None:
                self._close_session(session)
        finally:
            try:
                self.store.close()
            except Exception as error:
                self.error.emit(f"could not close the database: {unexpected(error)}")


@dataclass(frozen=True)
class StoreChange:
    """A write the window asks the worker to make (``apply`` runs on the worker thread
    with its store); ``what`` names it in an error message."""

    what: str
    apply: Callable[[Store], object]


@dataclass(frozen=True)
class DraftRequest:
    """A draft to prefill: the composer's text (``block``: an edited instruction block,
    its text and variables, warmed instead) and the flag a newer request sets."""

    chat_id: int
    text: str
    cancel: threading.Event
    block: tuple[str, dict[str, str]] | None = None


@dataclass
class _IdleJob:
    """A turn's (or an upkeep's) remaining steps and the flag that pre-empts them."""

    work: Turn | Upkeep
    cancel: threading.Event


class EngineHost(QObject):
    """The GUI thread's handle on the worker: queues requests, owns the cancel flags."""

    _configure = Signal(object, str)
    _load_model = Signal(str, object)
    _connect_server = Signal(str, str, float)
    _probe_server = Signal(int, str, str)
    _run_turn = Signal(object)
    _prepare_chat = Signal(int, object)
    _prefetch_chat = Signal(int, object)
    _edit_cost = Signal(int, int, str, object, str)
    _preview_trim = Signal(int, int, object, str)
    _apply_trim = Signal(int, object, str, object)
    _refresh_cache_view = Signal(int)
    _delete_chat = Signal(int)
    _edit_reply = Signal(int, int, str, bool, object)
    _describe_templates = Signal()
    _set_chat_template = Signal(object)
    _apply_changes = Signal()
    _prefill_draft = Signal(object)
    _shutdown = Signal()

    def __init__(
        self,
        db_path: Path,
        *,
        n_ctx: int | None = None,
        kv_type: str = "f16",
        n_threads: int | None = None,
        chat_template: TemplateChoice | None = None,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        # Exclusive: a second KV Chat on the same database fails here, before any thread starts.
        store = Store(db_path, exclusive=True)
        self.worker = EngineWorker(
            store,
            n_ctx=n_ctx,
            kv_type=kv_type,
            n_threads=n_threads or default_thread_count(),
            chat_template=chat_template,
        )
        self.engine_thread = QThread()
        self.engine_thread.setObjectName("kvchat-engine")
        self.worker.moveToThread(self.engine_thread)
        queued = Qt.ConnectionType.QueuedConnection
        self._configure.connect(self.worker.configure, queued)
        self._load_model.connect(self.worker.load_model, queued)
        self._connect_server.connect(self.worker.connect_server, queued)
        self._probe_server.connect(self.worker.probe_server, queued)
        self._run_turn.connect(self.worker.run_turn, queued)
        self._prepare_chat.connect(self.worker.prepare_chat, queued)
        self._prefetch_chat.connect(self.worker.prefetch_chat, queued)
        self._edit_cost.connect(self.worker.edit_cost, queued)
        self._preview_trim.connect(self.worker.preview_trim, queued)
        self._apply_trim.connect(self.worker.apply_trim, queued)
        self._refresh_cache_view.connect(self.worker.refresh_cache_view, queued)
        self._delete_chat.connect(self.worker.delete_chat, queued)
        self._edit_reply.connect(self.worker.edit_reply, queued)
        self._describe_templates.connect(self.worker.describe_templates, queued)
        self._set_chat_template.connect(self.worker.set_chat_template, queued)
        self._apply_changes.connect(self.worker.apply_changes, queued)
        self._prefill_draft.connect(self.worker.prefill_draft, queued)
        self._shutdown.connect(self.worker.shutdown, Qt.ConnectionType.BlockingQueuedConnection)
        self.turn_cancel: threading.Event | None = None
        self.draft_cancel = threading.Event()
        self.load_cancel = threading.Event()
        self.background_cancel = self.worker.latest_background_cancel
        self._request_ids = 0
        self.busy_chat_id: int | None = None
        self._after_change: dict[int, Callable[[Any], None]] = {}
        #: Changes sent to the worker whose results (and follow-ups) have not arrived yet.
        self.changes_in_flight = 0
        self.worker.store_changed.connect(self._on_store_changed)
        self.worker.turn_started.connect(self._on_turn_started)
        self.worker.reply_finished.connect(self._on_turn_over)
        self.worker.turn_failed.connect(self._on_turn_over)
        self.engine_thread.start()

    # -- requests -------------------------------------------------------------------

    def next_request_id(self) -> int:
        self._request_ids += 1
        return self._request_ids

    def _preempt_background(self) -> threading.Event:
        """Stop idle-time work now: the worker is inside a Python call, the queue would wait.

        The worker requeues what was cut short (under the new flag) once it is idle again.
        """
        self.cancel_draft()
        self.background_cancel.set()
        self.background_cancel = threading.Event()
        self.worker.latest_background_cancel = self.background_cancel
        return self.background_cancel

    def prefill_draft(
        self, chat_id: int, text: str, block: tuple[str, dict[str, str]] | None = None
    ) -> None:
        """Prefill a draft in idle time (the previous draft is cancelled: this one is newer)."""
        self.cancel_draft()
        self._prefill_draft.emit(DraftRequest(chat_id, text, self.draft_cancel, block))

    def cancel_draft(self) -> None:
        """Stop the draft being prefilled at its next batch (chat switch, send, newer text)."""
        self.draft_cancel.set()
        self.draft_cancel = threading.Event()

    def change_store(
        self,
        what: str,
        apply: Callable[[Store], object],
        then: Callable[[Any], None] | None = None,
    ) -> None:
        """Have the worker write ``apply(store)``; ``then`` gets its result on this thread
        (None when it failed: the error signal says why)."""
        request_id = self.next_request_id()
        if then is not None:
            self._after_change[request_id] = then
        self.changes_in_flight += 1
        self.worker.submit_change(request_id, StoreChange(what, apply))
        self._apply_changes.emit()

    def _on_store_changed(self, request_id: int, result: object) -> None:
        then = self._after_change.pop(request_id, None)
        try:
            if then is not None:
                then(result)
        finally:
            self.changes_in_flight -= 1

    def load_model(
        self, path: str | None, *, n_ctx: int | None = None, kv_type: str | None = None
    ) -> None:
        """Load a model; with n_ctx / kv_type, those apply from this load on."""
        self._preempt_background()
        if n_ctx is not None or kv_type is not None:
            self._configure.emit(n_ctx, kv_type or self.worker.kv_type)
        self.load_cancel.set()  # a newer load supersedes one still queued or running
        self.load_cancel = threading.Event()
        self._load_model.emit(path or "", self.load_cancel)

    def cancel_load(self) -> None:
        """Stop the model load under way (and any queued): the previous model stays."""
        self.load_cancel.set()

    def connect_server(
        self, url: str, model: str, timeout_s: float = DEFAULT_SERVER_TIMEOUT_S
    ) -> None:
        self._preempt_background()
        self._connect_server.emit(url, model, timeout_s)

    def probe_server(self, url: str, model: str) -> int:
        request_id = self.next_request_id()
        self._probe_server.emit(request_id, url, model)
        return request_id

    def send(self, chat_id: int, text: str, options: GenerationOptions) -> None:
        background = self._preempt_background()
        self.turn_cancel = threading.Event()
        self._run_turn.emit(TurnRequest(chat_id, text, options, self.turn_cancel, background))

    def regenerate(self, chat_id: int, options: GenerationOptions) -> None:
        background = self._preempt_background()
        self.turn_cancel = threading.Event()
        self._run_turn.emit(TurnRequest(chat_id, None, options, self.turn_cancel, background))

    def continue_reply(self, chat_id: int, options: GenerationOptions) -> None:
        """Extend the chat's last reply (Continue); answered like a turn."""
        background = self._preempt_background()
        self.turn_cancel = threading.Event()
        request = TurnRequest(chat_id, None, options, self.turn_cancel, background, True)
        self._run_turn.emit(request)

    def edit_reply(self, chat_id: int, seq: int, text: str, then_continue: bool) -> None:
        """Store an edited reply as a new version (answered by ``reply_edited``)."""
        background = self._preempt_background()
        self._edit_reply.emit(chat_id, seq, text, then_continue, background)

    def stop(self) -> None:
        """Stop the running turn at the next token (its partial reply is kept, marked stopped)."""
        if self.turn_cancel is not None:
            self.turn_cancel.set()

    def prepare_chat(self, chat_id: int) -> None:
        self._prepare_chat.emit(chat_id, self.background_cancel)

    def prefetch_chat(self, chat_id: int) -> None:
        """Restore the chat's state in the background; the next send pre-empts it."""
        self.cancel_draft()  # another chat is shown: the draft of the one left is moot
        self._prefetch_chat.emit(chat_id, self.background_cancel)

    def request_edit_cost(
        self, chat_id: int, text: str, variables: dict[str, str], layout: str
    ) -> int:
        request_id = self.next_request_id()
        self._edit_cost.emit(request_id, chat_id, text, dict(variables), layout)
        return request_id

    def request_trim_preview(self, chat_id: int, limit: int | None, mode: str) -> int:
        request_id = self.next_request_id()
        self._preview_trim.emit(request_id, chat_id, limit, mode)
        return request_id

    def apply_trim(self, chat_id: int, limit: int | None, mode: str) -> None:
        background = self._preempt_background()
        self._apply_trim.emit(chat_id, limit, mode, background)

    def refresh_cache_view(self, chat_id: int) -> None:
        self._refresh_cache_view.emit(chat_id)

    def describe_templates(self) -> None:
        """Ask what Model → Chat template… offers (answered by ``template_info``)."""
        self._describe_templates.emit()

    def set_chat_template(self, choice: TemplateChoice | None) -> None:
        """Use another chat template for the loaded model (answered by ``template_changed``)."""
        self._preempt_background()
        self._set_chat_template.emit(choice)

    def delete_chat(self, chat_id: int) -> None:
        if self.busy_chat_id == chat_id:
            self.stop()
        self._preempt_background()
        self._delete_chat.emit(chat_id)

    def shutdown(self, timeout_ms: int = 60_000) -> None:
        """Cancel everything, let the worker save and free the model, then join the thread."""
        if not self.engine_thread.isRunning():
            return
        self.worker.shutting_down.set()
        self.stop()
        self.load_cancel.set()
        self.background_cancel.set()
        self.draft_cancel.set()
        with contextlib.suppress(RuntimeError):
            self._shutdown.emit()  # blocks until the worker has run it
        self.engine_thread.quit()
        self.engine_thread.wait(timeout_ms)

    # -- bookkeeping ----------------------------------------------------------------

    @Slot(int)
    def _on_turn_started(self, chat_id: int) -> None:
        self.busy_chat_id = chat_id

    @Slot()
    def _on_turn_over(self, *_: object) -> None:
        self.busy_chat_id = None
