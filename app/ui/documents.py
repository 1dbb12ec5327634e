"""Documents in the window: File → Attach document…, drag and drop onto the window, the
attachment strip above the chat (name, tokens, detach) and the chat's option "Each
question starts from the documents".

The window only reads; attaching, detaching and the option are writes, sent to the
worker as store changes. A file is read here (bounded by ``app.core.documents``'s
limits); one that cannot be attached is one line in the status bar and nothing is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QEvent, QObject, Qt, Signal
from PySide6.QtGui import QAction, QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMenu,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from app.core.documents import DocumentError, read_document
from app.storage.records import Document
from app.storage.store import Store
from app.ui.window_part import WindowPart, unless_closed

if TYPE_CHECKING:
    from app.session.engine import CacheView
    from app.ui.chat_actions import ChatActions
    from app.ui.window_base import WindowBase


FILE_FILTER = "Documents (*.txt *.md *.markdown *.pdf);;All files (*)"


class DocumentStrip(QWidget):
    """The chat's attachments, one chip each (name, tokens, ×), and the chat's option."""

    detach_requested = Signal(int)  # document id
    no_history_toggled = Signal(bool)

    def __init__(self) -> None:
        super().__init__()
        self.setObjectName("documentStrip")
        self.chips = QHBoxLayout()
        self.chips.setContentsMargins(0, 0, 0, 0)
        self.no_history = QCheckBox("Each question starts from the documents")
        self.no_history.setToolTip(
            "Every question is answered from the preamble, the documents and the block:"
            " replies stay in the chat for reading but not in the prompt"
        )
        self.no_history.toggled.connect(self.no_history_toggled)
        row = QHBoxLayout(self)
        row.setContentsMargins(8, 4, 8, 4)
        row.addLayout(self.chips)
        row.addStretch(1)
        row.addWidget(self.no_history)
        self.labels: dict[int, QLabel] = {}
        self.hide()

    def show_documents(self, documents: list[Document], no_history: bool) -> None:
        """Show a chat's documents (token counts come later, from the cache view)."""
        while self.chips.count():
            item = self.chips.takeAt(0)
            widget = item.widget() if item is not None else None
            if widget is not None:
                widget.deleteLater()
        self.labels = {}
        for document in documents:
            chip = QWidget()
            chip.setObjectName("documentChip")
            layout = QHBoxLayout(chip)
            layout.setContentsMargins(4, 0, 0, 0)
            label = QLabel(f"\N{PAGE FACING UP} {document.name} · … tokens")
            label.setToolTip(f"{len(document.text):,} characters, in the prompt before the history")
            detach = QToolButton()
            detach.setText("×")
            detach.setToolTip(f"Detach {document.name}")
            detach.clicked.connect(lambda _=False, i=document.id: self.detach_requested.emit(i))
            layout.addWidget(label)
            layout.addWidget(detach)
            self.chips.addWidget(chip)
            self.labels[document.id] = label
        self.no_history.blockSignals(True)
        self.no_history.setChecked(no_history)
        self.no_history.blockSignals(False)
        self.setVisible(bool(documents) or no_history)

    def show_tokens(self, counts: list[tuple[int, int]], names: dict[int, str]) -> None:
        for document_id, tokens in counts:
            label = self.labels.get(document_id)
            if label is not None:
                label.setText(f"\N{PAGE FACING UP} {names[document_id]} · {tokens:,} tokens")


