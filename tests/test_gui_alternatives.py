"""The window's Regenerate ×3 on the real model: three new versions, the first kept."""

from __future__ import annotations

from pathlib import Path

import pytest
from gui_helpers import (
    TURN_TIMEOUT_MS,
    close_window,
    log_of,
    open_window,
    send_turn,
    temp_settings,
    wait_background,
)

from app.ui.main_window import MainWindow

pytestmark = [pytest.mark.gui, pytest.mark.slow]


@pytest.fixture
def window(qtbot, db_path: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    opened = open_window(qtbot, db_path, temp_settings(tmp_path))
    yield opened
    close_window(opened)


def test_regenerate_three_adds_three_versions_and_shows_the_kept_one(
    qtbot, window: MainWindow
) -> None:
    first, _ = send_turn(qtbot, window, "Say a number.")
    original = window.current_chat_id
    log = log_of(window)
    seen = len(log.replies)
    window.temperature_spin.setValue(1.0)
    button = window.alternatives.button
    assert button.isEnabled() and button.text() == "Regenerate ×3"
    button.click()
    assert not button.isEnabled()  # like Regenerate while the turn runs
    qtbot.waitUntil(lambda: len(log.replies) > seen, timeout=TURN_TIMEOUT_MS)
    outcome = log.replies[-1]
    assert len(outcome.alternatives) == 3
    assert outcome.metrics.alternatives == 3
    assert outcome.metrics.prefill_tokens <= outcome.metrics.prompt_tokens
    assert window.current_chat_id == outcome.chat_id == outcome.alternatives[0].chat_id
    reply = window.chat_view.bubbles[-1]
    assert reply.text == outcome.reply and reply.version_label.text() == "2/4"
    wait_background(qtbot, window, outcome.metrics_id)
    assert button.isEnabled()
    versions = window.store.branches(original)[window.store.messages(original)[-1].seq]
    assert versions == [original, *(a.chat_id for a in outcome.alternatives)]
    assert window.store.messages(original)[-1].text == first.reply  # the old reply stays
