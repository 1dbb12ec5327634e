"""What the main window's parts share: its signals, the chat on screen, the model in use,
the read-only store, the worker host and the widgets. The parts (chats, turns, models,
instructions, the cache panel, menus) each hold this, never each other's internals.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSettings, Qt, Signal
from PySide6.QtGui import QIcon
from PySide6.QtWidgets import QMainWindow, QMessageBox

from app.domain import TemplateChoice
from app.resources import resource_path
from app.storage.store import Store
from app.ui.quality_tab import EvalRunner
from app.ui.window_bars import GenerationToolbar, StatusBarWidgets
from app.ui.window_layout import CentralArea
from app.ui.worker import EngineHost, ModelStatus

ICON_FILE = ("icons", "kvchat-256.png")  # from the packaging work; optional


class WindowBase(QMainWindow):
    """KV Chat's window without its behaviour. Signals let tests (and scripts) wait for
    the worker."""

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
        # The window only reads; every write goes to the worker, the database's one writer.
        self.store = Store(self.db_path, read_only=True, live=True)
        self.current_chat_id: int | None = None
        self.model: ModelStatus | None = None
        self.busy = False  # a turn is running (set by the turn part)
        self.last_error: str | None = None
        self._closed = False
        self.eval_runner = EvalRunner(self.host)  # answer-quality evals, on the worker thread

        self.setWindowTitle("KV Chat")
        icon = resource_path(*ICON_FILE)
        if icon.is_file():
            self.setWindowIcon(QIcon(str(icon)))
        self._build_widgets()
        # A method of the window, not a lambda: it runs in the GUI thread (queued).
        self.host.worker.error.connect(self._on_worker_error)

    def _build_widgets(self) -> None:
        """The toolbar, the three columns and the status bar; the parts use these names."""
        self.toolbar = GenerationToolbar(self.settings)
        self.addToolBar(self.toolbar)
        self.model_combo = self.toolbar.model_combo
        self.max_tokens_spin = self.toolbar.max_tokens_spin
        self.temperature_spin = self.toolbar.temperature_spin
        self.sampling_panel = self.toolbar.sampling_panel
        self.sampling_button = self.toolbar.sampling_button
        self.layout_area = CentralArea(self.settings)
        self.setCentralWidget(self.layout_area.main_splitter)
        self.chat_list = self.layout_area.chat_list
        self.chat_view = self.layout_area.chat_view
        self.instructions = self.layout_area.instructions
        self.inspector = self.layout_area.inspector
        self.chat_title = self.layout_area.chat_title
        self.composer = self.layout_area.composer
        self.input = self.composer.input
        self.turn_status = self.composer.turn_status
        self.regenerate_button = self.composer.regenerate_button
        self.stop_button = self.composer.stop_button
        self.send_button = self.composer.send_button
        bar = StatusBarWidgets(self.statusBar())
        self.progress = bar.progress
        self.cancel_load_button = bar.cancel_load_button
        self.model_status_label = bar.model_status_label
        self.context_label = bar.context_label
        self.kv_label = bar.kv_label

    @property
    def closed(self) -> bool:
        """Closed: the store is closed, and worker answers still queued are dropped."""
        return self._closed

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

    def set_context_used(self, tokens: int | None) -> None:
        """The status bar's context figure for the chat on screen (None: not known yet)."""
        if self.model is None:
            self.context_label.setText("")
            return
        used = "—" if tokens is None else str(tokens)
        self.context_label.setText(f"context {used} / {self.model.n_ctx}")

    def update_actions(self) -> None:
        """Send, Stop and Regenerate follow whether a turn runs and a chat has messages."""
        has_chat = self.current_chat_id is not None
        self.send_button.setEnabled(not self.busy)
        self.stop_button.setEnabled(self.busy)
        self.regenerate_button.setEnabled(
            not self.busy and has_chat and bool(self.chat_view.bubbles)
        )
