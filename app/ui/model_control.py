"""Which model answers: loading a GGUF or connecting to a server, its settings and chat
template, and what the toolbar's model box and the status bar say about it.

Every load runs on the worker; the current model stays in use until the new one is ready.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFileDialog, QMenu

from app import limits
from app.core.models import ModelChoice, available_models
from app.domain import TemplateChoice
from app.ui.model_settings import ModelSettingsDialog
from app.ui.server_dialog import ServerDialog
from app.ui.template_dialog import ChatTemplateDialog, describe_origin
from app.ui.turn_control import TurnControl
from app.ui.window_part import WindowPart, unless_closed

if TYPE_CHECKING:
    from app.session.engine import TemplateInfo
    from app.ui.window_base import WindowBase
    from app.ui.worker import ModelStatus

OPEN_GGUF = "__open__"


class ModelControl(WindowPart):
    """The Model menu, the model box and the worker's model-loading answers."""

    def __init__(self, window: WindowBase, turns: TurnControl, requested_model: str | None) -> None:
        super().__init__(window)
        self.turns = turns
        self.requested_model = requested_model  # what the next load asks for
        self.template_dialog_wanted = False  # the template answer opens the dialog

    def model_choices(self) -> list[ModelChoice]:
        return available_models(self.window.models_dir)

    def fill_model_combo(self) -> None:
        self.window.model_combo.blockSignals(True)
        self.window.model_combo.clear()
        for choice in self.model_choices():
            self.window.model_combo.addItem(choice.label, str(choice.path))
        self.window.model_combo.addItem("Open GGUF…", OPEN_GGUF)
        self.window.model_combo.blockSignals(False)
        self.select_model_in_combo()

    def select_model_in_combo(self) -> None:
        """The model box names the model in use: a local file, or the server's model."""
        if self.window.model is None:
            return
        index = self.window.model_combo.findData(self.window.model.path)
        if index < 0:
            server = self.window.model.kv_type == "server"
            label = (
                f"{self.window.model.name or self.window.model.path} (server)" if server else None
            )
            self.window.model_combo.blockSignals(True)
            self.window.model_combo.insertItem(
                self.window.model_combo.count() - 1,
                label or Path(self.window.model.path).name,
                self.window.model.path,
            )
            self.window.model_combo.blockSignals(False)
            index = self.window.model_combo.findData(self.window.model.path)
        self.window.model_combo.setCurrentIndex(index)

    def fill_model_menu(self, menu: QMenu) -> None:
        """Filled each time it opens: the models found now, the one in use checked."""
        menu.clear()
        for choice in self.model_choices():
            action = menu.addAction(choice.label)
            action.setCheckable(True)
            action.setChecked(
                self.window.model is not None and self.window.model.path == str(choice.path)
            )
            action.triggered.connect(lambda _=False, p=str(choice.path): self.load_model(p))
        menu.addSeparator()
        menu.addAction("Open GGUF…", self.open_gguf)
        menu.addSeparator()
        settings_action = menu.addAction("Model settings…", self.ask_model_settings)
        settings_action.setEnabled(
            self.window.model is None or self.window.model.kv_type != "server"
        )
        template_action = menu.addAction("Chat template…", self.ask_chat_template)
        template_action.setEnabled(
            self.window.model is not None and self.window.model.kv_type != "server"
        )
        menu.addAction("Connect to server…", self.ask_server)

    def on_model_chosen(self, index: int) -> None:
        data = self.window.model_combo.itemData(index)
        if data == OPEN_GGUF:
            self.select_model_in_combo()
            self.open_gguf()
        elif data and (self.window.model is None or data != self.window.model.path):
            self.load_model(str(data))

    def open_gguf(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self.window, "Open a GGUF model", "", "GGUF models (*.gguf);;All files (*)"
        )
        if path:
            self.load_model(path)

    def ask_server(self) -> ServerDialog:
        """Model → Connect to server…: the dialog connects when accepted."""
        dialog = ServerDialog(
            self.window.host,
            str(self.window.settings.value("server/url", "") or ""),
            str(self.window.settings.value("server/model", "") or ""),
            self.window,
            timeout_s=self.server_timeout(),
        )
        dialog.accepted.connect(
            lambda: self.connect_server(dialog.url(), dialog.model(), dialog.timeout_s())
        )
        dialog.open()
        return dialog

    def ask_model_settings(self) -> ModelSettingsDialog:
        """Context size and KV type; accepting reloads the model (with its progress bar)."""
        n_ctx = self.window.model.n_ctx if self.window.model else 8192
        kv_type = self.window.model.kv_type if self.window.model else "f16"
        name = Path(self.window.model.path).name if self.window.model else "the model"
        dialog = ModelSettingsDialog(n_ctx, kv_type, name, self.window)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.accepted.connect(lambda: self.apply_model_settings(dialog.n_ctx(), dialog.kv_type()))
        dialog.open()
        return dialog

    def ask_chat_template(self) -> None:
        """Model → Chat template…: the worker says what it offers, then the dialog opens."""
        self.template_dialog_wanted = True
        self.window.host.describe_templates()

    @unless_closed
    def on_template_info(self, info: TemplateInfo) -> None:
        if not self.template_dialog_wanted:
            return
        self.template_dialog_wanted = False
        dialog = ChatTemplateDialog(info, self.window)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.accepted.connect(lambda: self.set_chat_template(dialog.choice()))
        dialog.open()
        self.window.template_dialog_shown.emit(dialog)

    def set_chat_template(self, choice: TemplateChoice | None) -> None:
        """Write the model's prompts with ``choice`` from now on (None: its own template)."""
        if self.window.busy:
            self.turns.stop()
        self.window.host.set_chat_template(choice)

    @unless_closed
    def on_template_changed(self, info: TemplateInfo) -> None:
        if self.window.model is not None:
            self.window.model = dataclasses.replace(
                self.window.model, template=info.in_use, template_notes=info.notes
            )
        self.window.statusBar().showMessage(
            f"{info.model_name} now uses {describe_origin(info.in_use)}", 8000
        )
        if self.window.current_chat_id is not None:
            self.window.host.refresh_cache_view(self.window.current_chat_id)
        self.window.template_applied.emit(info)

    def apply_model_settings(self, n_ctx: int, kv_type: str) -> None:
        """Reload the current model with another context size or KV type."""
        if self.window.busy:
            self.turns.stop()
        path = self.window.model.path if self.window.model else self.requested_model
        self.window.settings.setValue("model/n_ctx", n_ctx)
        self.window.settings.setValue("model/kv_type", kv_type)
        self.requested_model = path
        self.window.host.load_model(path, n_ctx=n_ctx, kv_type=kv_type)

    def connect_server(self, url: str, model: str = "", timeout_s: float | None = None) -> None:
        """Chats continue on the server's model; a local model can be picked again any time."""
        if self.window.busy:
            self.turns.stop()
        timeout_s = self.server_timeout() if timeout_s is None else timeout_s
        self.window.settings.setValue("server/url", url)
        self.window.settings.setValue("server/model", model)
        self.window.settings.setValue("server/timeout", timeout_s)
        self.window.host.connect_server(url, model, timeout_s)

    def server_timeout(self) -> float:
        """The stored server timeout, or the default when it is missing or out of range."""
        try:
            stored = float(
                str(self.window.settings.value("server/timeout", limits.DEFAULT_SERVER_TIMEOUT_S))
            )
            return limits.check_server_timeout(stored)
        except (TypeError, ValueError):
            return limits.DEFAULT_SERVER_TIMEOUT_S

    def load_model(self, path: str | None) -> None:
        """Load on the worker; the current model stays in use until the new one is ready."""
        if self.window.busy:
            self.turns.stop()
        self.requested_model = path
        self.window.host.load_model(path)

    @unless_closed
    def on_model_loading(self, path: str) -> None:
        self.window.progress.setRange(0, 100)
        self.window.progress.setValue(0)
        self.window.progress.setFormat("Loading model %p%")
        self.window.progress.show()
        remote = path.startswith(("http://", "https://"))
        self.window.cancel_load_button.setVisible(not remote)  # llama.cpp's load can be cancelled
        name = path if remote else Path(path).name
        self.window.model_status_label.setText(f"Loading {name or 'default model'}…")
        if self.window.inspector.view is None:
            self.window.inspector.set_cache_view(None, "loading the model…")

    @unless_closed
    def on_load_progress(self, fraction: float) -> None:
        self.window.progress.setValue(int(fraction * 100))

    @unless_closed
    def on_model_loaded(self, status: ModelStatus) -> None:
        self.window.model = status
        self.window.progress.hide()
        self.window.cancel_load_button.hide()
        self.select_model_in_combo()
        self.window.model_status_label.setText(self.model_line(status))
        self.window.model_status_label.setToolTip(status.path)
        server = status.kv_type == "server"
        self.window.kv_label.setText("KV on the server" if server else f"KV {status.kv_type}")
        self.window.set_context_used(None)
        if self.window.current_chat_id is None:
            self.window.inspector.set_cache_view(None, "no chat open")
        if status.template == "builtin-chatml":
            likely = f" (likely {status.suggested_template})" if status.suggested_template else ""
            self.window.statusBar().showMessage(
                f"{Path(status.path).name} has no usable chat template: using ChatML. "
                f"Model → Chat template… chooses one{likely}.",
                15000,
            )
        else:
            self.window.statusBar().showMessage(f"Model loaded in {status.load_ms:.0f} ms", 5000)
        if self.window.current_chat_id is not None:
            self.window.host.prefetch_chat(self.window.current_chat_id)
            self.window.host.refresh_cache_view(self.window.current_chat_id)
        self.window.update_actions()
        self.window.model_ready.emit(status)

    @unless_closed
    def on_model_failed(self, message: str) -> None:
        self.window.progress.hide()
        self.window.cancel_load_button.hide()
        if self.window.model is not None:
            self.window.model_status_label.setText(self.model_line(self.window.model))
            self.select_model_in_combo()
            still = self.model_line(self.window.model)
            text = f"Could not load the model: {message}\n\nStill using {still}."
        else:
            self.window.model_status_label.setText("No model loaded")
            text = f"Could not load the model: {message}\n\nPick another one in the Model menu."
        self.window.model_error.emit(message)
        self.window.show_error("Model not loaded", text)

    def cancel_model_load(self) -> None:
        """The progress bar's Cancel: llama.cpp stops at its next tensor."""
        self.window.host.cancel_load()

    @unless_closed
    def on_model_load_cancelled(self, path: str) -> None:
        self.window.progress.hide()
        self.window.cancel_load_button.hide()
        if self.window.model is not None:
            self.window.model_status_label.setText(self.model_line(self.window.model))
            self.select_model_in_combo()
            message = f"Loading cancelled; still using {self.model_line(self.window.model)}"
        else:
            self.window.model_status_label.setText("No model loaded")
            message = "Loading cancelled; pick a model in the Model menu"
        self.window.statusBar().showMessage(message, 10_000)
        self.window.model_load_cancelled.emit(path)

    @staticmethod
    def model_line(status: ModelStatus) -> str:
        """The status bar's model: the GGUF's name, or the server and its connection."""
        if status.kv_type == "server":
            return f"Connected to {status.path} · {status.description}"
        return f"{Path(status.path).name} · {status.description}"
