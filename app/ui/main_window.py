"""The main window: chat list | conversation | instructions over the cache inspector.

:class:`WindowBase` holds what is shared (a read-only Store, the :class:`EngineHost` whose
worker thread does everything that touches the model or writes the database, the chat on
screen, the model in use, the widgets); this class makes the parts with one job each
(chats, turns, models, instructions, the cache panel, menus) and wires widgets and worker
answers to them. It never waits for the worker: every answer arrives as a signal.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QSettings, QTimer
from PySide6.QtGui import QCloseEvent

from app.domain import TemplateChoice
from app.storage.records import Chat
from app.ui.alternatives import AlternativesControl
from app.ui.bench_window import BenchWindow
from app.ui.cache_panel import CachePanel
from app.ui.chat_actions import ChatActions
from app.ui.documents import DocumentsController
from app.ui.instruction_drafts import InstructionDrafts
from app.ui.instruction_edits import InstructionEdits
from app.ui.live_prefill import LivePrefill
from app.ui.model_control import ModelControl
from app.ui.model_settings import ModelSettingsDialog
from app.ui.presets import PresetsController
from app.ui.reply_actions import ReplyActions
from app.ui.server_dialog import ServerDialog
from app.ui.turn_control import TurnControl
from app.ui.window_base import WindowBase
from app.ui.window_menus import WindowMenus

if TYPE_CHECKING:
    from app.session.engine import GenerationOptions


class MainWindow(WindowBase):
    """KV Chat's window: the shared base, its parts, and the wiring between them."""

    def __init__(
        self,
        db_path: str | Path,
        *,
        model_path: str | Path | None = None,
        settings: QSettings | None = None,
        n_ctx: int | None = None,
        kv_type: str = "f16",
        n_threads: int | None = None,
        models_dir: Path | None = None,
        chat_template: TemplateChoice | None = None,
    ) -> None:
        super().__init__(
            db_path,
            settings=settings,
            n_ctx=n_ctx,
            kv_type=kv_type,
            n_threads=n_threads,
            models_dir=models_dir,
            chat_template=chat_template,
        )
        self.drafts = InstructionDrafts(self.settings, self.instructions)
        self.chats = ChatActions(self, self.drafts)
        self.instruction_edits = InstructionEdits(self, self.chats, self.drafts)
        self.cache = CachePanel(self, self.chats, self.instruction_edits)
        self.turns = TurnControl(self, self.chats, self.instruction_edits)
        requested = str(model_path) if model_path else None
        self.models = ModelControl(self, self.turns, requested)
        self.menus = WindowMenus(self, self.chats, self.turns, self.models)
        self.reply_actions = ReplyActions(self, self.chats, self.turns)  # Continue, Edit
        self.presets = PresetsController(self, self.chats, self.instruction_edits)
        self.documents = DocumentsController(self, self.chats)  # attach, drop, detach, option
        self.model_menu = self.menus.model_menu
        self.models.fill_model_combo()
        self._connect_widgets()
        self._connect_worker()
        self.live_prefill = LivePrefill(
            self.host, self.input, self.instructions,
            lambda: self.current_chat_id, lambda: self.model is not None, self,
        )  # fmt: skip
        self.layout_area.restore(self, self.settings)
        self.first_run_banner = self.layout_area.show_first_run_note(self.settings, self.db_path)
        self._open_first_chat()
        self.model_status_label.setText("Loading model…")
        self.host.load_model(requested)

    # -- wiring -------------------------------------------------------------------

    def _connect_widgets(self) -> None:
        chats, turns, edits = self.chats, self.turns, self.instruction_edits
        self.model_combo.activated.connect(self.models.on_model_chosen)
        self.model_menu.aboutToShow.connect(lambda: self.models.fill_model_menu(self.model_menu))
        self.cancel_load_button.clicked.connect(self.models.cancel_model_load)
        self.sampling_panel.changed.connect(turns.store_sampling)
        self.input.send_requested.connect(turns.send)
        self.send_button.clicked.connect(turns.send)
        self.stop_button.clicked.connect(turns.stop)
        self.regenerate_button.clicked.connect(turns.regenerate)
        self.alternatives = AlternativesControl(
            self, self.regenerate_button, turns.regenerate_alternatives
        )
        self.chat_view.retry_requested.connect(turns.regenerate)
        self.chat_view.edit_requested.connect(turns.start_edit)
        self.composer.edit_cancelled.connect(turns.cancel_edit)
        chats.leaving_chat.connect(turns.cancel_edit)  # an edit belongs to its chat
        self.chat_view.fork_requested.connect(chats.fork_at)
        self.chat_view.branch_requested.connect(chats.switch_branch)
        self.chat_list.chat_selected.connect(chats.open_family)
        self.chat_list.new_requested.connect(lambda: chats.new_chat())
        self.chat_list.rename_requested.connect(chats.ask_rename)
        self.chat_list.delete_requested.connect(chats.ask_delete)
        self.chat_list.search_changed.connect(lambda _text: chats.refresh_chats())
        self.instructions.text_edited.connect(edits.request_edit_cost)
        self.instructions.save_requested.connect(edits.save_instructions)
        self.instructions.layout_changed.connect(edits.set_layout)
        self.eval_runner.rates_ready.connect(self.instructions.show_eval_rates)
        self.inspector.trim_preview_requested.connect(self.cache.request_trim_preview)
        self.inspector.trim_apply_requested.connect(self.cache.apply_trim)

    def _connect_worker(self) -> None:
        worker, models, turns, cache = self.host.worker, self.models, self.turns, self.cache
        worker.model_loading.connect(models.on_model_loading)
        worker.load_progress.connect(models.on_load_progress)
        worker.model_loaded.connect(models.on_model_loaded)
        worker.model_failed.connect(models.on_model_failed)
        worker.model_load_cancelled.connect(models.on_model_load_cancelled)
        worker.template_info.connect(models.on_template_info)
        worker.template_changed.connect(models.on_template_changed)
        worker.token.connect(turns.on_token)
        worker.progress.connect(turns.on_progress)
        worker.reply_finished.connect(turns.on_reply)
        worker.turn_failed.connect(turns.on_turn_failed)
        worker.background_finished.connect(cache.on_background)
        worker.trim_preview_ready.connect(cache.on_trim_preview)
        worker.trim_applied.connect(cache.on_trim_applied)
        worker.cache_view_ready.connect(cache.on_cache_view)
        worker.edit_cost_ready.connect(self.instruction_edits.on_edit_cost)
        worker.chat_deleted.connect(self.chats.on_chat_deleted)

    def _open_first_chat(self) -> None:
        """The chat selected in the list, or the newest, at the version used last."""
        self.chats.refresh_chats()
        first = self.chat_list.current_chat_id()
        if first is None and self.store.chats():
            first = self.store.chats()[0].id
        if first is not None:
            self.chats.open_family(first)  # the version used last, as before the restart
        else:
            self.update_actions()

    # -- what users (and tests and scripts) do, each done by one part ---------------

    def send(self) -> None:
        self.turns.send()

    def stop(self) -> None:
        self.turns.stop()

    def regenerate(self) -> None:
        self.turns.regenerate()

    def start_edit(self, seq: int) -> None:
        self.turns.start_edit(seq)

    def generation_options(self) -> GenerationOptions:
        return self.turns.generation_options()

    def current_chat(self) -> Chat | None:
        return self.chats.current_chat()

    def refresh_chats(self) -> None:
        self.chats.refresh_chats()

    def select_chat(self, chat_id: int) -> None:
        self.chats.select_chat(chat_id)

    def open_family(self, family_id: int) -> None:
        self.chats.open_family(family_id)

    def new_chat(self, then: Callable[[int], None] | None = None) -> None:
        self.chats.new_chat(then)

    def rename_chat(self, chat_id: int, name: str) -> None:
        self.chats.rename_chat(chat_id, name)

    def delete_chat(self, chat_id: int) -> None:
        self.chats.delete_chat(chat_id)

    def fork_at(self, seq: int) -> None:
        self.chats.fork_at(seq)

    def export_chat(self, path: str | Path, *, all_versions: bool = False) -> Path | None:
        return self.chats.export_chat(path, all_versions=all_versions)

    def save_instructions(
        self, text: str, variables: dict[str, str] | None = None, *, warm_up: bool = True
    ) -> None:
        self.instruction_edits.save_instructions(text, variables, warm_up=warm_up)

    def apply_trim(self, limit: int | None, mode: str) -> None:
        self.cache.apply_trim(limit, mode)

    def load_model(self, path: str | None) -> None:
        self.models.load_model(path)

    def connect_server(self, url: str, model: str = "", timeout_s: float | None = None) -> None:
        self.models.connect_server(url, model, timeout_s)

    def ask_server(self) -> ServerDialog:
        return self.models.ask_server()

    def ask_model_settings(self) -> ModelSettingsDialog:
        return self.models.ask_model_settings()

    def ask_chat_template(self) -> None:
        self.models.ask_chat_template()

    def set_theme(self, mode: str) -> None:
        self.menus.set_theme(mode)

    def show_benchmark(self) -> BenchWindow:
        return self.menus.show_benchmark()

    def about_text(self) -> str:
        return self.menus.about_text()

    # -- closing --------------------------------------------------------------------

    def closeEvent(self, event: QCloseEvent) -> None:
        """Save geometry, stop the worker (it saves the cache), join its thread, close the DB."""
        if not self._closed:
            self._closed = True
            self.drafts.keep(self.current_chat_id)
            self.menus.close_benchmark()  # cancels and joins its thread
            self.layout_area.save(self, self.settings)
            self.toolbar.save(self.settings)
            self.settings.sync()
            for timer in self.findChildren(QTimer):
                timer.stop()  # debounces must not fire on a closed store
            # The reader closes first: the worker's close then leaves no WAL behind.
            self.store.close()
            self.host.shutdown()
        event.accept()
