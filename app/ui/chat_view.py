"""The conversation: one bubble per message, the streaming reply updated in place.

A bubble per message (rather than one big HTML document) keeps streaming cheap: only
the last bubble is re-rendered, at most every ``RENDER_INTERVAL_MS``, however long the
chat is. Messages that left the cache (or would, in a trim preview) are greyed.
"""

from __future__ import annotations

from PySide6.QtCore import QSize, Qt, QTimer, Signal
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from app.storage.records import Message
from app.ui import theme
from app.ui.composer import ElidedLabel
from app.ui.markdown import Block, CodeBlock, TextBlock, markdown_blocks, plain_to_html

RENDER_INTERVAL_MS = 40
FOLLOW_SLACK_PX = 40  # this close to the end counts as "at the end"
FINISH_TAGS = {
    "stop": "ended",
    "length": "cut at max tokens",
    "context full": "cut: context full",
}


class WrappedLabel(QLabel):
    """A word-wrapped rich-text label that remembers its height for each width.

    QLabel lays its text out again on every heightForWidth call, and the chat's layout
    asks every bubble each time the streaming bubble grows: without the cache a long
    chat would make each streamed update cost as much as laying out the whole chat.
    """

    def __init__(self) -> None:
        super().__init__()
        self._heights: dict[int, int] = {}

    def setText(self, text: str) -> None:
        self._heights.clear()
        super().setText(text)

    def minimumSizeHint(self) -> QSize:
        """One line tall: QLabel's own hint is the height at its narrowest width, which
        made the chat column (and its scroll range) far taller than the bubbles."""
        hint = super().minimumSizeHint()
        return QSize(hint.width(), self.fontMetrics().height())

    def heightForWidth(self, width: int) -> int:
        height = self._heights.get(width)
        if height is None:
            height = super().heightForWidth(width)
            if len(self._heights) > 32:
                self._heights.clear()
            self._heights[width] = height
        return height


def _link_button(text: str, tip: str) -> QPushButton:
    button = QPushButton(text)
    button.setObjectName("bubbleCopy")  # the same quiet, link-like look
    button.setToolTip(tip)
    button.setCursor(Qt.CursorShape.PointingHandCursor)
    return button


def _text_label() -> WrappedLabel:
    label = WrappedLabel()
    label.setObjectName("bubbleBody")
    label.setWordWrap(True)
    label.setTextFormat(Qt.TextFormat.RichText)
    label.setTextInteractionFlags(
        Qt.TextInteractionFlag.TextSelectableByMouse | Qt.TextInteractionFlag.LinksAccessibleByMouse
    )
    label.setOpenExternalLinks(True)  # links open in the browser
    label.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
    return label


class CodeBlockView(QFrame):
    """A code block of a reply: its language, a Copy button, the highlighted code."""

    def __init__(self, block: CodeBlock) -> None:
        super().__init__()
        self.setObjectName("codeBlock")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(8, 4, 8, 6)
        layout.setSpacing(2)
        header = QHBoxLayout()
        self.language_label = QLabel()
        self.language_label.setObjectName("codeLanguage")
        header.addWidget(self.language_label)
        header.addStretch(1)
        self.copy_button = QPushButton("Copy")
        self.copy_button.setObjectName("codeCopy")
        self.copy_button.setToolTip("Copy this code block")
        self.copy_button.setCursor(Qt.CursorShape.PointingHandCursor)
        self.copy_button.clicked.connect(self.copy_code)
        header.addWidget(self.copy_button)
        layout.addLayout(header)
        self.code_label = _text_label()
        self.code_label.setObjectName("codeText")
        layout.addWidget(self.code_label)
        self.block = block
        self.set_block(block)

    def set_block(self, block: CodeBlock) -> None:
        self.block = block
        self.language_label.setText(block.language or "code")
        self.code_label.setText(block.html)

    def copy_code(self) -> None:
        QGuiApplication.clipboard().setText(self.block.code)


