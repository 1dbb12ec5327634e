"""The main window's menu bar and keyboard shortcuts, and the small actions only they
start (theme, Enter sends, the Benchmark window, Help)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from PySide6.QtCore import QSize, Qt
from PySide6.QtGui import QAction, QActionGroup, QKeySequence, QShortcut
from PySide6.QtWidgets import QMenu, QMessageBox

from app.ui import theme
from app.ui.bench_window import BenchWindow
from app.ui.chat_actions import ChatActions
from app.ui.dialogs import about_html, storage_note
from app.ui.model_control import ModelControl
from app.ui.screen_fit import fit_window
from app.ui.turn_control import TurnControl
from app.ui.window_part import WindowPart

if TYPE_CHECKING:
    from app.ui.window_base import WindowBase

BENCH_SIZE = QSize(900, 720)  # shrunk to fit smaller screens
THEME_LABELS = (
    (theme.ThemeMode.SYSTEM, "Follow the system"),
    (theme.ThemeMode.LIGHT, "Light"),
    (theme.ThemeMode.DARK, "Dark"),
)


class WindowMenus(WindowPart):
    """File, Model, View, Tools and Help; the Model menu is filled by the model part."""

    def __init__(
        self, window: WindowBase, chats: ChatActions, turns: TurnControl, models: ModelControl
    ) -> None:
        super().__init__(window)
        self.chats, self.turns, self.models = chats, turns, models
        self.bench_window: BenchWindow | None = None
        bar = window.menuBar()
        self._build_file_menu(bar.addMenu("&File"))
        self.model_menu = bar.addMenu("&Model")
        self._build_view_menu(bar.addMenu("&View"))
        tools_menu = bar.addMenu("&Tools")
        self.benchmark_action = self._action("&Benchmark…", self.show_benchmark)
        tools_menu.addAction(self.benchmark_action)
        help_menu = bar.addMenu("&Help")
        help_menu.addAction(self._action("Where are my chats?", self.show_storage_note))
        help_menu.addAction(self._action("&About KV Chat", self.show_about))
        self.shortcuts = self._build_shortcuts()

    def _action(
        self, text: str, slot: Callable[[], object], keys: QKeySequence | None = None
    ) -> QAction:
        action = QAction(text, self.window)
        if keys is not None:
            action.setShortcut(keys)
        action.triggered.connect(slot)
        return action

    def _build_file_menu(self, menu: QMenu) -> None:
        window = self.window
        self.new_chat_action = self._action(
            "&New chat", lambda: self.chats.new_chat(), QKeySequence("Ctrl+N")
        )
        menu.addAction(self.new_chat_action)
        menu.addAction(self._action("Export charts as PNG…", window.inspector.ask_export_png))
        menu.addAction(self._action("Export turn data as CSV…", window.inspector.ask_export_csv))
        menu.addSeparator()
        self.export_markdown_action = self._action(
            "Export chat as &Markdown…", lambda: self.chats.ask_export_chat("md")
        )
        menu.addAction(self.export_markdown_action)
        self.export_json_action = self._action(
            "Export chat as &JSON (with metrics)…", lambda: self.chats.ask_export_chat("json")
        )
        menu.addAction(self.export_json_action)
        self.export_tree_action = self._action(
            "Export chat with every &version as JSON…", lambda: self.chats.ask_export_chat("tree")
        )
        menu.addAction(self.export_tree_action)
        menu.addSeparator()
        quit_keys = QKeySequence(QKeySequence.StandardKey.Quit)
        menu.addAction(self._action("&Quit", window.close, quit_keys))

    def _build_view_menu(self, menu: QMenu) -> None:
        theme_menu = menu.addMenu("&Theme")
        self.theme_actions = QActionGroup(self.window)
        current = str(self.window.settings.value("view/theme", theme.ThemeMode.SYSTEM))
        for mode, label in THEME_LABELS:
            action = theme_menu.addAction(label)
            action.setCheckable(True)
            action.setChecked(current == mode)
            action.setData(str(mode))
            self.theme_actions.addAction(action)
            action.triggered.connect(lambda _=False, m=mode: self.set_theme(m))
        self.enter_sends_action = QAction("&Enter sends (Shift+Enter: new line)", self.window)
        self.enter_sends_action.setCheckable(True)
        self.enter_sends_action.setChecked(self.window.input.enter_sends)
        self.enter_sends_action.toggled.connect(self.set_enter_sends)
        menu.addAction(self.enter_sends_action)

    def _build_shortcuts(self) -> list[QShortcut]:
        shortcuts = []
        turns = self.turns
        for keys, slot in (
            ("Ctrl+Return", turns.send),
            ("Ctrl+Enter", turns.send),
            ("Escape", turns.stop),
        ):
            shortcut = QShortcut(QKeySequence(keys), self.window)
            shortcut.setContext(Qt.ShortcutContext.WindowShortcut)
            shortcut.activated.connect(slot)
            shortcuts.append(shortcut)
        return shortcuts

    def set_theme(self, mode: str) -> None:
        self.window.settings.setValue("view/theme", str(mode))
        theme.apply(mode)
        for action in self.theme_actions.actions():
            action.setChecked(action.data() == str(mode))

    def set_enter_sends(self, enter_sends: bool) -> None:
        self.window.settings.setValue("composer/enter_sends", enter_sends)
        self.window.composer.set_enter_sends(enter_sends)
        self.window.chat_view.set_send_hint(enter_sends=enter_sends)

    def show_storage_note(self) -> None:
        note = storage_note(self.window.db_path)
        QMessageBox.information(self.window, "Where are my chats?", note)

    def about_text(self) -> str:
        model = self.window.model
        return about_html(
            model_description=model.description if model else None,
            model_path=model.path if model else None,
            backend_version=model.backend_version if model else None,
        )

    def show_about(self) -> None:
        QMessageBox.about(self.window, "About KV Chat", self.about_text())

    def show_benchmark(self) -> BenchWindow:
        """One non-modal Benchmark window; it runs its own engines, never the chat worker's."""
        window = self.window
        model = window.model.path if window.model else self.models.requested_model
        if self.bench_window is None:
            self.bench_window = BenchWindow(model_path=model, eval_runner=window.eval_runner)
            fit_window(self.bench_window, BENCH_SIZE, window.screen())
        elif not self.bench_window.is_running():
            self.bench_window.base_config.model_path = model  # follow the chosen model
        self.bench_window.show()
        self.bench_window.raise_()
        self.bench_window.activateWindow()
        return self.bench_window

    def close_benchmark(self) -> None:
        if self.bench_window is not None:
            self.bench_window.close()  # cancels and joins its thread