class DocumentsController(WindowPart):
    """Wires the strip, the File menu's action and drops to the window's chat."""

    def __init__(self, window: WindowBase, chats: ChatActions) -> None:
        super().__init__(window)
        self.chats = chats
        self.strip = DocumentStrip()
        parent = window.chat_view.parentWidget()
        column = parent.layout() if parent is not None else None
        assert isinstance(column, QVBoxLayout)  # the chat column: title, chat, composer
        column.insertWidget(column.indexOf(window.chat_view), self.strip)
        self.attach_action = QAction("Attach document…", window)
        self.attach_action.setToolTip("Put a text, Markdown or PDF file before the history")
        self.attach_action.triggered.connect(self.ask_attach)
        file_menu = window.menuBar().actions()[0].menu()  # File: after "New chat"
        assert isinstance(file_menu, QMenu)
        file_menu.insertAction(file_menu.actions()[1], self.attach_action)
        self.strip.detach_requested.connect(self.detach)
        self.strip.no_history_toggled.connect(self.set_no_history)
        chats.chat_shown.connect(lambda _chat_id: self.refresh())
        window.cache_view_shown.connect(self.show_cache_view)
        window.setAcceptDrops(True)
        window.installEventFilter(self)

    # -- showing ----------------------------------------------------------------------

    def refresh(self) -> None:
        """Show the chat on screen's documents and option."""
        current = self.window.current_chat_id
        chat = self.window.store.chat_or_none(current) if current is not None else None
        if chat is None:
            self.strip.show_documents([], False)
            return
        self.strip.show_documents(self.window.store.documents(chat.id), bool(chat.no_history))

    def show_cache_view(self, view: CacheView) -> None:
        """The documents' token counts, from the engine's view of the chat on screen."""
        if view.chat_id != self.window.current_chat_id or view.chat_id is None:
            return
        names = {d.id: d.name for d in self.window.store.documents(view.chat_id)}
        self.strip.show_tokens([c for c in view.documents if c[0] in names], names)

    # -- changes ----------------------------------------------------------------------

    def ask_attach(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(
            self.window, "Attach document", str(Path.home()), FILE_FILTER
        )
        self.attach_files([Path(p) for p in paths])

    def attach_files(self, paths: list[Path]) -> None:
        """Read each file and attach it to the current chat (a new chat if none is open)."""
        texts = []
        for path in paths:
            try:
                texts.append(read_document(path))
            except DocumentError as error:
                self.window.show_error("Attach document", str(error))
        if not texts:
            return

        def attach(chat_id: int) -> None:
            def write(store: Store) -> int:
                for document in texts:
                    store.attach_document(chat_id, document.name, document.text)
                return chat_id

            self.window.host.change_store("Attach document", write, self._changed)

        current = self.window.current_chat_id
        if current is None:
            self.chats.new_chat(attach)
        else:
            attach(current)

    def detach(self, document_id: int) -> None:
        chat_id = self.window.current_chat_id

        def write(store: Store) -> int | None:
            store.detach_document(document_id)
            return chat_id

        self.window.host.change_store("Detach document", write, self._changed)

    def set_no_history(self, enabled: bool) -> None:
        chat_id = self.window.current_chat_id
        if chat_id is None:
            return
        self.window.host.change_store(
            "Each question starts from the documents",
            lambda store: store.update_chat(chat_id, no_history=int(enabled)).id,
            self._changed,
        )

    @unless_closed
    def _changed(self, chat_id: object) -> None:
        """A change was written: the chat on screen is shown anew (its prompt changed)."""
        if isinstance(chat_id, int) and chat_id == self.window.current_chat_id:
            self.chats.select_chat(chat_id)

    # -- drag and drop ----------------------------------------------------------------

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if watched is self.window and event.type() == QEvent.Type.DragEnter:
            assert isinstance(event, QDragEnterEvent)
            if event.mimeData().hasUrls():
                event.acceptProposedAction()
                return True
        if watched is self.window and event.type() == QEvent.Type.Drop:
            assert isinstance(event, QDropEvent)
            urls = event.mimeData().urls()
            paths = [Path(url.toLocalFile()) for url in urls if url.isLocalFile()]
            if paths:
                event.setDropAction(Qt.DropAction.CopyAction)
                event.accept()
                self.attach_files(paths)
                return True
        return super().eventFilter(watched, event)