class MarkdownBody(QWidget):
    """A reply's blocks as widgets; on an update only the blocks that changed are redone."""

    def __init__(self) -> None:
        super().__init__()
        self._layout = QVBoxLayout(self)
        self._layout.setContentsMargins(0, 0, 0, 0)
        self._layout.setSpacing(4)
        self.blocks: list[Block] = []
        self.views: list[QWidget] = []

    def set_blocks(self, blocks: list[Block]) -> None:
        for index, block in enumerate(blocks):
            if index < len(self.blocks) and self.blocks[index] == block:
                continue
            view = self.views[index] if index < len(self.views) else None
            if isinstance(block, CodeBlock) and isinstance(view, CodeBlockView):
                view.set_block(block)
            elif not isinstance(block, CodeBlock) and isinstance(view, WrappedLabel):
                view.setText(block.html)
            else:
                replacement: QWidget
                if isinstance(block, CodeBlock):
                    replacement = CodeBlockView(block)
                else:
                    label = _text_label()
                    label.setText(block.html)
                    replacement = label
                if view is not None:
                    self._layout.replaceWidget(view, replacement)
                    view.hide()  # gone from sight now; deleted when the loop is idle
                    view.deleteLater()
                    self.views[index] = replacement
                else:
                    self._layout.addWidget(replacement)
                    self.views.append(replacement)
        for view in self.views[len(blocks) :]:
            self._layout.removeWidget(view)
            view.hide()  # gone from sight now; deleted when the loop is idle
            view.deleteLater()
        self.views = self.views[: len(blocks)]
        self.blocks = list(blocks)

    def code_views(self) -> list[CodeBlockView]:
        return [view for view in self.views if isinstance(view, CodeBlockView)]

    def plain_html(self) -> str:
        """The rendered blocks as one string (tests look at what is shown)."""
        return "".join(block.html for block in self.blocks)


def _repolish(widget: QWidget) -> None:
    """Re-apply the style sheet after a dynamic property changed (children's rules too)."""
    for target in [widget, *widget.findChildren(QLabel)]:
        target.style().unpolish(target)
        target.style().polish(target)
        target.update()


