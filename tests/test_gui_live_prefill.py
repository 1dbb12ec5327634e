"""Live prefill in the window: typing hands the draft to the worker after a pause, never
holds a keystroke, and the send that follows pays only what was not typed ahead."""

from __future__ import annotations

import time

from gui_helpers import TURN_TIMEOUT_MS, log_of, send_turn

from app.session.engine import DraftPrefill
from app.ui.live_prefill import DEBOUNCE_MS
from app.ui.main_window import MainWindow

#: A keystroke handled on the GUI thread: loose, to catch a blocking call on a loaded
#: machine (a prefill of the draft on this thread would take seconds).
KEYSTROKE_BOUND_MS = 500
MESSAGE = "What is the tallest mountain in Europe?"


def test_typing_prefills_the_draft_after_a_pause_and_send_pays_one_token(
    qtbot, window: MainWindow
) -> None:
    send_turn(qtbot, window, "Name a colour.")
    drafts: list[DraftPrefill] = []
    window.host.worker.draft_prefilled.connect(drafts.append)
    window.input.setFocus()
    slowest = 0.0
    for character in MESSAGE:  # faster than the debounce: one draft for the burst
        started = time.perf_counter()
        qtbot.keyClicks(window.input, character)
        slowest = max(slowest, (time.perf_counter() - started) * 1000)
    assert slowest < KEYSTROKE_BOUND_MS
    qtbot.waitUntil(lambda: bool(drafts), timeout=TURN_TIMEOUT_MS)
    assert window.live_prefill.sent < len(MESSAGE) / 4  # debounced, not one per key
    assert drafts[-1].completed and drafts[-1].evaluated > 0
    qtbot.wait(2 * DEBOUNCE_MS)
    sent = window.live_prefill.sent
    log = log_of(window)
    replies = len(log.replies)
    window.send()
    qtbot.waitUntil(lambda: len(log.replies) > replies, timeout=TURN_TIMEOUT_MS)
    metrics = log.replies[-1].metrics
    assert metrics.prefill_tokens == 1  # typed ahead: only the last token again, for logits
    assert metrics.typed_ahead_tokens > 0
    assert window.live_prefill.sent == sent  # clearing the composer is no draft
    qtbot.waitUntil(lambda: len(window.inspector.chart_series()["typed_ahead"]) == 2)
    series = window.inspector.chart_series()
    assert series["typed_ahead"][-1] == float(metrics.typed_ahead_tokens)
    assert series["reused"][-1] == float(metrics.reused_tokens - metrics.typed_ahead_tokens)


def test_a_newer_keystroke_and_a_chat_switch_cancel_the_draft(qtbot, window: MainWindow) -> None:
    send_turn(qtbot, window, "Name a colour.")
    host = window.host
    window.input.setPlainText(MESSAGE)
    window.live_prefill.flush()
    first = host.draft_cancel
    window.input.setPlainText(MESSAGE + " And the second?")
    window.live_prefill.flush()
    assert first.is_set() and not host.draft_cancel.is_set()  # the newer one runs
    second = host.draft_cancel
    window.select_chat(window.current_chat_id)  # shown again: the chat's prefetch
    assert second.is_set()
