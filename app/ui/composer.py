"""The message composer: the text box, the turn's status line and the turn buttons.

Enter sends and Shift+Enter starts a new line (the chat-app convention); a setting
swaps that to Enter = new line, Ctrl+Enter = send. The status line wraps on a row of
its own instead of widening the window: its full text is in the tooltip too.
"""

from __future__ import annotations

from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QKeyEvent, QPainter, QResizeEvent
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

_ENTER_KEYS = (Qt.Key.Key_Return, Qt.Key.Key_Enter)


class ElidedLabel(QLabel):
    """One line of plain text that shrinks with its parent and ends in "…" when cut."""

    def __init__(self, text: str = "") -> None:
        super().__init__(text)
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.setTextFormat(Qt.TextFormat.PlainText)

    def setText(self, text: str) -> None:
        super().setText(text)
        self.setToolTip(text if self.is_elided() else "")

    def minimumSizeHint(self) -> QSize:
        return QSize(0, super().minimumSizeHint().height())

    def sizeHint(self) -> QSize:
        """The whole text: where there is room (a status bar) it is shown uncut."""
        margins = self.contentsMargins()
        width = self.fontMetrics().horizontalAdvance(self.text()) + margins.left() + margins.right()
        return QSize(width, super().sizeHint().height())

    def is_elided(self) -> bool:
        return self.fontMetrics().horizontalAdvance(self.text()) > self.contentsRect().width()

    def displayed_text(self) -> str:
        return self.fontMetrics().elidedText(
            self.text(), Qt.TextElideMode.ElideRight, self.contentsRect().width()
        )

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        self.setToolTip(self.text() if self.is_elided() else "")

    def paintEvent(self, _event: object) -> None:
        painter = QPainter(self)
        painter.setPen(self.palette().color(self.foregroundRole()))
        painter.drawText(
            self.contentsRect(),
            int(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter),
            self.displayed_text(),
        )


class StatusLine(QLabel):
    """The turn's figures on up to two wrapped lines of their own, whole in the tooltip.

    Beside the buttons it was elided at 1280 and 1024 px ("…first t…"); on its own row,
    wrapping at the "·" separators, the whole line fits a 300 px wide composer.
    """

    LINES = 2

    def __init__(self, text: str = "") -> None:
        super().__init__(text)
        self.setTextFormat(Qt.TextFormat.PlainText)
        self.setWordWrap(True)
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        self.setFixedHeight(self.fontMetrics().lineSpacing() * self.LINES + 2)

    def setText(self, text: str) -> None:
        super().setText(text)
        self.setToolTip(text)

    def minimumSizeHint(self) -> QSize:
        return QSize(0, self.height())

    def is_elided(self) -> bool:
        """True when the text needs more lines than the label shows."""
        if not self.text():
            return False
        needed = self.heightForWidth(max(self.contentsRect().width(), 1))
        return needed > self.contentsRect().height() + 1


class MessageInput(QPlainTextEdit):
    """Enter sends (or, with ``enter_sends`` off, Ctrl+Enter does); no newline is inserted."""

    send_requested = Signal()

    def __init__(self, enter_sends: bool = True) -> None:
        super().__init__()
        self.setObjectName("messageInput")
        self.enter_sends = True
        self.set_enter_sends(enter_sends)

    def set_enter_sends(self, enter_sends: bool) -> None:
        self.enter_sends = enter_sends
        if enter_sends:
            hint = "Message… (Enter sends, Shift+Enter new line, Esc stops)"
        else:
            hint = "Message… (Ctrl+Enter sends, Enter new line, Esc stops)"
        self.setPlaceholderText(hint)

    def keyPressEvent(self, event: QKeyEvent) -> None:
        if event.key() in _ENTER_KEYS:
            modifiers = event.modifiers()
            ctrl = bool(modifiers & Qt.KeyboardModifier.ControlModifier)
            shift = bool(modifiers & Qt.KeyboardModifier.ShiftModifier)
            if ctrl or (self.enter_sends and not shift):
                event.accept()
                self.send_requested.emit()
                return
            if shift:  # Shift+Enter would insert a paragraph separator; a newline is meant
                self.insertPlainText("\n")
                event.accept()
                return
        super().keyPressEvent(event)


class Composer(QWidget):
    """Text box over a status line and the Regenerate / Stop / Send buttons.

    While a sent message is being edited, a bar above the box says so: sending then
    makes a new version of that message (a branch), and Cancel goes back.
    """

    edit_cancelled = Signal()

    def __init__(self, enter_sends: bool = True) -> None:
        super().__init__()
        self.setObjectName("composer")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(8, 6, 8, 8)
        layout.setSpacing(6)
        self.edit_bar = QWidget()
        self.edit_bar.setObjectName("editBar")
        edit_row = QHBoxLayout(self.edit_bar)
        edit_row.setContentsMargins(0, 0, 0, 0)
        self.edit_label = ElidedLabel("")
        self.edit_label.setObjectName("hint")
        edit_row.addWidget(self.edit_label, 1)
        self.cancel_edit_button = QPushButton("Cancel edit")
        self.cancel_edit_button.clicked.connect(self.edit_cancelled)
        edit_row.addWidget(self.cancel_edit_button)
        self.edit_bar.hide()
        layout.addWidget(self.edit_bar)
        self.input = MessageInput(enter_sends)
        self.input.setFixedHeight(72)
        layout.addWidget(self.input)
        self.turn_status = StatusLine("")
        self.turn_status.setObjectName("turnStatus")
        layout.addWidget(self.turn_status)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        self.regenerate_button = QPushButton("Regenerate")
        self.regenerate_button.setToolTip("A new version of the last reply; the old one stays")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop the reply (Esc); the partial reply is kept")
        self.send_button = QPushButton("Send")
        self.send_button.setObjectName("primaryButton")
        for button in (self.regenerate_button, self.stop_button, self.send_button):
            buttons.addWidget(button)
        layout.addLayout(buttons)
        self.set_enter_sends(enter_sends)

    def show_editing(self, text: str) -> None:
        self.edit_label.setText(
            "Editing a sent message: sending makes a new version of it (a branch);"
            " the other versions stay, behind ‹ ›."
        )
        self.edit_bar.show()
        self.input.setPlainText(text)
        self.input.setFocus()
        self.input.moveCursor(self.input.textCursor().MoveOperation.End)

    def hide_editing(self) -> None:
        self.edit_bar.hide()

    def set_enter_sends(self, enter_sends: bool) -> None:
        self.input.set_enter_sends(enter_sends)
        self.send_button.setToolTip("Send (Enter)" if enter_sends else "Send (Ctrl+Enter)")