class MessageBubble(QFrame):
    """One message: role, status tags, a copy button and the rendered text.

    A user message with no reply (a kill, a full disk, a stop before the first token)
    is tagged "unanswered"; as the chat's last message it offers Retry, which answers it.
    """

    retry_clicked = Signal()
    edit_clicked = Signal(int)  # seq of this user message
    fork_clicked = Signal(int)  # seq of this message
    branch_clicked = Signal(int)  # chat id of another version of this message
    edit_reply_clicked = Signal(int)  # seq of this reply
    continue_clicked = Signal()  # extend this reply (the chat's last, cut at max tokens)

    def __init__(
        self,
        role: str,
        text: str,
        *,
        message_id: int | None = None,
        status: str = "complete",
        tokens: int = 0,
    ) -> None:
        super().__init__()
        self.role = role
        self.message_id = message_id
        self.text = text
        self.status = status
        self.finish: str | None = None  # the turn's finish reason (replies)
        self.tokens = tokens
        self.setObjectName("bubble")
        self.setProperty("role", role)
        self.setProperty("inCache", True)
        # Preferred, not Maximum: Maximum caps a bubble at its sizeHint, which is shorter
        # than its height for a narrow width (a wrapped table), and cut the text off.
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Preferred)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(10, 6, 10, 8)
        layout.setSpacing(2)
        header = QHBoxLayout()
        header.setSpacing(6)
        self.role_label = QLabel("You" if role == "user" else "Assistant")
        self.role_label.setObjectName("bubbleRole")
        header.addWidget(self.role_label)
        # Elided when the column is narrow (1024 px): the buttons beside it stay whole.
        self.tag_label = ElidedLabel()
        self.tag_label.setObjectName("bubbleTag")
        header.addWidget(self.tag_label, 1)
        self.previous_version = _link_button("‹", "The previous version of this message")
        self.version_label = QLabel()
        self.version_label.setObjectName("bubbleTag")
        self.next_version = _link_button("›", "The next version of this message")
        self.previous_version.clicked.connect(lambda: self._switch_version(-1))
        self.next_version.clicked.connect(lambda: self._switch_version(+1))
        for arrow in (self.previous_version, self.next_version):
            arrow.setObjectName("versionArrow")  # a real button, not a faint glyph
        for widget in (self.previous_version, self.version_label, self.next_version):
            widget.hide()
            header.addWidget(widget)
        self.versions: list[int] = []  # chat ids of this message's versions, oldest first
        self.version_index = 0
        self.edit_button = _link_button("Edit", "Send a new version of this message (a branch)")
        self.edit_button.clicked.connect(self._on_edit)
        header.addWidget(self.edit_button)
        self.fork_button = _link_button("Fork", "A new chat with the messages up to this one")
        self.fork_button.clicked.connect(self._on_fork)
        header.addWidget(self.fork_button)
        self.retry_button = QPushButton("Retry")
        self.retry_button.setObjectName("bubbleRetry")
        self.retry_button.setToolTip("Answer this message now")
        self.retry_button.setCursor(Qt.CursorShape.PointingHandCursor)
        self.retry_button.clicked.connect(self.retry_clicked)
        self.retry_button.hide()
        header.addWidget(self.retry_button)
        self.continue_button = self._continue_button()
        header.addWidget(self.continue_button)
        self.copy_button = QPushButton("Copy")
        self.copy_button.setObjectName("bubbleCopy")
        self.copy_button.setToolTip("Copy this message as plain text")
        self.copy_button.setCursor(Qt.CursorShape.PointingHandCursor)
        self.copy_button.clicked.connect(self.copy_text)
        header.addWidget(self.copy_button)
        layout.addLayout(header)
        self.body = MarkdownBody()
        self.body.setObjectName("bubbleContent")
        layout.addWidget(self.body)
        self.in_cache = True
        self.preview = False
        self.seq: int | None = None
        self._update_message_actions()
        self.set_text(text)
        self._update_tags()

    def _continue_button(self) -> QPushButton:
        """Continue: offered on the chat's last reply when it was cut at max tokens."""
        button = QPushButton("Continue")
        button.setObjectName("bubbleRetry")
        button.setToolTip("Write more of this reply, from the cache")
        button.setCursor(Qt.CursorShape.PointingHandCursor)
        button.clicked.connect(self.continue_clicked)
        button.hide()
        self.continue_offered = False
        return button

    def set_text(self, text: str) -> None:
        self.text = text
        self.lay_out_text()

    def lay_out_text(self) -> None:
        """Lay the text out again (also after a theme change: colours are in the HTML)."""
        text = self.text
        if self.role == "user":
            blocks: list[Block] = [TextBlock(plain_to_html(text))]
        else:
            blocks = markdown_blocks(text) if text.strip() else [TextBlock("<i>…</i>")]
        self.body.set_blocks(blocks)

    def set_message(self, message_id: int | None, seq: int | None) -> None:
        """The stored message this bubble shows (Edit and Fork need its seq)."""
        self.message_id = message_id
        self.seq = seq
        self._update_message_actions()

    def _update_message_actions(self) -> None:
        stored = self.seq is not None
        self.edit_button.setVisible(stored)
        if self.role == "assistant":
            self.edit_button.setToolTip("Edit this reply (a new version; the old one is kept)")
        self.fork_button.setVisible(stored)

    def set_versions(self, chat_ids: list[int], current_chat_id: int) -> None:
        """‹ 2/3 ›: the chats holding other versions of this message (their branches): an
        edited user message, or a reply made again by Regenerate."""
        self.versions = list(chat_ids) if len(chat_ids) > 1 else []
        self.version_index = (
            self.versions.index(current_chat_id) if current_chat_id in self.versions else 0
        )
        shown = bool(self.versions)
        for widget in (self.previous_version, self.version_label, self.next_version):
            widget.setVisible(shown)
        if shown and self.role == "assistant":  # versions made by Regenerate
            self.previous_version.setToolTip("The previous version of this reply")
            self.next_version.setToolTip("The next version of this reply")
            self.version_label.setToolTip("Regenerate keeps every version of a reply")
        if shown:
            self.version_label.setText(f"{self.version_index + 1}/{len(self.versions)}")
            self.previous_version.setEnabled(self.version_index > 0)
            self.next_version.setEnabled(self.version_index < len(self.versions) - 1)

    def _switch_version(self, step: int) -> None:
        target = self.version_index + step
        if 0 <= target < len(self.versions):
            self.branch_clicked.emit(self.versions[target])

    def _on_edit(self) -> None:
        if self.seq is not None and self.role == "assistant":
            self.edit_reply_clicked.emit(self.seq)
        elif self.seq is not None:
            self.edit_clicked.emit(self.seq)

    def _on_fork(self) -> None:
        if self.seq is not None:
            self.fork_clicked.emit(self.seq)

    def set_actions_enabled(self, enabled: bool) -> None:
        """No edit, fork or version switch while a reply is being written."""
        for button in (self.edit_button, self.fork_button, self.continue_button):
            button.setEnabled(enabled)
        if self.versions:
            self.previous_version.setEnabled(enabled and self.version_index > 0)
            self.next_version.setEnabled(
                enabled and self.version_index < len(self.versions) - 1
            )

    def set_status(self, status: str) -> None:
        self.status = status
        self._update_tags()

    def set_in_cache(self, in_cache: bool, *, preview: bool = False) -> None:
        self.in_cache = in_cache
        self.preview = preview and not in_cache
        self.setProperty("inCache", in_cache)
        _repolish(self)
        self._update_tags()

    def set_finish(self, reason: str | None) -> None:
        """Why the reply ended (the turn's finish reason): every reply says it."""
        self.finish = reason
        self._update_tags()
        self.set_continue_offered(self.continue_offered)

    def set_continue_offered(self, offered: bool) -> None:
        """Continue is offered on the chat's last reply when it was cut at max tokens."""
        self.continue_offered = offered
        self.continue_button.setVisible(
            offered
            and self.role == "assistant"
            and self.finish == "length"
            and self.status == "complete"
            and self.seq is not None
        )

    def _update_tags(self) -> None:
        tags = []
        finish = FINISH_TAGS.get(self.finish or "")
        if self.status == "unanswered":
            tags.append("unanswered")
        elif self.status == "cancelled":
            tags.append("stopped")
        elif self.status == "streaming":
            tags.append("writing…")
        elif finish:
            tags.append(finish)
        if not self.in_cache:
            tags.append("would leave the cache" if self.preview else "not in cache")
        if self.tokens:
            tags.append(f"{self.tokens} tokens")
        self.tag_label.setText(" · ".join(tags))

    def refresh_tags(self) -> None:
        self._update_tags()

    def set_retry_offered(self, offered: bool) -> None:
        self.retry_button.setVisible(offered and self.status == "unanswered")

    def copy_text(self) -> None:
        QGuiApplication.clipboard().setText(self.text)


