"""The main window: chat list | conversation | instructions over the cache inspector.

The window owns a non-exclusive Store for reads and light writes (chat list, messages,
instruction versions, layout) and an :class:`EngineHost` whose worker thread does
everything that touches the model. It never waits for the worker: every answer
arrives as a signal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from PySide6.QtCore import QByteArray, QSettings, QSize, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QActionGroup, QCloseEvent, QIcon, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QInputDialog,
    QLabel,
    QMainWindow,
    QMenu,
    QMessageBox,
    QProgressBar,
    QSizePolicy,
    QSpinBox,
    QSplitter,
    QToolBar,
    QToolButton,
    QVBoxLayout,
    QWidget,
    QWidgetAction,
)

from app import limits
from app.core.models import ModelChoice, available_models
from app.domain import FinishReason, TemplateChoice
from app.resources import resource_path
from app.session.engine import GenerationOptions
from app.storage.errors import ChatNotFound
from app.storage.export import export_chat
from app.storage.records import Chat
from app.storage.store import StorageError, Store
from app.ui import theme
from app.ui.bench_window import BenchWindow
from app.ui.chat_list import ChatListPanel
from app.ui.chat_view import ChatView
from app.ui.composer import Composer, ElidedLabel
from app.ui.dialogs import InfoBanner, about_html, storage_note
from app.ui.documents import DocumentsController, WindowHooks
from app.ui.inspector import CacheInspector, format_bytes
from app.ui.instructions import LAYOUT_LABELS, InstructionEditor, describe_edit_cost
from app.ui.model_settings import ModelSettingsDialog
from app.ui.quality_tab import EvalRunner
from app.ui.sampling import SamplingPanel, load_chat_sampling, store_chat_sampling
from app.ui.screen_fit import fit_window, restore_window, save_window
from app.ui.server_dialog import ServerDialog
from app.ui.template_dialog import ChatTemplateDialog, describe_origin
from app.ui.worker import BackgroundOutcome, EngineHost, ModelStatus

if TYPE_CHECKING:  # the window only receives these from the worker's signals
    from app.session.engine import TemplateInfo, TurnResult

DEFAULT_SIZE = (1400, 900)
BENCH_SIZE = QSize(900, 720)  # shrunk to fit smaller screens
LIVE_SPEED_AFTER_S = 0.3  # the live tok/s appears once it means something
ICON_FILE = ("icons", "kvchat-256.png")  # from the packaging work; optional
OPEN_GGUF = "__open__"
_Slot = TypeVar("_Slot", bound=Callable[..., None])


def _unless_closed(slot: _Slot) -> _Slot:
    """Worker answers still queued when the window closed must not touch the closed store."""

    @functools.wraps(slot)
    def guarded(self: MainWindow, *args: Any, **kwargs: Any) -> None:
        if not self._closed:
            slot(self, *args, **kwargs)

    return guarded  # type: ignore[return-value]


class MainWindow(QMainWindow):
    """KV Chat's window. Signals below let tests (and scripts) wait for the worker."""

    model_ready = Signal(object)  # ModelStatus
    model_error = Signal(str)
    template_dialog_shown = Signal(object)  # ChatTemplateDialog
    template_applied = Signal(object)  # TemplateInfo
    model_load_cancelled = Signal(str)  # the path whose load was cancelled
    reply_received = Signal(object)  # TurnResult
    turn_error = Signal(str, str)  # kind, message
    background_done = Signal(object)  # BackgroundOutcome
    trim_preview_shown = Signal(object)  # TrimPreview
    trim_changed = Signal(int, object)  # chat id, TrimPreview
    edit_cost_shown = Signal(int, object)  # tokens, seconds
    cache_view_shown = Signal(object)
    chat_removed = Signal(int)
    error_shown = Signal(str)

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
        super().__init__()
        self.db_path = Path(db_path)
        self.settings = settings if settings is not None else QSettings("kvchat", "kvchat")
        self.models_dir = models_dir
        if n_ctx is None and self.settings.value("model/n_ctx"):  # Model settings…
            n_ctx = int(self.settings.value("model/n_ctx"))
            kv_type = str(self.settings.value("model/kv_type", kv_type))
        # Exclusive store first: a second instance fails here, before anything else starts.
        self.host = EngineHost(
            self.db_path,
            n_ctx=n_ctx,
            kv_type=kv_type,
            n_threads=n_threads,
            chat_template=chat_template,
            parent=self,
        )
        self._template_dialog_wanted = False
        # The window only reads; every write goes to the worker, the database's one writer.
        self.store = Store(self.db_path, read_only=True, live=True)
        self.current_chat_id: int | None = None
        self.model: ModelStatus | None = None
        self.busy = False
        self._stream_pieces = 0  # reply pieces of the turn streaming now (live tok/s)
        self._stream_started: float | None = None
        self.pending_text: str | None = None
        self._pending_typed = ""
        self.editing_seq: int | None = None  # a sent user message being edited
        self.last_error: str | None = None
        self._closed = False
        self._sending = False  # a send waits for its chat or version to be made
        self._chat_waiters: list[Callable[[int], None]] = []
        self._edit_cost_request = 0
        self._edit_cost_refresh = False
        self._trim_request = 0
        self._requested_model: str | None = str(model_path) if model_path else None
        self.bench_window: BenchWindow | None = None
        self.eval_runner = EvalRunner(self.host)  # answer-quality evals, on the worker thread

        self.setWindowTitle("KV Chat")
        icon = resource_path(*ICON_FILE)
        if icon.is_file():
            self.setWindowIcon(QIcon(str(icon)))
        self._build_toolbar()
        self._build_central()
        self._build_status_bar()
        self._build_menus()
        self._build_shortcuts()
        self._connect_worker()
        self.documents = DocumentsController(  # attach, drop, detach, the chat's option
            self, WindowHooks(self.host, self.store, self.chat_view, lambda: self.current_chat_id,
                              self.select_chat, self.new_chat, self.show_error),
        )  # fmt: skip
        self.cache_view_shown.connect(self.documents.show_cache_view)
        self._restore_settings()
        self._show_first_run_note()
        self.refresh_chats()
        first = self.chat_list.current_chat_id()
        if first is None and self.store.chats():
            first = self.store.chats()[0].id
        if first is not None:
            self.open_family(first)  # the version used last, as before the restart
        else:
            self._update_actions()
        self.model_status_label.setText("Loading model…")
        self.host.load_model(self._requested_model)

    # -- construction ---------------------------------------------------------------

    def _build_toolbar(self) -> None:
        toolbar = QToolBar("Main")
        toolbar.setObjectName("mainToolbar")
        toolbar.setMovable(False)
        self.addToolBar(toolbar)
        toolbar.addWidget(QLabel(" Model "))
        self.model_combo = QComboBox()
        self.model_combo.setObjectName("modelCombo")
        self.model_combo.setMinimumWidth(260)
        toolbar.addWidget(self.model_combo)
        self._fill_model_combo()
        self.model_combo.activated.connect(self._on_model_chosen)
        toolbar.addSeparator()
        toolbar.addWidget(QLabel(" Max tokens "))
        self.max_tokens_spin = QSpinBox()
        self.max_tokens_spin.setRange(1, 4096)
        self.max_tokens_spin.setValue(int(str(self.settings.value("generation/max_tokens", 256))))
        self.max_tokens_spin.setToolTip("Longest reply, in tokens")
        toolbar.addWidget(self.max_tokens_spin)
        toolbar.addWidget(QLabel(" Temperature "))
        self.temperature_spin = QDoubleSpinBox()
        self.temperature_spin.setRange(0.0, 2.0)
        self.temperature_spin.setSingleStep(0.1)
        self.temperature_spin.setDecimals(2)
        self.temperature_spin.setValue(
            float(str(self.settings.value("generation/temperature", 0.7)))
        )
        self.temperature_spin.setToolTip("0 always picks the most likely token (repeatable)")
        toolbar.addWidget(self.temperature_spin)
        self.sampling_panel = SamplingPanel()
        self.sampling_panel.changed.connect(self._store_sampling)
        self.sampling_button = QToolButton()
        self.sampling_button.setText("Sampling")
        self.sampling_button.setToolTip("Top-k, top-p, min-p, repeat penalty and seed (per chat)")
        self.sampling_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        sampling_menu = QMenu(self.sampling_button)
        panel_action = QWidgetAction(sampling_menu)
        panel_action.setDefaultWidget(self.sampling_panel)
        sampling_menu.addAction(panel_action)
        self.sampling_button.setMenu(sampling_menu)
        toolbar.addWidget(self.sampling_button)

    def _build_central(self) -> None:
        self.chat_list = ChatListPanel()
        self.chat_view = ChatView()
        self.instructions = InstructionEditor()
        self.inspector = CacheInspector()

        chat_column = QWidget()
        chat_column.setObjectName("chatColumnPanel")
        column = QVBoxLayout(chat_column)
        column.setContentsMargins(0, 0, 0, 0)
        column.setSpacing(0)
        self.banner_slot = QVBoxLayout()
        self.banner_slot.setContentsMargins(8, 8, 8, 0)
        column.addLayout(self.banner_slot)
        self.chat_title = QLabel("")
        self.chat_title.setObjectName("chatTitle")
        column.addWidget(self.chat_title)
        column.addWidget(self.chat_view, 1)
        enter_sends = self.settings.value("composer/enter_sends", True, type=bool)
        self.composer = Composer(bool(enter_sends))
        self.chat_view.set_send_hint(enter_sends=bool(enter_sends))
        self.input = self.composer.input
        self.turn_status = self.composer.turn_status
        self.regenerate_button = self.composer.regenerate_button
        self.stop_button = self.composer.stop_button
        self.send_button = self.composer.send_button
        self.input.send_requested.connect(self.send)
        column.addWidget(self.composer)

        self.side_splitter = QSplitter(Qt.Orientation.Vertical)
        self.side_splitter.setObjectName("sideSplitter")
        self.side_splitter.addWidget(self.instructions)
        self.side_splitter.addWidget(self.inspector)
        self.side_splitter.setStretchFactor(0, 0)
        self.side_splitter.setStretchFactor(1, 1)
        self.side_splitter.setSizes([190, 680])  # the inspector (all phases) first

        self.main_splitter = QSplitter(Qt.Orientation.Horizontal)
        self.main_splitter.setObjectName("mainSplitter")
        self.main_splitter.addWidget(self.chat_list)
        self.main_splitter.addWidget(chat_column)
        self.main_splitter.addWidget(self.side_splitter)
        self.main_splitter.setStretchFactor(0, 0)
        self.main_splitter.setStretchFactor(1, 1)
        self.main_splitter.setStretchFactor(2, 1)
        self.main_splitter.setSizes([210, 560, 630])
        self.setCentralWidget(self.main_splitter)

        self.send_button.clicked.connect(self.send)
        self.stop_button.clicked.connect(self.stop)
        self.regenerate_button.clicked.connect(self.regenerate)
        self.chat_view.retry_requested.connect(self.regenerate)
        self.chat_view.edit_requested.connect(self.start_edit)
        self.chat_view.fork_requested.connect(self.fork_at)
        self.chat_view.branch_requested.connect(self.switch_branch)
        self.composer.edit_cancelled.connect(self.cancel_edit)
        self.chat_list.chat_selected.connect(self.open_family)
        self.chat_list.new_requested.connect(lambda: self.new_chat())
        self.chat_list.rename_requested.connect(self._ask_rename)
        self.chat_list.delete_requested.connect(self._ask_delete)
        self.chat_list.search_changed.connect(lambda _text: self.refresh_chats())
        self.instructions.text_edited.connect(self.request_edit_cost)
        self.instructions.save_requested.connect(self.save_instructions)
        self.instructions.layout_changed.connect(self.set_layout)
        self.eval_runner.rates_ready.connect(self.instructions.show_eval_rates)
        self.inspector.trim_preview_requested.connect(self._request_trim_preview)
        self.inspector.trim_apply_requested.connect(self._apply_trim)

    def _build_status_bar(self) -> None:
        bar = self.statusBar()
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(220)
        self.progress.setTextVisible(True)
        self.progress.hide()
        self.cancel_load_button = QToolButton()
        self.cancel_load_button.setText("Cancel")
        self.cancel_load_button.setToolTip("Stop loading this model; the current one stays")
        self.cancel_load_button.clicked.connect(self.cancel_model_load)
        self.cancel_load_button.hide()
        self.model_status_label = ElidedLabel("")
        self.model_status_label.setSizePolicy(
            QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Preferred
        )
        self.context_label = QLabel("")
        self.kv_label = QLabel("")
        bar.addPermanentWidget(self.progress)
        bar.addPermanentWidget(self.cancel_load_button)
        bar.addPermanentWidget(self.model_status_label)
        bar.addPermanentWidget(self.context_label)
        bar.addPermanentWidget(self.kv_label)

    def _build_menus(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        self.new_chat_action = QAction("&New chat", self)
        self.new_chat_action.setShortcut(QKeySequence("Ctrl+N"))
        self.new_chat_action.triggered.connect(lambda: self.new_chat())
        file_menu.addAction(self.new_chat_action)
        export_png = QAction("Export charts as PNG…", self)
        export_png.triggered.connect(self.inspector.ask_export_png)
        file_menu.addAction(export_png)
        export_csv = QAction("Export turn data as CSV…", self)
        export_csv.triggered.connect(self.inspector.ask_export_csv)
        file_menu.addAction(export_csv)
        file_menu.addSeparator()
        self.export_markdown_action = QAction("Export chat as &Markdown…", self)
        self.export_markdown_action.triggered.connect(lambda: self.ask_export_chat("md"))
        file_menu.addAction(self.export_markdown_action)
        self.export_json_action = QAction("Export chat as &JSON (with metrics)…", self)
        self.export_json_action.triggered.connect(lambda: self.ask_export_chat("json"))
        file_menu.addAction(self.export_json_action)
        file_menu.addSeparator()
        quit_action = QAction("&Quit", self)
        quit_action.setShortcut(QKeySequence.StandardKey.Quit)
        quit_action.triggered.connect(self.close)
        file_menu.addAction(quit_action)

        self.model_menu = self.menuBar().addMenu("&Model")
        self.model_menu.aboutToShow.connect(self._fill_model_menu)

        view_menu = self.menuBar().addMenu("&View")
        theme_menu = view_menu.addMenu("&Theme")
        self.theme_actions = QActionGroup(self)
        current = str(self.settings.value("view/theme", theme.ThemeMode.SYSTEM))
        for mode, label in (
            (theme.ThemeMode.SYSTEM, "Follow the system"),
            (theme.ThemeMode.LIGHT, "Light"),
            (theme.ThemeMode.DARK, "Dark"),
        ):
            action = theme_menu.addAction(label)
            action.setCheckable(True)
            action.setChecked(current == mode)
            action.setData(str(mode))
            self.theme_actions.addAction(action)
            action.triggered.connect(lambda _=False, m=mode: self.set_theme(m))
        self.enter_sends_action = QAction("&Enter sends (Shift+Enter: new line)", self)
        self.enter_sends_action.setCheckable(True)
        self.enter_sends_action.setChecked(self.input.enter_sends)
        self.enter_sends_action.toggled.connect(self.set_enter_sends)
        view_menu.addAction(self.enter_sends_action)

        tools_menu = self.menuBar().addMenu("&Tools")
        self.benchmark_action = QAction("&Benchmark…", self)
        self.benchmark_action.triggered.connect(self.show_benchmark)
        tools_menu.addAction(self.benchmark_action)

        help_menu = self.menuBar().addMenu("&Help")
        where = QAction("Where are my chats?", self)
        where.triggered.connect(self.show_storage_note)
        help_menu.addAction(where)
        about = QAction("&About KV Chat", self)
        about.triggered.connect(self.show_about)
        help_menu.addAction(about)

    def _build_shortcuts(self) -> None:
        self.shortcuts: list[QShortcut] = []
        for keys, slot in (
            ("Ctrl+Return", self.send),
            ("Ctrl+Enter", self.send),
            ("Escape", self.stop),
        ):
            shortcut = QShortcut(QKeySequence(keys), self)
            shortcut.setContext(Qt.ShortcutContext.WindowShortcut)
            shortcut.activated.connect(slot)
            self.shortcuts.append(shortcut)

    def _connect_worker(self) -> None:
        worker = self.host.worker
        worker.model_loading.connect(self._on_model_loading)
        worker.load_progress.connect(self._on_load_progress)
        worker.model_loaded.connect(self._on_model_loaded)
        worker.model_failed.connect(self._on_model_failed)
        worker.model_load_cancelled.connect(self._on_model_load_cancelled)
        worker.token.connect(self._on_token)
        worker.progress.connect(self._on_progress)
        worker.reply_finished.connect(self._on_reply)
        worker.turn_failed.connect(self._on_turn_failed)
        worker.background_finished.connect(self._on_background)
        worker.edit_cost_ready.connect(self._on_edit_cost)
        worker.trim_preview_ready.connect(self._on_trim_preview)
        worker.trim_applied.connect(self._on_trim_applied)
        worker.cache_view_ready.connect(self._on_cache_view)
        worker.chat_deleted.connect(self._on_chat_deleted)
        worker.template_info.connect(self._on_template_info)
        worker.template_changed.connect(self._on_template_changed)
        # A method of the window, not a lambda: it runs in the GUI thread (queued).
        worker.error.connect(self._on_worker_error)

    # -- settings and first run -----------------------------------------------------

    def _restore_settings(self) -> None:
        # Within the screen it opens on: its place there last time, clamped, or a default.
        restore_window(self, self.settings, "window", QSize(*DEFAULT_SIZE))
        for key, splitter in (
            ("window/main_splitter", self.main_splitter),
            ("window/side_splitter", self.side_splitter),
        ):
            state = self.settings.value(key)
            if isinstance(state, QByteArray) and not state.isEmpty():
                splitter.restoreState(state)

    def _save_settings(self) -> None:
        save_window(self, self.settings, "window")
        self.settings.setValue("window/main_splitter", self.main_splitter.saveState())
        self.settings.setValue("window/side_splitter", self.side_splitter.saveState())
        self.settings.setValue("generation/max_tokens", self.max_tokens_spin.value())
        self.settings.setValue("generation/temperature", self.temperature_spin.value())
        self.settings.sync()

    def _show_first_run_note(self) -> None:
        self.first_run_banner: InfoBanner | None = None
        if self.settings.value("first_run/storage_note_shown", False, type=bool):
            return
        self.first_run_banner = InfoBanner(
            storage_note(self.db_path) + " Help → Where are my chats? shows this again."
        )
        self.banner_slot.addWidget(self.first_run_banner)
        self.settings.setValue("first_run/storage_note_shown", True)

    def show_storage_note(self) -> None:
        QMessageBox.information(self, "Where are my chats?", storage_note(self.db_path))

    def about_text(self) -> str:
        model = self.model
        return about_html(
            model_description=model.description if model else None,
            model_path=model.path if model else None,
            backend_version=model.backend_version if model else None,
        )

    def show_about(self) -> None:
        QMessageBox.about(self, "About KV Chat", self.about_text())

    def _on_worker_error(self, text: str) -> None:
        self.show_error("KV Chat", text)

    def show_error(self, title: str, text: str) -> None:
        """Non-blocking: the message appears, the window stays usable, nothing is lost."""
        self.last_error = text
        self.error_shown.emit(text)
        self.statusBar().showMessage(text, 10_000)
        if self._closed:
            return
        box = QMessageBox(
            QMessageBox.Icon.Warning, title, text, QMessageBox.StandardButton.Ok, self
        )
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.open()

    # -- models ---------------------------------------------------------------------

    def _model_choices(self) -> list[ModelChoice]:
        return available_models(self.models_dir)

    def _fill_model_combo(self) -> None:
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        for choice in self._model_choices():
            self.model_combo.addItem(choice.label, str(choice.path))
        self.model_combo.addItem("Open GGUF…", OPEN_GGUF)
        self.model_combo.blockSignals(False)
        self._select_model_in_combo()

    def _select_model_in_combo(self) -> None:
        """The model box names the model in use: a local file, or the server's model."""
        if self.model is None:
            return
        index = self.model_combo.findData(self.model.path)
        if index < 0:
            server = self.model.kv_type == "server"
            label = f"{self.model.name or self.model.path} (server)" if server else None
            self.model_combo.blockSignals(True)
            self.model_combo.insertItem(
                self.model_combo.count() - 1,
                label or Path(self.model.path).name,
                self.model.path,
            )
            self.model_combo.blockSignals(False)
            index = self.model_combo.findData(self.model.path)
        self.model_combo.setCurrentIndex(index)

    def _fill_model_menu(self) -> None:
        self.model_menu.clear()
        for choice in self._model_choices():
            action = self.model_menu.addAction(choice.label)
            action.setCheckable(True)
            action.setChecked(self.model is not None and self.model.path == str(choice.path))
            action.triggered.connect(lambda _=False, p=str(choice.path): self.load_model(p))
        self.model_menu.addSeparator()
        self.model_menu.addAction("Open GGUF…", self.open_gguf)
        self.model_menu.addSeparator()
        settings_action = self.model_menu.addAction("Model settings…", self.ask_model_settings)
        settings_action.setEnabled(self.model is None or self.model.kv_type != "server")
        template_action = self.model_menu.addAction("Chat template…", self.ask_chat_template)
        template_action.setEnabled(self.model is not None and self.model.kv_type != "server")
        self.model_menu.addAction("Connect to server…", self.ask_server)

    def _on_model_chosen(self, index: int) -> None:
        data = self.model_combo.itemData(index)
        if data == OPEN_GGUF:
            self._select_model_in_combo()
            self.open_gguf()
        elif data and (self.model is None or data != self.model.path):
            self.load_model(str(data))

    def open_gguf(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Open a GGUF model", "", "GGUF models (*.gguf);;All files (*)"
        )
        if path:
            self.load_model(path)

    def ask_server(self) -> ServerDialog:
        """Model → Connect to server…: the dialog connects when accepted."""
        dialog = ServerDialog(
            self.host,
            str(self.settings.value("server/url", "") or ""),
            str(self.settings.value("server/model", "") or ""),
            self,
            timeout_s=self._server_timeout(),
        )
        dialog.accepted.connect(
            lambda: self.connect_server(dialog.url(), dialog.model(), dialog.timeout_s())
        )
        dialog.open()
        return dialog

    def ask_model_settings(self) -> ModelSettingsDialog:
        """Context size and KV type; accepting reloads the model (with its progress bar)."""
        n_ctx = self.model.n_ctx if self.model else 8192
        kv_type = self.model.kv_type if self.model else "f16"
        name = Path(self.model.path).name if self.model else "the model"
        dialog = ModelSettingsDialog(n_ctx, kv_type, name, self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.accepted.connect(lambda: self.apply_model_settings(dialog.n_ctx(), dialog.kv_type()))
        dialog.open()
        return dialog

    def ask_chat_template(self) -> None:
        """Model → Chat template…: the worker says what it offers, then the dialog opens."""
        self._template_dialog_wanted = True
        self.host.describe_templates()

    @_unless_closed
    def _on_template_info(self, info: TemplateInfo) -> None:
        if not self._template_dialog_wanted:
            return
        self._template_dialog_wanted = False
        dialog = ChatTemplateDialog(info, self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.accepted.connect(lambda: self.set_chat_template(dialog.choice()))
        dialog.open()
        self.template_dialog_shown.emit(dialog)

    def set_chat_template(self, choice: TemplateChoice | None) -> None:
        """Write the model's prompts with ``choice`` from now on (None: its own template)."""
        if self.busy:
            self.stop()
        self.host.set_chat_template(choice)

    @_unless_closed
    def _on_template_changed(self, info: TemplateInfo) -> None:
        if self.model is not None:
            self.model = dataclasses.replace(
                self.model, template=info.in_use, template_notes=info.notes
            )
        self.statusBar().showMessage(
            f"{info.model_name} now uses {describe_origin(info.in_use)}", 8000
        )
        if self.current_chat_id is not None:
            self.host.refresh_cache_view(self.current_chat_id)
        self.template_applied.emit(info)

    def apply_model_settings(self, n_ctx: int, kv_type: str) -> None:
        """Reload the current model with another context size or KV type."""
        if self.busy:
            self.stop()
        path = self.model.path if self.model else self._requested_model
        self.settings.setValue("model/n_ctx", n_ctx)
        self.settings.setValue("model/kv_type", kv_type)
        self._requested_model = path
        self.host.load_model(path, n_ctx=n_ctx, kv_type=kv_type)

    def set_theme(self, mode: str) -> None:
        self.settings.setValue("view/theme", str(mode))
        theme.apply(mode)
        for action in self.theme_actions.actions():
            action.setChecked(action.data() == str(mode))

    def set_enter_sends(self, enter_sends: bool) -> None:
        self.settings.setValue("composer/enter_sends", enter_sends)
        self.composer.set_enter_sends(enter_sends)
        self.chat_view.set_send_hint(enter_sends=enter_sends)

    def ask_export_chat(self, kind: str) -> None:
        chat = self.current_chat()
        if chat is None:
            self.statusBar().showMessage("Open a chat to export it.", 4000)
            return
        suffix, pattern = (
            (".json", "JSON (*.json)") if kind == "json" else (".md", "Markdown (*.md)")
        )
        safe = "".join(c if c.isalnum() or c in " -_" else "_" for c in chat.name).strip() or "chat"
        path, _ = QFileDialog.getSaveFileName(self, "Export chat", safe + suffix, pattern)
        if path:
            self.export_chat(path)

    def export_chat(self, path: str | Path) -> Path | None:
        """The chat on screen as Markdown (or JSON, by the file name), with its metrics."""
        if self.current_chat_id is None:
            return None
        try:
            target = export_chat(self.store, self.current_chat_id, path)
        except (OSError, StorageError) as error:
            self.show_error("Export chat", f"Could not write {path}: {error}")
            return None
        self.statusBar().showMessage(f"Exported to {target}", 5000)
        return target

    def connect_server(self, url: str, model: str = "", timeout_s: float | None = None) -> None:
        """Chats continue on the server's model; a local model can be picked again any time."""
        if self.busy:
            self.stop()
        timeout_s = self._server_timeout() if timeout_s is None else timeout_s
        self.settings.setValue("server/url", url)
        self.settings.setValue("server/model", model)
        self.settings.setValue("server/timeout", timeout_s)
        self.host.connect_server(url, model, timeout_s)

    def _server_timeout(self) -> float:
        """The stored server timeout, or the default when it is missing or out of range."""
        try:
            stored = float(
                str(self.settings.value("server/timeout", limits.DEFAULT_SERVER_TIMEOUT_S))
            )
            return limits.check_server_timeout(stored)
        except (TypeError, ValueError):
            return limits.DEFAULT_SERVER_TIMEOUT_S

    def load_model(self, path: str | None) -> None:
        """Load on the worker; the current model stays in use until the new one is ready."""
        if self.busy:
            self.stop()
        self._requested_model = path
        self.host.load_model(path)

    @_unless_closed
    def _on_model_loading(self, path: str) -> None:
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.progress.setFormat("Loading model %p%")
        self.progress.show()
        remote = path.startswith(("http://", "https://"))
        self.cancel_load_button.setVisible(not remote)  # llama.cpp's load can be cancelled
        name = path if remote else Path(path).name
        self.model_status_label.setText(f"Loading {name or 'default model'}…")
        if self.inspector.view is None:
            self.inspector.set_cache_view(None, "loading the model…")

    @_unless_closed
    def _on_load_progress(self, fraction: float) -> None:
        self.progress.setValue(int(fraction * 100))

    @_unless_closed
    def _on_model_loaded(self, status: ModelStatus) -> None:
        self.model = status
        self.progress.hide()
        self.cancel_load_button.hide()
        self._select_model_in_combo()
        self.model_status_label.setText(self._model_line(status))
        self.model_status_label.setToolTip(status.path)
        server = status.kv_type == "server"
        self.kv_label.setText("KV on the server" if server else f"KV {status.kv_type}")
        self._set_context_used(None)
        if self.current_chat_id is None:
            self.inspector.set_cache_view(None, "no chat open")
        if status.template == "builtin-chatml":
            likely = (
                f" (likely {status.suggested_template})" if status.suggested_template else ""
            )
            self.statusBar().showMessage(
                f"{Path(status.path).name} has no usable chat template: using ChatML. "
                f"Model → Chat template… chooses one{likely}.",
                15000,
            )
        else:
            self.statusBar().showMessage(f"Model loaded in {status.load_ms:.0f} ms", 5000)
        if self.current_chat_id is not None:
            self.host.prefetch_chat(self.current_chat_id)
            self.host.refresh_cache_view(self.current_chat_id)
        self._update_actions()
        self.model_ready.emit(status)

    @_unless_closed
    def _on_model_failed(self, message: str) -> None:
        self.progress.hide()
        self.cancel_load_button.hide()
        if self.model is not None:
            self.model_status_label.setText(self._model_line(self.model))
            self._select_model_in_combo()
            still = self._model_line(self.model)
            text = f"Could not load the model: {message}\n\nStill using {still}."
        else:
            self.model_status_label.setText("No model loaded")
            text = f"Could not load the model: {message}\n\nPick another one in the Model menu."
        self.model_error.emit(message)
        self.show_error("Model not loaded", text)

    def cancel_model_load(self) -> None:
        """The progress bar's Cancel: llama.cpp stops at its next tensor."""
        self.host.cancel_load()

    @_unless_closed
    def _on_model_load_cancelled(self, path: str) -> None:
        self.progress.hide()
        self.cancel_load_button.hide()
        if self.model is not None:
            self.model_status_label.setText(self._model_line(self.model))
            self._select_model_in_combo()
            message = f"Loading cancelled; still using {self._model_line(self.model)}"
        else:
            self.model_status_label.setText("No model loaded")
            message = "Loading cancelled; pick a model in the Model menu"
        self.statusBar().showMessage(message, 10_000)
        self.model_load_cancelled.emit(path)

    @staticmethod
    def _model_line(status: ModelStatus) -> str:
        """The status bar's model: the GGUF's name, or the server and its connection."""
        if status.kv_type == "server":
            return f"Connected to {status.path} · {status.description}"
        return f"{Path(status.path).name} · {status.description}"

    def _set_context_used(self, tokens: int | None) -> None:
        if self.model is None:
            self.context_label.setText("")
            return
        used = "—" if tokens is None else str(tokens)
        self.context_label.setText(f"context {used} / {self.model.n_ctx}")

    # -- chats ----------------------------------------------------------------------

    def refresh_chats(self) -> None:
        try:
            chats = self.store.chats(self.chat_list.search.text())
        except StorageError as error:
            self.show_error("Chats", str(error))
            return
        chat = self.current_chat()
        self.chat_list.set_chats(chats, chat.family_id if chat else None)

    def with_chat(self, then: Callable[[int], None]) -> None:
        """``then(chat id)`` for the chat on screen, making one first if there is none
        (once: actions that need a chat while it is being made wait for the same one)."""
        if self.current_chat_id is not None:
            then(self.current_chat_id)
        elif self._chat_waiters:
            self._chat_waiters.append(then)
        else:
            self._chat_waiters.append(then)
            self.new_chat(self._chat_made)

    def _chat_made(self, chat_id: int) -> None:
        waiters, self._chat_waiters = self._chat_waiters, []
        for then in waiters:
            then(chat_id)

    def new_chat(self, then: Callable[[int], None] | None = None) -> None:
        """Create a chat (on the worker) and open it; ``then`` gets its id."""
        names = {chat.name for chat in self.store.chats()}
        number = len(names) + 1
        while f"Chat {number}" in names:
            number += 1
        name = f"Chat {number}"

        def created(chat: object) -> None:
            if not isinstance(chat, Chat) or self._closed:
                return
            self.chat_list.search.clear()
            self._keep_instruction_draft()  # the editor's draft belongs to the chat being left
            self.instructions.load([], chat.layout)
            self.current_chat_id = chat.id
            self.refresh_chats()
            self.select_chat(chat.id)
            self.input.setFocus()
            if then is not None:
                then(chat.id)

        self.host.change_store("New chat", lambda store: store.create_chat(name), created)

    def select_chat(self, chat_id: int) -> None:
        """Show a chat, and restore its saved cache in the background (prefetch)."""
        try:
            chat = self.store.chat(chat_id)
        except ChatNotFound:
            return
        same_chat_draft = None  # the same chat shown again keeps the editor's draft
        if chat_id != self.current_chat_id:
            self.cancel_edit()
            self._keep_instruction_draft()
        elif self.instructions.is_modified():
            same_chat_draft = (self.instructions.text(), self.instructions.variables())
        self.current_chat_id = chat_id
        self.sampling_panel.set_values(*load_chat_sampling(self.settings, chat_id))
        if self.chat_list.current_chat_id() != chat.family_id:
            self.refresh_chats()
        self.chat_title.setText(self.store.chat(chat.family_id).name)
        if not self.busy:  # the status line and context label describe the chat on screen
            self.turn_status.setText("")
        self._set_context_used(None)
        self.context_label.setToolTip("")
        self.reload_chat()
        self.documents.refresh()
        versions = self.store.instruction_versions(chat_id)
        self.instructions.load(versions, chat.layout)
        if same_chat_draft is not None:
            self.instructions.set_draft(*same_chat_draft)
        else:
            self._restore_instruction_draft(chat_id)
        rows = self.store.metrics(chat_id)
        self.inspector.set_turns([(row.id, row.data) for row in rows])
        self.inspector.set_cache_view(None, self._cache_reason())
        if self.model is not None:
            self.host.prefetch_chat(chat_id)
            self.host.refresh_cache_view(chat_id)
        self._update_actions()

    def _cache_reason(self) -> str:
        """What the inspector says while it has no cache view for the chat on screen."""
        if self.model is None:
            return "loading the model…" if self.progress.isVisible() else "no model loaded"
        return "reading this chat's cache…"

    def open_family(self, family_id: int) -> None:
        """A chat picked in the list: open the version of it used last."""
        try:
            latest = self.store.latest_in_family(family_id)
        except ChatNotFound:
            return
        self.select_chat(latest.id)

    def current_chat(self) -> Chat | None:
        if self.current_chat_id is None:
            return None
        try:
            return self.store.chat(self.current_chat_id)
        except ChatNotFound:
            return None

    def reload_chat(self, *, incremental: bool = False) -> None:
        """Messages and trim state from the store (after a turn, a trim, a selection)."""
        chat = self.current_chat()
        if chat is None:
            self.chat_view.clear()
            return
        messages = self.store.messages(chat.id)
        if incremental:
            self.chat_view.sync_messages(messages, chat.cache_start_seq)
        else:
            self.chat_view.show_messages(messages, chat.cache_start_seq)
        self.chat_view.set_branches(self.store.branches(chat.id), chat.id)
        self.chat_view.set_finish_reasons(
            {
                row.message_id: str(row.data.get("finish_reason") or "")
                for row in self.store.metrics(chat.id)
                if row.message_id is not None
            }
        )
        self.chat_view.set_actions_enabled(not self.busy)
        history_tokens = sum(len(m.token_ids) for m in messages)
        self.inspector.set_trim(chat.trim_tokens, chat.trim_mode, history_tokens)

    def rename_chat(self, chat_id: int, name: str) -> None:
        def renamed(chat: object) -> None:
            if not isinstance(chat, Chat) or self._closed:
                return
            current = self.current_chat()
            if current is not None and current.family_id == chat_id:
                self.chat_title.setText(chat.name)
            self.refresh_chats()

        self.host.change_store(
            "Rename chat", lambda store: store.rename_chat(chat_id, name), renamed
        )

    def _ask_rename(self, chat_id: int) -> None:
        chat = self.store.chat(chat_id)
        name, ok = QInputDialog.getText(self, "Rename chat", "Name:", text=chat.name)
        if ok:
            self.rename_chat(chat_id, name)

    def delete_chat(self, chat_id: int) -> None:
        """The worker forgets the chat's cache and deletes it, after any turn of that chat."""
        self.host.delete_chat(chat_id)

    def _ask_delete(self, chat_id: int) -> None:
        chat = self.store.chat(chat_id)
        versions = len(self.store.family(chat_id)) - 1
        extra = f" and its {versions} other version(s) of edited messages" if versions else ""
        answer = QMessageBox.question(
            self,
            "Delete chat",
            f"Delete “{chat.name}”{extra}, with the messages, instruction versions and"
            " saved cache?",
        )
        if answer == QMessageBox.StandardButton.Yes:
            self.delete_chat(chat_id)

    @_unless_closed
    def _on_chat_deleted(self, chat_id: int) -> None:
        if self.current_chat_id is not None and self.current_chat() is None:
            self.current_chat_id = None
            self.chat_view.clear()
            self.chat_title.setText("")
            self.instructions.load([], "history-first")
            self.inspector.set_turns([])
            remaining = self.store.chats()
            if remaining:
                self.open_family(remaining[0].id)
        self.refresh_chats()
        self._update_actions()
        self.chat_removed.emit(chat_id)

    # -- instructions and layout ----------------------------------------------------

    def save_instructions(
        self, text: str, variables: dict[str, str] | None = None, *, warm_up: bool = True
    ) -> None:
        """A new version of the block (text and variables); warmed up in idle time.

        ``warm_up`` False: a turn follows at once and takes the new block itself.
        """
        if self.current_chat_id is None:
            self.with_chat(
                lambda _chat_id: self.save_instructions(text, variables, warm_up=warm_up)
            )
            return
        chat_id = self.current_chat_id
        current = self.store.current_instructions(chat_id)
        if variables is None:
            variables = dict(current.variables) if current else {}
        if current is not None and current.text == text and current.variables == variables:
            return
        kept = variables
        self.host.change_store(
            "Instructions",
            lambda store: store.add_instruction_version(chat_id, text, kept),
            lambda version: self._on_instructions_saved(chat_id, version, warm_up),
        )

    def _on_instructions_saved(self, chat_id: int, version: object, warm_up: bool) -> None:
        if version is None or self._closed or chat_id != self.current_chat_id:
            return
        pending_layout = self.instructions.current_layout()
        chat = self.store.chat(chat_id)
        self.instructions.load(self.store.instruction_versions(chat_id), chat.layout)
        if pending_layout != chat.layout:  # a previewed layout stays a preview
            index = self.instructions.layout_combo.findData(pending_layout)
            self.instructions.layout_combo.setCurrentIndex(index)
        self.settings.remove(self._draft_key(chat_id))
        self.instructions.show_cost("Saved. The cache takes this version in idle time.")
        if self.model is not None and warm_up:
            self.host.prepare_chat(chat_id)

    @staticmethod
    def _draft_key(chat_id: int) -> str:
        return f"drafts/instructions-{chat_id}"

    def _keep_instruction_draft(self) -> None:
        """An unsaved instruction edit is kept (per chat) when the chat is left or closed."""
        chat_id = self.current_chat_id
        if chat_id is None:
            return
        if self.instructions.is_modified():
            draft = {"text": self.instructions.text(), "variables": self.instructions.variables()}
            self.settings.setValue(self._draft_key(chat_id), json.dumps(draft))
        else:
            self.settings.remove(self._draft_key(chat_id))

    def _restore_instruction_draft(self, chat_id: int) -> None:
        raw = self.settings.value(self._draft_key(chat_id))
        if not raw:
            return
        try:
            draft = json.loads(str(raw))
            text, variables = str(draft["text"]), dict(draft.get("variables") or {})
        except (ValueError, KeyError, TypeError):
            self.settings.remove(self._draft_key(chat_id))  # unreadable: nothing to restore
            return
        self.instructions.set_draft(text, {str(k): str(v) for k, v in variables.items()})

    def set_layout(self, layout: str) -> None:
        """Apply a layout: the chat's prompt is rebuilt in idle time."""
        chat_id = self.current_chat_id
        if chat_id is None:
            return
        self.host.change_store(
            "Layout",
            lambda store: store.update_chat(chat_id, layout=layout),
            lambda chat: self._on_layout_set(chat_id, layout, chat),
        )

    def _on_layout_set(self, chat_id: int, layout: str, chat: object) -> None:
        if not isinstance(chat, Chat) or self._closed or chat_id != self.current_chat_id:
            return
        text, variables = self.instructions.text(), self.instructions.variables()
        modified = self.instructions.is_modified()
        self.instructions.load(self.store.instruction_versions(chat_id), chat.layout)
        if modified:  # keep unsaved edits in the editor
            self.instructions.editor.setPlainText(text)
            self.instructions.variables_table.set_variables(variables, [])
        self.instructions.show_cost(
            f"{LAYOUT_LABELS[layout]} applied. The cache follows in idle time."
        )
        if self.model is not None:
            self.host.prepare_chat(chat_id)

    @_unless_closed
    def request_edit_cost(self, refresh: bool = False) -> None:
        """Ask the worker what the editor's text, variables and layout would recompute.

        ``refresh``: the cache changed (not the editor); the label is brought up to date
        unless an edit's own measurement is pending.
        """
        chat_id = self.current_chat_id
        if chat_id is None or self.model is None:
            self.instructions.show_cost("")
            return
        if refresh and self.instructions.debounce.isActive():
            return
        self._edit_cost_refresh = refresh
        self._edit_cost_request = self.host.request_edit_cost(
            chat_id,
            self.instructions.text(),
            self.instructions.variables(),
            self.instructions.current_layout(),
        )

    @_unless_closed
    def _on_edit_cost(self, request_id: int, chat_id: int, tokens: int, seconds: object) -> None:
        if request_id != self._edit_cost_request or chat_id != self.current_chat_id:
            return
        speed = None
        if seconds and tokens:
            speed = tokens / float(seconds)  # type: ignore[arg-type]
        self.instructions.show_cost(
            describe_edit_cost(
                tokens,
                seconds,  # type: ignore[arg-type]
                speed,
                text_changed=self.instructions.is_modified(),
                layout_changed=self.instructions.layout_pending(),
            )
        )
        if not self._edit_cost_refresh:
            self.edit_cost_shown.emit(tokens, seconds)

    # -- trim -----------------------------------------------------------------------

    @_unless_closed
    def _request_trim_preview(self, limit: int | None, mode: str) -> None:
        if self.current_chat_id is None or self.model is None:
            return
        self._trim_request = self.host.request_trim_preview(self.current_chat_id, limit, mode)

    @_unless_closed
    def _on_trim_preview(self, request_id: int, chat_id: int, preview: Any) -> None:
        if request_id != self._trim_request or chat_id != self.current_chat_id:
            return
        self.inspector.show_trim_preview(preview)
        self.chat_view.mark_leaving(set(preview.dropped_message_ids), preview=True)
        self.trim_preview_shown.emit(preview)

    @_unless_closed
    def _apply_trim(self, limit: int | None, mode: str) -> None:
        if self.current_chat_id is None or self.model is None:
            return
        if self.busy:
            self.statusBar().showMessage("The limit applies after this reply.", 4000)
        self.host.apply_trim(self.current_chat_id, limit, mode)

    @_unless_closed
    def _on_trim_applied(self, chat_id: int, preview: Any) -> None:
        if chat_id == self.current_chat_id:
            self.reload_chat(incremental=True)
            self.inspector.show_trim_preview(preview)
        self.trim_changed.emit(chat_id, preview)

    # -- a turn ---------------------------------------------------------------------

    def generation_options(self) -> GenerationOptions:
        return GenerationOptions(
            max_tokens=self.max_tokens_spin.value(),
            temperature=self.temperature_spin.value(),
            seed=self.sampling_panel.seed_value(),
            sampling=self.sampling_panel.sampling(),
        )

    def _store_sampling(self) -> None:
        """The Sampling panel's values belong to the chat on screen."""
        if self.current_chat_id is not None:
            store_chat_sampling(
                self.settings,
                self.current_chat_id,
                self.sampling_panel.sampling(),
                self.sampling_panel.seed_value(),
            )

    def send(self) -> None:
        typed = self.input.toPlainText()
        text = typed.rstrip()  # a trailing newline or space is never meant to be sent
        if not text.strip():
            return
        if self.busy:
            self.statusBar().showMessage("A reply is still being written; Esc stops it.", 4000)
            return
        if self._sending:
            return  # the chat (or the version) this message goes to is being made
        if self.instructions.is_modified():  # Send uses what the editor shows
            self.save_instructions(
                self.instructions.text(), self.instructions.variables(), warm_up=False
            )
        if self.editing_seq is not None and self.current_chat_id is not None:
            source, at = self.current_chat_id, self.editing_seq
            self._sending = True
            self.host.change_store(
                "Edit message",
                lambda store: store.branch_chat(source, at),
                lambda branch: self._send_to_new_version(branch, typed, text),
            )
            return
        if self.current_chat_id is None:
            self._sending = True
            self.with_chat(lambda chat_id: self._send_to(chat_id, typed, text))
            return
        self._send_to(self.current_chat_id, typed, text)

    def _send_to_new_version(self, branch: object, typed: str, text: str) -> None:
        self._sending = False
        if not isinstance(branch, Chat) or self._closed:
            return  # the error signal said why; the text stays in the composer
        self.select_chat(branch.id)  # shows the messages before the edited one
        self.refresh_chats()
        self._send_to(branch.id, typed, text)

    def _send_to(self, chat_id: int, typed: str, text: str) -> None:
        self._sending = False
        if self._closed:
            return
        self.pending_text = text
        self._pending_typed = typed
        self.input.clear()
        self.chat_view.add_pending_user(text)
        self.chat_view.begin_reply()
        self._set_busy(True, "Reading the prompt…")
        self.host.send(chat_id, text, self.generation_options())

    # -- edits, versions and forks ------------------------------------------------------

    def start_edit(self, seq: int) -> None:
        """Put a sent user message into the composer; sending makes a new version of it."""
        if self.busy or self.current_chat_id is None:
            self.statusBar().showMessage("Wait for the reply to finish, then edit.", 4000)
            return
        message = next(
            (m for m in self.store.messages(self.current_chat_id) if m.seq == seq), None
        )
        if message is None or message.role != "user":
            return
        self.editing_seq = seq
        self.composer.show_editing(message.text)

    def cancel_edit(self) -> None:
        if self.editing_seq is None:
            return
        self.editing_seq = None
        self.composer.hide_editing()
        self.input.clear()

    def switch_branch(self, chat_id: int) -> None:
        """‹ ›: show another version of a message (and what followed it)."""
        if self.busy:
            return
        self.select_chat(chat_id)
        self.host.change_store("Versions", lambda store: store.touch_chat(chat_id))

    def fork_at(self, seq: int) -> None:
        """Fork from here: a new chat with the messages up to this one (and shared pages)."""
        chat = self.current_chat()
        if chat is None or self.busy:
            return
        base = f"{self.store.chat(chat.family_id).name} (fork)"
        name, number = base, 2
        while self.store.chat_by_name(name) is not None:
            name, number = f"{base} {number}", number + 1
        source = chat.id

        def forked(fork: object) -> None:
            if not isinstance(fork, Chat) or self._closed:
                return
            self.chat_list.search.clear()
            self.select_chat(fork.id)
            self.refresh_chats()
            self.statusBar().showMessage(f"Forked into “{name}”.", 5000)

        self.host.change_store("Fork", lambda store: store.fork_chat(source, seq, name), forked)

    def regenerate(self) -> None:
        chat_id = self.current_chat_id
        if chat_id is None or self.busy:
            return
        messages = self.store.messages(chat_id)
        if not messages:
            return
        # Show the conversation without the reply being regenerated (it stays stored: the
        # new reply becomes its next version, ‹ › switches between them).
        while messages and messages[-1].role == "assistant":
            messages.pop()
        if messages and messages[-1].status == "unanswered":  # being answered now
            messages[-1] = dataclasses.replace(messages[-1], status="complete")
        chat = self.store.chat(chat_id)
        self.chat_view.show_messages(messages, chat.cache_start_seq)
        self.chat_view.begin_reply()
        self.pending_text = None
        self._set_busy(True, "Regenerating…")
        self.host.regenerate(chat_id, self.generation_options())

    def stop(self) -> None:
        if self.busy:
            self.host.stop()
            self.turn_status.setText("Stopping…")

    def _set_busy(self, busy: bool, status: str = "") -> None:
        self.busy = busy
        self._stream_pieces, self._stream_started = 0, None
        self.turn_status.setText(status)
        self.chat_view.set_actions_enabled(not busy)
        self._update_actions()

    def _update_actions(self) -> None:
        has_chat = self.current_chat_id is not None
        self.send_button.setEnabled(not self.busy)
        self.stop_button.setEnabled(self.busy)
        self.regenerate_button.setEnabled(
            not self.busy and has_chat and bool(self.chat_view.bubbles)
        )

    @_unless_closed
    def _on_token(self, chat_id: int, piece: str) -> None:
        if chat_id == self.current_chat_id:
            self._stream_pieces += 1
            now = time.monotonic()
            if self._stream_started is None:
                self._stream_started = now
            if not self.turn_status.text().startswith("Stopping"):
                elapsed = now - self._stream_started
                if elapsed >= LIVE_SPEED_AFTER_S:  # live tokens per second while streaming
                    speed = (self._stream_pieces - 1) / elapsed
                    self.turn_status.setText(
                        f"Writing… {self._stream_pieces} tokens · {speed:.0f} tok/s"
                    )
                elif not self.turn_status.text().startswith("Writing"):
                    self.turn_status.setText("Writing…")
            self.chat_view.append_token(piece)

    @_unless_closed
    def _on_progress(self, chat_id: int, phase: str, done: int, total: int) -> None:
        if phase != "prefill" or total < 256:
            return  # short steps would only flicker
        self.progress.setRange(0, total)
        self.progress.setValue(done)
        self.progress.setFormat(f"{phase} %v/%m")
        self.progress.setVisible(done < total)

    @_unless_closed
    def _on_reply(self, outcome: TurnResult) -> None:
        self.chat_view.stop_rendering()
        self.progress.hide()
        self.pending_text = None
        metrics = outcome.metrics.as_dict()
        status = (
            f"Reused {metrics['reused_tokens']}, recomputed {metrics['prefill_tokens']} tokens ·"
            f" first token {metrics['ttft_ms']:.0f} ms · {metrics['decode_tokens_per_s']:.0f} tok/s"
        )
        if outcome.metrics.finish_reason == FinishReason.CANCELLED:
            status = "Stopped. " + status
        elif outcome.metrics.finish_reason == FinishReason.LENGTH:
            status = "Cut at max tokens. " + status
        elif outcome.metrics.finish_reason == FinishReason.CONTEXT_FULL:
            status = "Context full. " + status
        if outcome.version_of is not None and outcome.version_of == self.current_chat_id:
            self.current_chat_id = outcome.chat_id  # Regenerate: show the reply's new version
            self.inspector.set_turns([(r.id, r.data) for r in self.store.metrics(outcome.chat_id)])
        on_screen = outcome.chat_id == self.current_chat_id
        self._set_busy(False, status if on_screen else "")
        if on_screen:
            self.reload_chat(incremental=True)
            self.inspector.upsert_turn(outcome.metrics_id, metrics)
            # The status bar and the inspector both take the count from the worker's next
            # cache view: the same figure at the same moment.
            self.host.refresh_cache_view(outcome.chat_id)
        self.refresh_chats()
        self._update_actions()
        self.reply_received.emit(outcome)

    @_unless_closed
    def _on_turn_failed(self, chat_id: int, kind: str, message: str) -> None:
        self.chat_view.stop_rendering()
        self.progress.hide()
        text = self.pending_text
        self.pending_text = None
        self._set_busy(False, "")
        if chat_id == self.current_chat_id:
            self.reload_chat(incremental=True)
        stored = False
        if text is not None:
            with contextlib.suppress(StorageError):
                stored = any(
                    m.role == "user" and m.text == text for m in self.store.messages(chat_id)[-2:]
                )
        if text is not None and not stored and not self.input.toPlainText().strip():
            self.input.setPlainText(self._pending_typed)  # nothing typed is lost
        title = "Message too long" if kind == "overflow" else "The reply failed"
        if kind == "overflow" and (self.model is None or self.model.kv_type != "server"):
            message += " (Model → Model settings… sets the context size)"
        self.turn_error.emit(kind, message)
        self.show_error(title, message[:1].upper() + message[1:] + ".")

    @_unless_closed
    def _on_background(self, outcome: BackgroundOutcome) -> None:
        if outcome.chat_id == self.current_chat_id:
            if outcome.metrics is not None and outcome.metrics_id is not None:
                self.inspector.upsert_turn(outcome.metrics_id, outcome.metrics.as_dict())
            elif outcome.metrics is not None:
                rows = self.store.metrics(outcome.chat_id)
                self.inspector.set_turns([(row.id, row.data) for row in rows])
            if outcome.cache is not None:
                self._on_cache_view(outcome.chat_id, outcome.cache)
            self.request_edit_cost(refresh=True)  # the cache changed: so did an edit's cost
        self.background_done.emit(outcome)

    @_unless_closed
    def _on_cache_view(self, chat_id: int, view: Any) -> None:
        if chat_id != self.current_chat_id:
            return
        self.inspector.set_cache_view(view)
        self._set_context_used(view.cache_tokens)  # the inspector's figure, never another
        size = format_bytes(view.cache_tokens * view.bytes_per_token)
        self.context_label.setToolTip(f"KV cache of this chat: {size}")
        self.cache_view_shown.emit(view)

    def show_benchmark(self) -> BenchWindow:
        """One non-modal Benchmark window; it runs its own engines, never the chat worker's."""
        model = self.model.path if self.model else self._requested_model
        if self.bench_window is None:
            self.bench_window = BenchWindow(model_path=model, eval_runner=self.eval_runner)
            fit_window(self.bench_window, BENCH_SIZE, self.screen())
        elif not self.bench_window.is_running():
            self.bench_window.base_config.model_path = model  # follow the chosen model
        self.bench_window.show()
        self.bench_window.raise_()
        self.bench_window.activateWindow()
        return self.bench_window

    # -- closing --------------------------------------------------------------------

    def closeEvent(self, event: QCloseEvent) -> None:
        """Save geometry, stop the worker (it saves the cache), join its thread, close the DB."""
        if not self._closed:
            self._closed = True
            self._keep_instruction_draft()
            if self.bench_window is not None:
                self.bench_window.close()  # cancels and joins its thread
            self._save_settings()
            for timer in self.findChildren(QTimer):
                timer.stop()  # debounces must not fire on a closed store
            # The reader closes first: the worker's close then leaves no WAL behind.
            self.store.close()
            self.host.shutdown()
        event.accept()
