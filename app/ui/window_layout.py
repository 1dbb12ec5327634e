"""The main window's layout: chat list | conversation | instructions over the inspector,
and where the window and its splitters sit on screen between runs."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QByteArray, QSettings, QSize, Qt
from PySide6.QtWidgets import QLabel, QMainWindow, QSplitter, QVBoxLayout, QWidget

from app.ui.chat_list import ChatListPanel
from app.ui.chat_view import ChatView
from app.ui.composer import Composer
from app.ui.dialogs import InfoBanner, storage_note
from app.ui.inspector import CacheInspector
from app.ui.instructions import InstructionEditor
from app.ui.screen_fit import restore_window, save_window

DEFAULT_SIZE = (1400, 900)
SPLITTER_KEYS = ("window/main_splitter", "window/side_splitter")


class CentralArea:
    """Builds the three columns once; the window's parts then use the widgets it holds."""

    def __init__(self, settings: QSettings) -> None:
        self.chat_list = ChatListPanel()
        self.chat_view = ChatView()
        self.instructions = InstructionEditor()
        self.inspector = CacheInspector()
        enter_sends = bool(settings.value("composer/enter_sends", True, type=bool))
        self.composer = Composer(enter_sends)
        self.chat_view.set_send_hint(enter_sends=enter_sends)
        self.banner_slot = QVBoxLayout()
        self.banner_slot.setContentsMargins(8, 8, 8, 0)
        self.chat_title = QLabel("")
        self.chat_title.setObjectName("chatTitle")
        self.side_splitter = self._side_column()
        self.main_splitter = QSplitter(Qt.Orientation.Horizontal)
        self.main_splitter.setObjectName("mainSplitter")
        self.main_splitter.addWidget(self.chat_list)
        self.main_splitter.addWidget(self._chat_column())
        self.main_splitter.addWidget(self.side_splitter)
        self.main_splitter.setStretchFactor(0, 0)
        self.main_splitter.setStretchFactor(1, 1)
        self.main_splitter.setStretchFactor(2, 1)
        self.main_splitter.setSizes([210, 560, 630])

    def _chat_column(self) -> QWidget:
        """Banners, the chat's title, the conversation and the composer under it."""
        chat_column = QWidget()
        chat_column.setObjectName("chatColumnPanel")
        column = QVBoxLayout(chat_column)
        column.setContentsMargins(0, 0, 0, 0)
        column.setSpacing(0)
        column.addLayout(self.banner_slot)
        column.addWidget(self.chat_title)
        column.addWidget(self.chat_view, 1)
        column.addWidget(self.composer)
        return chat_column

    def _side_column(self) -> QSplitter:
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.setObjectName("sideSplitter")
        splitter.addWidget(self.instructions)
        splitter.addWidget(self.inspector)
        splitter.setStretchFactor(0, 0)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([190, 680])  # the inspector (all phases) first
        return splitter

    def _splitters(self) -> tuple[tuple[str, QSplitter], ...]:
        return tuple(zip(SPLITTER_KEYS, (self.main_splitter, self.side_splitter), strict=True))

    def restore(self, window: QMainWindow, settings: QSettings) -> None:
        """Within the screen it opens on: its place there last time, clamped, or a default."""
        restore_window(window, settings, "window", QSize(*DEFAULT_SIZE))
        for key, splitter in self._splitters():
            state = settings.value(key)
            if isinstance(state, QByteArray) and not state.isEmpty():
                splitter.restoreState(state)

    def save(self, window: QMainWindow, settings: QSettings) -> None:
        save_window(window, settings, "window")
        for key, splitter in self._splitters():
            settings.setValue(key, splitter.saveState())

    def show_first_run_note(self, settings: QSettings, db_path: Path) -> InfoBanner | None:
        """Where the chats are stored, said once above the first conversation."""
        if settings.value("first_run/storage_note_shown", False, type=bool):
            return None
        banner = InfoBanner(storage_note(db_path) + " Help → Where are my chats? shows this again.")
        self.banner_slot.addWidget(banner)
        settings.setValue("first_run/storage_note_shown", True)
        return banner