class ChatView(QScrollArea):
    """Scrollable column of bubbles with a streaming reply at the end."""

    retry_requested = Signal()  # the last message is unanswered and the user asked for a reply
    edit_requested = Signal(int)  # seq of a user message
    fork_requested = Signal(int)  # seq of a message
    branch_requested = Signal(int)  # chat id of another version
    edit_reply_requested = Signal(int)  # seq of a reply
    continue_requested = Signal()  # extend the chat's last reply

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        theme.notifier.changed.connect(self._on_theme_changed)
        self.setObjectName("chatView")
        self.setWidgetResizable(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self._column = QWidget()
        self._column.setObjectName("chatColumn")
        self._layout = QVBoxLayout(self._column)
        self._layout.setContentsMargins(12, 12, 12, 12)
        self._layout.setSpacing(10)
        self._layout.addStretch(1)
        self.setWidget(self._column)
        self.bubbles: list[MessageBubble] = []
        self.streaming: MessageBubble | None = None
        self._stream_text = ""
        self._render_timer = QTimer(self)
        self._render_timer.setSingleShot(True)
        self._render_timer.setInterval(RENDER_INTERVAL_MS)
        self._render_timer.timeout.connect(self._render_stream)
        self._scroll_timer = QTimer(self)  # owned by the view: stopped with it, never leaks
        self._scroll_timer.setSingleShot(True)
        self._scroll_timer.setInterval(0)
        self._scroll_timer.timeout.connect(self._scroll_now)
        # Follow the end (a streaming reply) until the user scrolls up; back at the end, follow.
        self._follow_end = True
        bar = self.verticalScrollBar()
        bar.actionTriggered.connect(self._on_user_scroll)
        bar.rangeChanged.connect(self._on_range_changed)
        self._placeholder = QLabel("")
        self._placeholder.setObjectName("placeholder")
        self._placeholder.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self._placeholder.setWordWrap(True)  # a narrow column at 1024 px cut it off
        self._layout.insertWidget(0, self._placeholder)
        self.set_send_hint(enter_sends=True)

    def set_send_hint(self, *, enter_sends: bool) -> None:
        """The empty chat names the key that really sends (View → Enter sends)."""
        keys = "Enter" if enter_sends else "Ctrl+Enter"
        self._placeholder.setText(f"No messages yet. Type below and press {keys} to send.")

    # -- whole chat -----------------------------------------------------------------

    def _on_theme_changed(self, _palette: object) -> None:
        """Rendered replies carry their colours (code, tables): render them again."""
        for bubble in self.bubbles:
            bubble.lay_out_text()

    def clear(self) -> None:
        self._render_timer.stop()
        for bubble in self.bubbles:
            self._layout.removeWidget(bubble)
            bubble.hide()  # gone from sight now; deleted when the loop is idle
            bubble.deleteLater()
        self.bubbles = []
        self.streaming = None
        self._stream_text = ""
        self._placeholder.show()

    def show_messages(self, messages: list[Message], cache_start_seq: int) -> None:
        self.clear()
        for message in messages:
            bubble = self._add(
                MessageBubble(
                    message.role,
                    message.text,
                    message_id=message.id,
                    status=message.status,
                    tokens=len(message.token_ids),
                )
            )
            bubble.set_message(message.id, message.seq)
            bubble.set_in_cache(message.seq >= cache_start_seq)
        self._offer_retry()
        self.scroll_to_end()

    def _offer_retry(self) -> None:
        """Retry answers the chat's last message, so only that bubble offers it."""
        for index, bubble in enumerate(self.bubbles):
            bubble.set_retry_offered(index == len(self.bubbles) - 1)
            bubble.set_continue_offered(index == len(self.bubbles) - 1)

    def sync_messages(self, messages: list[Message], cache_start_seq: int) -> None:
        """Like show_messages, but keeps bubbles whose message is unchanged (cheap after a turn)."""
        self._render_timer.stop()
        if self.streaming is not None and self.streaming.text != self._stream_text:
            self.streaming.set_text(self._stream_text)
        keep = 0
        for bubble, message in zip(self.bubbles, messages, strict=False):
            same_text = bubble.role == message.role and bubble.text == message.text
            if not same_text or bubble.message_id not in (None, message.id):
                break
            keep += 1
        for bubble in self.bubbles[keep:]:
            self._layout.removeWidget(bubble)
            bubble.hide()  # gone from sight now; deleted when the loop is idle
            bubble.deleteLater()
        self.bubbles = self.bubbles[:keep]
        self.streaming = None
        for message in messages[keep:]:
            self._add(MessageBubble(message.role, message.text, message_id=message.id))
        for bubble, message in zip(self.bubbles, messages, strict=True):
            bubble.set_message(message.id, message.seq)
            bubble.tokens = len(message.token_ids)
            bubble.status = message.status
            in_cache = message.seq >= cache_start_seq
            if bubble.in_cache != in_cache or bubble.preview:
                bubble.set_in_cache(in_cache)
            else:
                bubble.refresh_tags()
        if not messages:
            self._placeholder.show()
        self._offer_retry()
        self.scroll_to_end()

    def mark_leaving(self, message_ids: set[int], preview: bool) -> None:
        """Grey the messages that are (or, in a preview, would be) outside the cache."""
        for bubble in self.bubbles:
            if bubble.message_id is None:
                continue
            bubble.set_in_cache(bubble.message_id not in message_ids, preview=preview)

    def set_finish_reasons(self, reasons: dict[int, str]) -> None:
        """Message id → the finish reason of the turn that wrote that reply."""
        for bubble in self.bubbles:
            if bubble.role == "assistant" and bubble.message_id in reasons:
                bubble.set_finish(reasons[bubble.message_id])

    def set_branches(self, branches: dict[int, list[int]], chat_id: int) -> None:
        """Version arrows on the messages that have other versions (seq → chat ids)."""
        for bubble in self.bubbles:
            versions = branches.get(bubble.seq, []) if bubble.seq is not None else []
            bubble.set_versions(versions, chat_id)

    def set_actions_enabled(self, enabled: bool) -> None:
        for bubble in self.bubbles:
            bubble.set_actions_enabled(enabled)

    def _add(self, bubble: MessageBubble) -> MessageBubble:
        bubble.retry_clicked.connect(self.retry_requested)
        bubble.edit_clicked.connect(self.edit_requested)
        bubble.fork_clicked.connect(self.fork_requested)
        bubble.branch_clicked.connect(self.branch_requested)
        bubble.edit_reply_clicked.connect(self.edit_reply_requested)
        bubble.continue_clicked.connect(self.continue_requested)
        for earlier in self.bubbles:
            earlier.set_retry_offered(False)
            earlier.set_continue_offered(False)
        self._placeholder.hide()
        self._layout.insertWidget(self._layout.count() - 1, bubble)
        self.bubbles.append(bubble)
        return bubble

    # -- a turn in progress ---------------------------------------------------------

    def add_pending_user(self, text: str) -> MessageBubble:
        bubble = self._add(MessageBubble("user", text))
        self.scroll_to_end()
        return bubble

    def begin_reply(self) -> MessageBubble:
        self._stream_text = ""
        self.streaming = self._add(MessageBubble("assistant", "", status="streaming"))
        self.scroll_to_end()
        return self.streaming

    def continue_last_reply(self) -> MessageBubble | None:
        """Stream more text into the last reply's bubble (Continue); None: no reply there."""
        last = self.bubbles[-1] if self.bubbles else None
        if last is None or last.role != "assistant":
            return None
        self._stream_text = last.text
        self.streaming = last
        last.set_continue_offered(False)
        last.set_status("streaming")
        self.scroll_to_end()
        return last

    def append_token(self, piece: str) -> None:
        if self.streaming is None:
            self.begin_reply()
        self._stream_text += piece
        if not self._render_timer.isActive():
            self._render_timer.start()

    def _render_stream(self) -> None:
        if self.streaming is not None:
            self.streaming.set_text(self._stream_text)
            if self._follow_end:
                self._scroll_timer.start()

    def _on_user_scroll(self, _action: int) -> None:
        """Wheel, keys or drag: follow the end again only once the user is back at it."""
        bar = self.verticalScrollBar()
        self._follow_end = bar.sliderPosition() >= bar.maximum() - FOLLOW_SLACK_PX

    def _on_range_changed(self, _minimum: int, maximum: int) -> None:
        """The reply grew (its layout is done only now): keep its last line in view."""
        if self._follow_end:
            self.verticalScrollBar().setValue(maximum)

    def is_following_end(self) -> bool:
        return self._follow_end

    def streamed_text(self) -> str:
        return self._stream_text

    def stop_rendering(self) -> None:
        self._render_timer.stop()
        self._scroll_timer.stop()

    def scroll_to_top(self) -> None:
        self._scroll_timer.stop()
        self._follow_end = False
        self.verticalScrollBar().setValue(0)

    def scroll_to_end(self) -> None:
        """After the new bubble's layout is done, i.e. on the next event-loop turn."""
        self._follow_end = True
        self._scroll_timer.start()

    def _scroll_now(self) -> None:
        bar = self.verticalScrollBar()
        bar.setValue(bar.maximum())
