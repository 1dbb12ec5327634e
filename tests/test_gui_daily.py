"""What a daily user notices: the version used last, drafts, idle work, figures that agree.

Real window, real model (the embedded SmolLM2), real SQLite files under tmp_path.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from gui_helpers import (
    TURN_TIMEOUT_MS,
    close_window,
    log_of,
    open_new_chat,
    open_window,
    send_turn,
    temp_settings,
)
from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QAbstractSlider

from app.cli import main as cli_main
from app.domain import Sampling
from app.storage.records import InstructionVersion, Message
from app.storage.store import Store
from app.ui import theme
from app.ui.app import create_application
from app.ui.chat_view import ChatView
from app.ui.instructions import InstructionEditor
from app.ui.main_window import MainWindow

pytestmark = [pytest.mark.gui]


def _context_count(window: MainWindow) -> int:
    return int(window.context_label.text().split()[1])


@pytest.mark.slow
def test_reopening_opens_the_version_used_last(
    qtbot, db_path: Path, settings: QSettings
) -> None:
    first = open_window(qtbot, db_path, settings)
    try:
        send_turn(qtbot, first, "Name a big city.")
        question = first.store.messages(first.current_chat_id)[0]
        first.start_edit(question.seq)
        send_turn(qtbot, first, "Name a small town.")
        branch = first.current_chat_id
        assert branch != first.store.chat(branch).family_id
    finally:
        close_window(first)
    second = open_window(qtbot, db_path, settings)
    try:
        assert second.current_chat_id == branch, "the version used last, not the first one"
        send_turn(qtbot, second, "And a village?")
        assert second.store.messages(branch)[-2].text == "And a village?"
    finally:
        close_window(second)


@pytest.mark.slow
def test_preempted_idle_steps_are_redone_so_the_saved_state_covers_the_history(
    qtbot, window: MainWindow
) -> None:
    chat_id = window.current_chat_id or open_new_chat(qtbot, window)
    for question in ("Name a fruit.", "Name a colour.", "Name an animal."):
        send_turn(qtbot, window, question)
    history = sum(len(m.token_ids) for m in window.store.messages(chat_id))
    log = log_of(window)
    seen = len(log.backgrounds)
    window.apply_trim(8, "exact")  # keep almost nothing: the saved state shrinks
    qtbot.waitUntil(
        lambda: any(b.completed for b in log.backgrounds[seen:] if b.chat_id == chat_id),
        timeout=TURN_TIMEOUT_MS,
    )
    assert len(window.store.kv.saved_token_ids(chat_id)) < history
    other = open_new_chat(qtbot, window)
    window.select_chat(chat_id)
    seen = len(log.backgrounds)
    window.apply_trim(None, "exact")  # remove the limit: the re-warm starts...
    window.host.delete_chat(other)  # ...and is pre-empted at once
    qtbot.waitUntil(
        lambda: any(not b.completed for b in log.backgrounds[seen:] if b.chat_id == chat_id),
        timeout=TURN_TIMEOUT_MS,
    )
    cut = next(i for i, b in enumerate(log.backgrounds[seen:], seen) if not b.completed)
    assert "pre-empted" in log.backgrounds[cut].notes[0]
    qtbot.waitUntil(
        lambda: any(b.completed for b in log.backgrounds[cut:] if b.chat_id == chat_id),
        timeout=TURN_TIMEOUT_MS,
    )
    saved = window.store.kv.saved_token_ids(chat_id)
    assert len(saved) > history, "preamble + every committed message (+ the block)"
    assert not window.host.worker.owed_upkeep


@pytest.mark.slow
def test_send_uses_unsaved_instructions_and_a_draft_survives_switch_and_restart(
    qtbot, db_path: Path, settings: QSettings
) -> None:
    window = open_window(qtbot, db_path, settings)
    try:
        chat_id = window.current_chat_id or open_new_chat(qtbot, window)
        window.instructions.editor.setPlainText("Answer in French.")
        assert window.instructions.draft_label.isVisibleTo(window)
        assert window.instructions.tabs.tabText(0) == "Text (draft)"
        send_turn(qtbot, window, "Name a fruit.")
        current = window.store.current_instructions(chat_id)
        assert current is not None and current.text == "Answer in French."
        assert not window.instructions.is_modified()
        assert not window.instructions.draft_label.isVisibleTo(window)

        window.instructions.editor.setPlainText("Answer in German.")
        other = open_new_chat(qtbot, window)
        assert window.instructions.text() == "", "the new chat has its own (empty) block"
        window.select_chat(chat_id)
        assert window.instructions.text() == "Answer in German."
        assert window.instructions.is_modified(), "still a draft: not used until sent or saved"
        assert window.current_chat_id != other
    finally:
        close_window(window)
    reopened = open_window(qtbot, db_path, settings)
    try:
        reopened.open_family(chat_id)
        assert reopened.instructions.text() == "Answer in German."
        assert reopened.instructions.draft_label.isVisibleTo(reopened)
        assert reopened.store.current_instructions(chat_id).text == "Answer in French."
    finally:
        close_window(reopened)


@pytest.mark.slow
def test_status_bar_and_inspector_show_one_cache_count(qtbot, window: MainWindow) -> None:
    send_turn(qtbot, window, "Name a fruit.")
    log = log_of(window)
    replies = len(log.replies)
    window.input.setPlainText("Name a colour.")
    window.send()
    qtbot.waitUntil(lambda: len(log.replies) > replies, timeout=TURN_TIMEOUT_MS)
    # At the moment the reply lands, both show the same figure...
    assert _context_count(window) == window.inspector.view.cache_tokens
    send_turn(qtbot, window, "Name an animal.")
    qtbot.waitUntil(
        lambda: _context_count(window) == window.inspector.view.cache_tokens, timeout=5000
    )
    # ...and the model is called by its GGUF name and size, not llama.cpp's guess.
    assert "256M" not in window.model.description and "135M" in window.model.description
    assert "135M" in window.about_text()


def test_the_empty_chat_names_the_key_that_sends(qtbot) -> None:  # type: ignore[no-untyped-def]
    view = ChatView()
    qtbot.addWidget(view)
    assert "press Enter to send" in view._placeholder.text()
    view.set_send_hint(enter_sends=False)
    assert "press Ctrl+Enter to send" in view._placeholder.text()


def test_a_streaming_reply_is_followed_unless_the_user_scrolled_up(qtbot) -> None:  # type: ignore[no-untyped-def]
    """Layout only (no model): a long reply grows in a short view."""
    view = ChatView()
    qtbot.addWidget(view)
    view.resize(500, 300)
    view.show()
    story = Message(1, 1, 0, "user", "Tell me a story.", [1], None, "complete", None, 0.0, None)
    view.show_messages([story], 0)
    view.begin_reply()
    bar = view.verticalScrollBar()
    for _ in range(40):
        view.append_token("A long line of the story that wraps in the narrow view. ")
        qtbot.wait(15)
    qtbot.waitUntil(lambda: bar.maximum() > 0 and bar.value() == bar.maximum(), timeout=3000)
    bar.triggerAction(QAbstractSlider.SliderAction.SliderPageStepSub)  # the user scrolls up
    held = bar.value()
    assert held < bar.maximum() and not view.is_following_end()
    for _ in range(20):
        view.append_token("More of the story, read later. ")
        qtbot.wait(15)
    assert bar.value() == held, "the view stays where the user is reading"
    bar.triggerAction(QAbstractSlider.SliderAction.SliderToMaximum)  # back at the end
    for _ in range(10):
        view.append_token("The end comes into view. ")
        qtbot.wait(15)
    qtbot.waitUntil(lambda: bar.value() == bar.maximum(), timeout=3000)
    assert view.is_following_end()


def test_storage_budget_is_megabytes_in_and_out(
    db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Store(db_path).close()
    assert cli_main(["storage", "--db", str(db_path), "--set-budget-mb", "500"]) == 0
    assert "of 500 MB" in capsys.readouterr().out


@pytest.mark.slow
def test_server_dialog_is_wide_and_says_connection_refused_plainly(
    qtbot, window: MainWindow
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    dialog = window.ask_server()
    dialog.url_edit.setText(url)
    dialog.test_button.click()
    qtbot.waitUntil(lambda: dialog.test_button.isEnabled(), timeout=30_000)
    text = dialog.result_label.text()
    assert text == f"Not connected. Connection refused: is the server running at {url}?"
    assert dialog.width() >= 440, "259 px clipped the answer"
    label = dialog.result_label.geometry()
    assert label.height() >= dialog.result_label.heightForWidth(label.width())
    dialog.reject()


def test_a_disabled_primary_button_looks_disabled_in_the_dark_theme(qtbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    create_application(settings=temp_settings(tmp_path))
    theme.apply(theme.ThemeMode.DARK)
    try:
        editor = InstructionEditor()
        qtbot.addWidget(editor)
        editor.show()
        assert not editor.save_button.isEnabled()
        image = editor.save_button.grab().toImage()
        white = sum(
            image.pixelColor(x, y).lightness() > 240
            for x in range(image.width())
            for y in range(image.height())
        )
        assert white == 0, "white text on a disabled button read as enabled"
    finally:
        theme.apply(theme.ThemeMode.LIGHT)


def test_long_versions_end_in_an_ellipsis_at_a_word(qtbot) -> None:  # type: ignore[no-untyped-def]
    editor = InstructionEditor()
    qtbot.addWidget(editor)
    text = "You are a concise assistant for a lighthouse keeper who answers in two sentences."
    version = InstructionVersion(1, 1, 1, text, {}, 0.0)
    editor.load([version], "history-first")
    shown = editor.versions.item(0).text().splitlines()[1]
    assert shown.endswith("…") and text.startswith(shown[:-1])
    assert text[len(shown) - 1] == " ", "cut between words, not inside one"


@pytest.mark.slow
def test_live_speed_while_streaming_and_every_reply_says_why_it_ended(
    qtbot, window: MainWindow
) -> None:
    window.max_tokens_spin.setValue(3)
    send_turn(qtbot, window, "Tell me about the sea.")
    assert window.turn_status.text().startswith("Cut at max tokens.")
    assert "cut at max tokens" in window.chat_view.bubbles[-1].tag_label.text()
    window.max_tokens_spin.setValue(400)
    window.temperature_spin.setValue(0.8)
    window.input.setPlainText("Write a long story about a lighthouse keeper and the sea.")
    window.send()
    qtbot.waitUntil(
        lambda: window.turn_status.text().startswith("Writing…")
        and window.turn_status.text().endswith("tok/s"),
        timeout=TURN_TIMEOUT_MS,
    )
    log = log_of(window)
    qtbot.waitUntil(lambda: not window.busy, timeout=TURN_TIMEOUT_MS)
    reason = log.replies[-1].metrics.finish_reason
    tag = window.chat_view.bubbles[-1].tag_label.text()
    assert ("ended" in tag) if reason == "stop" else ("cut at max tokens" in tag), (reason, tag)
    window.select_chat(window.current_chat_id)  # reopened: still said, from the stored metrics
    assert "cut at max tokens" in window.chat_view.bubbles[1].tag_label.text()


@pytest.mark.slow
def test_sampling_is_kept_per_chat_and_recorded_with_each_turn(qtbot, window: MainWindow) -> None:
    first = window.current_chat_id or open_new_chat(qtbot, window)
    panel = window.sampling_panel
    panel.top_k.setValue(1)
    panel.min_p.setValue(0.1)
    panel.repeat_penalty.setValue(1.2)
    panel.seed.setValue(42)
    open_new_chat(qtbot, window)
    assert panel.sampling() == Sampling() and panel.seed_value() == 0, "a new chat: defaults"
    window.select_chat(first)
    assert panel.sampling() == Sampling(top_k=1, min_p=0.1, repeat_penalty=1.2)
    send_turn(qtbot, window, "Name a fruit.")
    stored = window.store.metrics(first)[-1].data
    assert stored["seed"] == 42
    assert stored["sampling"] == {"top_k": 1, "top_p": 0.95, "min_p": 0.1, "repeat_penalty": 1.2}
