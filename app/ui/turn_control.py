"""A turn: sending (to a new chat or a new version of an edited message), regenerating,
stopping, streaming the reply with its live speed, and the reply's outcome or failure.

Nothing typed is lost: a message the worker did not store goes back into the composer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import TYPE_CHECKING

from app.domain import FinishReason
from app.session.engine import GenerationOptions
from app.storage.records import Chat
from app.storage.store import StorageError
from app.ui.chat_actions import ChatActions
from app.ui.instruction_edits import InstructionEdits
from app.ui.sampling import store_chat_sampling
from app.ui.window_part import WindowPart, unless_closed

if TYPE_CHECKING:
    from app.session.engine import TurnResult
    from app.ui.window_base import WindowBase

LIVE_SPEED_AFTER_S = 0.3  # the live tok/s appears once it means something


class TurnControl(WindowPart):
    """Send, Regenerate, Stop and editing a sent message; the worker's turn answers."""

    def __init__(self, window: WindowBase, chats: ChatActions, edits: InstructionEdits) -> None:
        super().__init__(window)
        self.chats = chats
        self.edits = edits
        self.pending_text: str | None = None  # the message being answered
        self._pending_typed = ""  # as typed, to give back if it was not stored
        self.editing_seq: int | None = None  # a sent user message being edited
        self._sending = False  # a send waits for its chat or version to be made
        self._stream_pieces = 0  # reply pieces of the turn streaming now (live tok/s)
        self._stream_started: float | None = None
        self._alternatives = 1  # replies the Regenerate being made asks for

    def generation_options(self) -> GenerationOptions:
        return GenerationOptions(
            max_tokens=self.window.max_tokens_spin.value(),
            temperature=self.window.temperature_spin.value(),
            seed=self.window.sampling_panel.seed_value(),
            sampling=self.window.sampling_panel.sampling(),
        )

    def store_sampling(self) -> None:
        """The Sampling panel's values belong to the chat on screen."""
        if self.window.current_chat_id is not None:
            store_chat_sampling(
                self.window.settings,
                self.window.current_chat_id,
                self.window.sampling_panel.sampling(),
                self.window.sampling_panel.seed_value(),
            )

    def send(self) -> None:
        typed = self.window.input.toPlainText()
        text = typed.rstrip()  # a trailing newline or space is never meant to be sent
        if not text.strip():
            return
        if self.window.busy:
            self.window.statusBar().showMessage(
                "A reply is still being written; Esc stops it.", 4000
            )
            return
        if self._sending:
            return  # the chat (or the version) this message goes to is being made
        if self.window.instructions.is_modified():  # Send uses what the editor shows
            self.edits.save_instructions(
                self.window.instructions.text(), self.window.instructions.variables(), warm_up=False
            )
        if self.editing_seq is not None and self.window.current_chat_id is not None:
            source, at = self.window.current_chat_id, self.editing_seq
            self._sending = True
            self.window.host.change_store(
                "Edit message",
                lambda store: store.branch_chat(source, at),
                lambda branch: self._send_to_new_version(branch, typed, text),
            )
            return
        if self.window.current_chat_id is None:
            self._sending = True
            self.chats.with_chat(lambda chat_id: self._send_to(chat_id, typed, text))
            return
        self._send_to(self.window.current_chat_id, typed, text)

    def _send_to_new_version(self, branch: object, typed: str, text: str) -> None:
        self._sending = False
        if not isinstance(branch, Chat) or self.closed:
            return  # the error signal said why; the text stays in the composer
        self.chats.select_chat(branch.id)  # shows the messages before the edited one
        self.chats.refresh_chats()
        self._send_to(branch.id, typed, text)

    def _send_to(self, chat_id: int, typed: str, text: str) -> None:
        self._sending = False
        if self.closed:
            return
        self.pending_text = text
        self._pending_typed = typed
        self.window.input.clear()
        self.window.chat_view.add_pending_user(text)
        self.window.chat_view.begin_reply()
        self.set_busy(True, "Reading the prompt…")
        self.window.host.send(chat_id, text, self.generation_options())

    def start_edit(self, seq: int) -> None:
        """Put a sent user message into the composer; sending makes a new version of it."""
        if self.window.busy or self.window.current_chat_id is None:
            self.window.statusBar().showMessage("Wait for the reply to finish, then edit.", 4000)
            return
        message = next(
            (m for m in self.window.store.messages(self.window.current_chat_id) if m.seq == seq),
            None,
        )
        if message is None or message.role != "user":
            return
        self.editing_seq = seq
        self.window.composer.show_editing(message.text)

    def cancel_edit(self) -> None:
        if self.editing_seq is None:
            return
        self.editing_seq = None
        self.window.composer.hide_editing()
        self.window.input.clear()

    def regenerate(self) -> None:
        chat_id = self.window.current_chat_id
        if chat_id is None or self.window.busy:
            return
        messages = self.window.store.messages(chat_id)
        if not messages:
            return
        # Show the conversation without the reply being regenerated (it stays stored: the
        # new reply becomes its next version, ‹ › switches between them).
        while messages and messages[-1].role == "assistant":
            messages.pop()
        if messages and messages[-1].status == "unanswered":  # being answered now
            messages[-1] = dataclasses.replace(messages[-1], status="complete")
        chat = self.window.store.chat(chat_id)
        self.window.chat_view.show_messages(messages, chat.cache_start_seq)
        self.window.chat_view.begin_reply()
        self.pending_text = None
        self.set_busy(True, "Regenerating…")
        options = dataclasses.replace(self.generation_options(), alternatives=self._alternatives)
        self.window.host.regenerate(chat_id, options)

    def regenerate_alternatives(self, count: int) -> None:
        """Regenerate with ``count`` replies sampled at once (the window's Regenerate ×3)."""
        self._alternatives = count
        try:
            self.regenerate()
        finally:
            self._alternatives = 1

    def stop(self) -> None:
        if self.window.busy:
            self.window.host.stop()
            self.window.turn_status.setText("Stopping…")

    def set_busy(self, busy: bool, status: str = "") -> None:
        self.window.busy = busy
        self._stream_pieces, self._stream_started = 0, None
        self.window.turn_status.setText(status)
        self.window.chat_view.set_actions_enabled(not busy)
        self.window.update_actions()

    @unless_closed
    def on_token(self, chat_id: int, piece: str) -> None:
        if chat_id == self.window.current_chat_id:
            self._stream_pieces += 1
            now = time.monotonic()
            if self._stream_started is None:
                self._stream_started = now
            if not self.window.turn_status.text().startswith("Stopping"):
                elapsed = now - self._stream_started
                if elapsed >= LIVE_SPEED_AFTER_S:  # live tokens per second while streaming
                    speed = (self._stream_pieces - 1) / elapsed
                    self.window.turn_status.setText(
                        f"Writing… {self._stream_pieces} tokens · {speed:.0f} tok/s"
                    )
                elif not self.window.turn_status.text().startswith("Writing"):
                    self.window.turn_status.setText("Writing…")
            self.window.chat_view.append_token(piece)

    @unless_closed
    def on_progress(self, chat_id: int, phase: str, done: int, total: int) -> None:
        if phase != "prefill" or total < 256:
            return  # short steps would only flicker
        self.window.progress.setRange(0, total)
        self.window.progress.setValue(done)
        self.window.progress.setFormat(f"{phase} %v/%m")
        self.window.progress.setVisible(done < total)

    @unless_closed
    def on_reply(self, outcome: TurnResult) -> None:
        self.window.chat_view.stop_rendering()
        self.window.progress.hide()
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
        if outcome.version_of is not None and outcome.version_of == self.window.current_chat_id:
            self.window.current_chat_id = (
                outcome.chat_id
            )  # Regenerate: show the reply's new version
            self.window.inspector.set_turns(
                [(r.id, r.data) for r in self.window.store.metrics(outcome.chat_id)]
            )
        on_screen = outcome.chat_id == self.window.current_chat_id
        self.set_busy(False, status if on_screen else "")
        if on_screen:
            self.chats.reload_chat(incremental=True)
            self.window.inspector.upsert_turn(outcome.metrics_id, metrics)
            # The status bar and the inspector both take the count from the worker's next
            # cache view: the same figure at the same moment.
            self.window.host.refresh_cache_view(outcome.chat_id)
        self.chats.refresh_chats()
        self.window.update_actions()
        self.window.reply_received.emit(outcome)

    @unless_closed
    def on_turn_failed(self, chat_id: int, kind: str, message: str) -> None:
        self.window.chat_view.stop_rendering()
        self.window.progress.hide()
        text = self.pending_text
        self.pending_text = None
        self.set_busy(False, "")
        if chat_id == self.window.current_chat_id:
            self.chats.reload_chat(incremental=True)
        stored = False
        if text is not None:
            with contextlib.suppress(StorageError):
                stored = any(
                    m.role == "user" and m.text == text
                    for m in self.window.store.messages(chat_id)[-2:]
                )
        if text is not None and not stored and not self.window.input.toPlainText().strip():
            self.window.input.setPlainText(self._pending_typed)  # nothing typed is lost
        title = "Message too long" if kind == "overflow" else "The reply failed"
        if kind == "overflow" and (
            self.window.model is None or self.window.model.kv_type != "server"
        ):
            message += " (Model → Model settings… sets the context size)"
        self.window.turn_error.emit(kind, message)
        self.window.show_error(title, message[:1].upper() + message[1:] + ".")
