"""Continue and Edit on a reply in the window: real model, real SQLite, the worker writes.

A reply cut at max tokens offers Continue on its bubble, which streams more into the
same bubble and the same stored message; Edit stores a new version of a reply (the old
one stays behind ‹ ›) that can then be continued.
"""

from __future__ import annotations

import pytest
from gui_helpers import (
    TURN_TIMEOUT_MS,
    log_of,
    open_new_chat,
    send_turn,
    settle,
    wait_background,
)

from app.ui.main_window import MainWindow

pytestmark = [pytest.mark.gui]


def _continue(qtbot, window: MainWindow) -> None:  # type: ignore[no-untyped-def]
    log = log_of(window)
    seen = len(log.replies)
    window.chat_view.bubbles[-1].continue_button.click()
    qtbot.waitUntil(lambda: len(log.replies) > seen, timeout=TURN_TIMEOUT_MS)
    wait_background(qtbot, window, log.replies[-1].metrics_id)


def test_a_cut_reply_offers_continue_which_extends_the_same_message(
    qtbot, window: MainWindow
) -> None:
    chat_id = window.current_chat_id or open_new_chat(qtbot, window)
    window.max_tokens_spin.setValue(6)
    cut, _ = send_turn(qtbot, window, "Tell me about the sea.")
    bubble = window.chat_view.bubbles[-1]
    assert bubble.finish == "length"
    assert bubble.continue_button.isVisibleTo(window)
    assert not window.chat_view.bubbles[0].continue_button.isVisibleTo(window)

    _continue(qtbot, window)

    more = log_of(window).replies[-1]
    assert more.reply_message_id == cut.reply_message_id
    assert more.metrics.prefill_tokens == 1  # the reply's cells were still there
    messages = window.store.messages(chat_id)
    assert len(messages) == 2 and messages[-1].text == cut.reply + more.reply
    assert len(window.chat_view.bubbles) == 2
    assert window.chat_view.bubbles[-1].text == messages[-1].text
    assert "continued a reply of 6 tokens" in " ".join(more.metrics.notes)


def test_an_edited_reply_is_a_new_version_and_can_be_continued(qtbot, window: MainWindow) -> None:
    chat_id = window.current_chat_id or open_new_chat(qtbot, window)
    window.max_tokens_spin.setValue(6)
    cut, _ = send_turn(qtbot, window, "Tell me about the sea.")
    reply_bubble = window.chat_view.bubbles[-1]
    assert reply_bubble.edit_button.isVisibleTo(window)
    reply_bubble.edit_button.click()
    dialog = window.reply_actions.dialog
    assert dialog is not None
    dialog.editor.setPlainText("")  # hostile: an empty reply cannot be saved
    assert not dialog.save_button.isEnabled() and dialog.problem.text()
    dialog.editor.setPlainText("The sea is deep 🌊 and")
    log = log_of(window)
    seen = len(log.replies)
    dialog.continue_button.click()  # Save and continue

    qtbot.waitUntil(lambda: len(log.replies) > seen, timeout=TURN_TIMEOUT_MS)
    settle(qtbot, window)
    branch = window.current_chat_id
    assert branch != chat_id
    edited = window.store.messages(branch)[-1]
    assert edited.text.startswith("The sea is deep 🌊 and")
    assert edited.text == "The sea is deep 🌊 and" + log.replies[-1].reply
    assert window.store.messages(chat_id)[-1].text == cut.reply  # nothing lost
    bubble = window.chat_view.bubbles[-1]
    qtbot.waitUntil(lambda: bubble.version_label.text() == "2/2", timeout=TURN_TIMEOUT_MS)


def test_a_cut_replys_buttons_stay_inside_the_chat_column_at_1024_px(
    qtbot, window: MainWindow
) -> None:
    window.current_chat_id or open_new_chat(qtbot, window)
    window.max_tokens_spin.setValue(4)
    send_turn(qtbot, window, "Tell me about the sea.", background=False)
    window.resize(1024, 640)
    bubble = window.chat_view.bubbles[-1]
    viewport = window.chat_view.viewport()
    qtbot.waitUntil(lambda: viewport.width() < 420, timeout=TURN_TIMEOUT_MS)
    qtbot.wait(50)  # the bubble's layout follows the resize on the next loop turn
    for button in (bubble.edit_button, bubble.continue_button, bubble.copy_button):
        assert button.isVisibleTo(window)
        right = button.mapTo(viewport, button.rect().topRight()).x()
        assert right <= viewport.width(), (button.text(), right, viewport.width())
    assert bubble.tag_label.toolTip() == bubble.tag_label.text()  # elided, said in full
