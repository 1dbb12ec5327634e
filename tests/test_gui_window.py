"""The real window on the real default model: turns, inspector, restart, trim, stop, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from gui_helpers import (
    TURN_TIMEOUT_MS,
    close_window,
    log_of,
    open_new_chat,
    open_window,
    send_turn,
    settle,
    temp_settings,
    wait_background,
)
from PySide6.QtCore import QSettings, Qt
from PySide6.QtWidgets import QApplication

from app.core.metrics import PHASES
from app.storage.store import DatabaseInUse, Store
from app.ui.chat_view import MessageBubble
from app.ui.main_window import MainWindow

pytestmark = [pytest.mark.gui, pytest.mark.slow]

COMPARED_FIELDS = (
    "reused_tokens",
    "prefill_tokens",
    "background_tokens",
    "commit_tokens",
    "warmup_tokens",
    "decode_tokens",
    "ttft_ms",
    "prefill_ms",
    "cache_tokens",
    "state_bytes",
    "state_save_ms",
    "state_load_ms",
    "layout",
)


def test_turn_streams_and_inspector_matches_stored_metrics(qtbot, window: MainWindow) -> None:
    tokens: list[str] = []
    window.host.worker.token.connect(lambda _chat, piece: tokens.append(piece))
    window.instructions.editor.setPlainText("You are terse. Answer in one sentence.")
    window.save_instructions(window.instructions.text())
    first, _ = send_turn(qtbot, window, "Name a colour.")
    second, background = send_turn(qtbot, window, "Name another one.")
    assert first.reply and second.reply
    assert tokens, "tokens must stream through the worker's signal"
    assert background is not None and background.completed

    rows = window.store.metrics(window.current_chat_id)
    assert len(rows) == 2 == len(window.inspector.turns)
    for shown, stored in zip(window.inspector.turns, rows, strict=True):
        for field in COMPARED_FIELDS:
            assert shown[field] == stored.data[field], field
    series = window.inspector.chart_series()
    reused = [a + b for a, b in zip(series["reused"], series["typed_ahead"], strict=True)]
    assert reused == [float(r.data["reused_tokens"]) for r in rows]
    assert series["prefill"] == [float(r.data["prefill_tokens"]) for r in rows]
    assert series["background"] == [float(r.data["background_tokens"]) for r in rows]
    assert series["ttft_ms"] == [float(r.data["ttft_ms"]) for r in rows]
    last = rows[-1].data
    assert last["reused_tokens"] > 0, "the second turn reuses the first turn's cache"
    assert last["state_save_ms"] is not None and last["state_bytes"] > 0

    assert window.inspector.phase_table.rowCount() == len(PHASES)
    view = window.inspector.view
    assert view is not None and view.cache_tokens == last["cache_tokens"]
    labels = [label for label, _ in view.segments]
    assert "history" in labels and "instruction block" in labels
    assert f"/ {window.model.n_ctx}" in window.context_label.text()
    assert window.kv_label.text() == "KV f16"
    roles = [bubble.role for bubble in window.chat_view.bubbles]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert window.chat_view.bubbles[-1].text == second.reply


def test_keyboard_send_and_new_chat(qtbot, window: MainWindow) -> None:
    window.activateWindow()
    qtbot.waitUntil(lambda: window.isActiveWindow(), timeout=5000)
    log = log_of(window)
    window.input.setFocus()
    window.input.setPlainText("Hi")
    qtbot.keyClick(window.input, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    qtbot.waitUntil(lambda: len(log.replies) == 1, timeout=TURN_TIMEOUT_MS)
    assert window.input.toPlainText() == ""
    before = window.current_chat_id
    qtbot.keyClick(window, Qt.Key.Key_N, Qt.KeyboardModifier.ControlModifier)
    qtbot.waitUntil(lambda: window.current_chat_id != before, timeout=TURN_TIMEOUT_MS)
    assert window.chat_view.bubbles == []


def test_reopening_restores_the_saved_cache(qtbot, db_path: Path, settings: QSettings) -> None:
    first = open_window(qtbot, db_path, settings)
    outcome, _ = send_turn(qtbot, first, "Tell me a fact about cats.")
    chat_id = outcome.chat_id
    close_window(first)

    second = open_window(qtbot, db_path, settings)
    try:
        assert second.current_chat_id == chat_id
        assert second.chat_list.current_chat_id() == chat_id
        assert [b.role for b in second.chat_view.bubbles] == ["user", "assistant"]
        assert len(second.inspector.turns) == 1
        # The selected chat's state is restored in the background, before any send.
        qtbot.waitUntil(
            lambda: (
                second.host.worker.session is not None
                and second.host.worker.session.cache_chat_id == chat_id
            ),
            timeout=TURN_TIMEOUT_MS,
        )
        reply, _ = send_turn(qtbot, second, "And one about dogs.")
        assert reply.metrics.state_load_ms is None  # already restored: not on the critical path
        assert reply.metrics.reused_tokens > 0
        assert reply.metrics.state_rejected is None
    finally:
        close_window(second)


def test_trim_slider_previews_and_applies(qtbot, window: MainWindow) -> None:
    for text in ("First question: what is rain?", "Second: what is snow?", "Third: what is hail?"):
        send_turn(qtbot, window, text)
    chat_id = window.current_chat_id
    slider = window.inspector.trim_slider
    assert window.inspector.trim_limit() is None
    messages = window.store.messages(chat_id)
    last_turn_tokens = sum(len(m.token_ids) for m in messages[-2:])
    limit = last_turn_tokens + 1  # room for the last turn only

    with qtbot.waitSignal(window.trim_preview_shown, timeout=TURN_TIMEOUT_MS) as preview:
        slider.setSliderDown(True)
        slider.setValue(limit)
    assert preview.args[0].turns_change == 2
    assert preview.args[0].limit == limit
    greyed = [b for b in window.chat_view.bubbles if not b.in_cache]
    assert len(greyed) == 4
    assert "2 turn(s) leave the cache" in window.inspector.trim_preview_label.text()
    assert window.store.chat(chat_id).trim_tokens is None, "a drag only previews"

    with qtbot.waitSignal(window.trim_changed, timeout=TURN_TIMEOUT_MS):
        slider.setSliderDown(False)  # emits sliderReleased, as a mouse release does
    chat = window.store.chat(chat_id)
    assert chat.trim_tokens == limit
    assert chat.cache_start_seq == messages[-2].seq
    assert [b.in_cache for b in window.chat_view.bubbles] == [False] * 4 + [True] * 2

    # Back to no limit: the turns come back into the cache.
    with qtbot.waitSignal(window.trim_changed, timeout=TURN_TIMEOUT_MS) as applied:
        slider.setValue(slider.maximum())
    assert applied.args[1].turns_change == -2
    assert window.store.chat(chat_id).trim_tokens is None
    assert all(b.in_cache for b in window.chat_view.bubbles)


def test_stop_keeps_partial_reply_and_the_next_turn_works(qtbot, window: MainWindow) -> None:
    window.max_tokens_spin.setValue(400)
    window.temperature_spin.setValue(0.8)
    log = log_of(window)
    pieces: list[str] = []
    window.host.worker.token.connect(lambda _chat, piece: pieces.append(piece))
    window.input.setPlainText("Write a long story about a lighthouse keeper.")
    window.send()
    qtbot.waitUntil(lambda: len(pieces) >= 3, timeout=TURN_TIMEOUT_MS)
    window.stop()
    qtbot.waitUntil(lambda: len(log.replies) == 1, timeout=TURN_TIMEOUT_MS)
    stopped = log.replies[0]
    assert stopped.metrics.finish_reason == "cancelled"
    messages = window.store.messages(stopped.chat_id)
    assert messages[0].role == "user"
    assert messages[0].text.startswith("Write a long story")
    assert len(messages) == 2  # tokens had streamed, so the partial reply is kept
    assert messages[1].role == "assistant" and messages[1].status == "cancelled"
    assert messages[1].text == stopped.reply
    assert "stopped" in window.chat_view.bubbles[-1].tag_label.text()
    assert stopped.metrics.decode_tokens < 400

    window.max_tokens_spin.setValue(8)
    window.temperature_spin.setValue(0.0)
    after, _ = send_turn(qtbot, window, "Summarise it in three words.")
    assert after.metrics.finish_reason in ("length", "stop")
    assert window.store.messages(after.chat_id)[-1].status == "complete"


def test_escape_stops(qtbot, window: MainWindow) -> None:
    window.max_tokens_spin.setValue(400)
    window.activateWindow()
    qtbot.waitUntil(lambda: window.isActiveWindow(), timeout=5000)
    log = log_of(window)
    pieces: list[str] = []
    window.host.worker.token.connect(lambda _chat, piece: pieces.append(piece))
    window.input.setPlainText("Count from one to two hundred in words.")
    window.send()
    qtbot.waitUntil(lambda: len(pieces) >= 2, timeout=TURN_TIMEOUT_MS)
    qtbot.keyClick(window.input, Qt.Key.Key_Escape)
    qtbot.waitUntil(lambda: len(log.replies) == 1, timeout=TURN_TIMEOUT_MS)
    assert log.replies[0].metrics.finish_reason == "cancelled"


def test_context_overflow_keeps_the_typed_text(qtbot, db_path: Path, settings: QSettings) -> None:
    small = open_window(qtbot, db_path, settings, n_ctx=256)
    try:
        text = "word " * 600
        small.input.setPlainText(text)
        with qtbot.waitSignal(small.turn_error, timeout=TURN_TIMEOUT_MS) as failed:
            small.send()
        assert failed.args[0] == "overflow"
        assert "context size" in failed.args[1]
        assert small.input.toPlainText() == text
        assert small.store.messages(small.current_chat_id) == []
        assert small.last_error is not None and "over the context size" in small.last_error
        assert not small.busy
    finally:
        close_window(small)


def test_bad_model_file_keeps_the_previous_model(qtbot, window: MainWindow, tmp_path: Path) -> None:
    previous = window.model
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a model at all")
    with qtbot.waitSignal(window.model_error, timeout=TURN_TIMEOUT_MS) as failed:
        window.load_model(str(bad))
    assert "GGUF" in failed.args[0]
    assert window.model == previous
    assert window.model_combo.currentData() == previous.path
    outcome, _ = send_turn(qtbot, window, "Still there?")
    assert outcome.reply


def test_second_instance_is_refused(window: MainWindow, db_path: Path, tmp_path: Path) -> None:
    with pytest.raises(DatabaseInUse):
        MainWindow(db_path, settings=temp_settings(tmp_path / "other"))


def test_edit_cost_preview_and_layout_switch(qtbot, window: MainWindow) -> None:
    window.instructions.editor.setPlainText("Be brief.")
    window.save_instructions(window.instructions.text())
    send_turn(qtbot, window, "What is a cache?")
    send_turn(qtbot, window, "And a KV cache?")
    with qtbot.waitSignal(window.edit_cost_shown, timeout=TURN_TIMEOUT_MS) as cost:
        window.instructions.editor.setPlainText("Be brief and friendly.")
    history_first_tokens = cost.args[0]
    assert 0 < history_first_tokens < 40, "history-first: only the block is recomputed"
    assert "recomputes" in window.instructions.cost_label.text()

    window.instructions.revert_button.click()  # back to the saved text, then a layout preview
    with qtbot.waitSignal(window.edit_cost_shown, timeout=TURN_TIMEOUT_MS) as switched:
        window.instructions.layout_combo.setCurrentIndex(
            window.instructions.layout_combo.findData("system-first")
        )
    chat_id = window.current_chat_id
    assert window.store.chat(chat_id).layout == "history-first", "a preview changes nothing"
    assert switched.args[0] > history_first_tokens, "system-first recomputes the history"
    assert "Applying this layout recomputes" in window.instructions.cost_label.text()
    assert window.instructions.apply_layout_button.isVisible()

    log = log_of(window)
    seen = len(log.backgrounds)
    window.instructions.apply_layout_button.click()
    settle(qtbot, window)
    assert window.store.chat(chat_id).layout == "system-first"
    assert not window.instructions.apply_layout_button.isVisible()
    qtbot.waitUntil(lambda: len(log.backgrounds) > seen, timeout=TURN_TIMEOUT_MS)
    # Once the idle-time rebuild is done, the label says the next message costs only itself.
    qtbot.waitUntil(
        lambda: "pays only for itself" in window.instructions.cost_label.text(),
        timeout=TURN_TIMEOUT_MS,
    )
    outcome, _ = send_turn(qtbot, window, "Short answer please.")
    message_tokens = len(window.store.messages(chat_id)[-2].token_ids)
    assert outcome.metrics.prefill_tokens <= message_tokens + 16


def test_variables_are_saved_with_each_version(qtbot, window: MainWindow) -> None:
    editor = window.instructions
    editor.editor.setPlainText("You help {{user}} with {{topic}}.")
    table = editor.variables_table
    names = [table.item(row, 0).text() for row in range(table.rowCount())]
    assert names == ["user", "topic"], "placeholders typed in the text get rows"
    editor.variables_table.item(0, 1).setText("Ada")
    editor.variables_table.item(1, 1).setText("lighthouses")
    assert editor.tabs.tabText(1) == "Variables (2)"
    editor.save_button.click()
    settle(qtbot, window)
    chat_id = window.current_chat_id
    saved = window.store.current_instructions(chat_id)
    assert saved.variables == {"user": "Ada", "topic": "lighthouses"}
    # A new version with another value; the old one keeps its own.
    editor.variables_table.item(0, 1).setText("Grace")
    editor.save_button.click()
    settle(qtbot, window)
    versions = window.store.instruction_versions(chat_id)
    assert [v.variables["user"] for v in versions] == ["Ada", "Grace"]
    editor.restore_version(1)
    assert editor.variables() == {"user": "Ada", "topic": "lighthouses"}


def test_instruction_versions_restore_and_save(qtbot, window: MainWindow) -> None:
    editor = window.instructions
    for text in ("Version one.", "Version two."):
        editor.editor.setPlainText(text)
        window.save_instructions(editor.text())
        settle(qtbot, window)
    chat_id = window.current_chat_id
    assert [v.text for v in window.store.instruction_versions(chat_id)] == [
        "Version one.",
        "Version two.",
    ]
    assert editor.versions.count() == 2
    editor.restore_version(1)
    assert editor.text() == "Version one."
    assert editor.save_button.isEnabled()
    editor.save_button.click()
    settle(qtbot, window)
    versions = window.store.instruction_versions(chat_id)
    assert [v.version for v in versions] == [1, 2, 3]
    assert versions[-1].text == "Version one."


def test_chat_list_new_rename_search_delete(qtbot, window: MainWindow) -> None:
    first = open_new_chat(qtbot, window)
    second = open_new_chat(qtbot, window)
    window.rename_chat(first, "Recipes")
    qtbot.waitUntil(lambda: window.store.chat(first).name == "Recipes", timeout=5000)
    window.rename_chat(second, "Recipes")
    qtbot.waitUntil(lambda: "already exists" in (window.last_error or ""), timeout=5000)
    window.chat_list.search.setText("recip")
    qtbot.waitUntil(lambda: window.chat_list.list.count() == 1, timeout=5000)
    window.chat_list.search.clear()
    qtbot.waitUntil(lambda: window.chat_list.list.count() == 2, timeout=5000)

    send_turn(qtbot, window, "Hello there")
    assert window.current_chat_id == second
    with qtbot.waitSignal(window.chat_removed, timeout=TURN_TIMEOUT_MS):
        window.delete_chat(second)
    with Store(window.db_path) as check:
        assert [c.id for c in check.chats()] == [first]
        assert check.kv.state(second) is None
    assert window.current_chat_id == first


def test_regenerate_replaces_the_last_reply(qtbot, window: MainWindow) -> None:
    send_turn(qtbot, window, "Say a number.")
    log = log_of(window)
    window.temperature_spin.setValue(1.0)
    window.regenerate()
    qtbot.waitUntil(lambda: len(log.replies) == 2, timeout=TURN_TIMEOUT_MS)
    again = log.replies[-1]
    assert again.regenerated
    wait_background(qtbot, window, again.metrics_id)
    messages = window.store.messages(again.chat_id)
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[-1].text == again.reply


def test_exports_png_and_csv(qtbot, window: MainWindow, tmp_path: Path) -> None:
    send_turn(qtbot, window, "One")
    send_turn(qtbot, window, "Two")
    png = window.inspector.export_png(tmp_path / "charts.png")
    assert png.stat().st_size > 1000
    exported = window.inspector.export_csv(tmp_path / "turns.csv")
    with exported.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    stored = window.store.metrics(window.current_chat_id)
    assert [int(r["prefill_tokens"]) for r in rows] == [s.data["prefill_tokens"] for s in stored]


def test_sending_again_preempts_the_background_work(qtbot, window: MainWindow) -> None:
    """The next send must not wait for commit + warm-up of the previous turn."""
    window.instructions.editor.setPlainText("You are a storyteller. Write long answers.")
    window.save_instructions(window.instructions.text())
    window.max_tokens_spin.setValue(96)
    log = log_of(window)
    seen = len(log.backgrounds)
    replies_before = len(log.replies)
    sent_again: list[int] = []

    def send_again(outcome: object) -> None:
        if not sent_again:
            sent_again.append(outcome.metrics_id)  # type: ignore[attr-defined]
            window.max_tokens_spin.setValue(4)
            window.input.setPlainText("Go on.")
            window.send()  # at once: the first turn's commit has barely started

    window.reply_received.connect(send_again)
    window.input.setPlainText("Tell me a story about a lighthouse.")
    window.send()
    qtbot.waitUntil(lambda: len(log.replies) == replies_before + 2, timeout=TURN_TIMEOUT_MS)
    wait_background(qtbot, window, log.replies[-1].metrics_id, seen)
    first_turn = log.replies[replies_before].metrics_id
    first = [b for b in log.backgrounds[seen:] if b.metrics_id == first_turn]
    assert first and not first[0].completed and first[0].metrics is None
    assert "pre-empted" in first[0].notes[0]
    second = log.replies[-1].metrics
    assert second.reused_tokens > 0


def test_switching_model_shows_load_progress(qtbot, window: MainWindow) -> None:
    fractions: list[float] = []
    window.host.worker.load_progress.connect(fractions.append)
    with qtbot.waitSignal(window.model_ready, timeout=TURN_TIMEOUT_MS) as loaded:
        window.load_model(window.model.path)
    assert fractions and fractions[-1] == pytest.approx(1.0)
    assert loaded.args[0].path == window.model.path
    assert window.model_status_label.text().startswith(Path(window.model.path).name)
    outcome, _ = send_turn(qtbot, window, "Hello again")
    assert outcome.reply


def test_an_unanswered_message_shows_retry_which_answers_it(qtbot, window: MainWindow) -> None:
    chat_id = window.current_chat_id or open_new_chat(qtbot, window)
    with Store(window.db_path) as other:  # as a kill would leave it
        other.add_message(chat_id, "user", "Name a bird.")
    window.select_chat(chat_id)
    bubble = window.chat_view.bubbles[-1]
    assert "unanswered" in bubble.tag_label.text()
    qtbot.waitUntil(bubble.retry_button.isVisible, timeout=2000)
    log = log_of(window)
    bubble.retry_button.click()
    qtbot.waitUntil(lambda: len(log.replies) == 1, timeout=TURN_TIMEOUT_MS)
    wait_background(qtbot, window, log.replies[-1].metrics_id)
    messages = window.store.messages(chat_id)
    assert [(m.role, m.status) for m in messages] == [
        ("user", "complete"),
        ("assistant", "complete"),
    ]
    assert all(b.retry_button.isHidden() for b in window.chat_view.bubbles)


def test_generation_fields_refuse_out_of_range_numbers(window: MainWindow) -> None:
    from app import limits

    for value in (float("nan"), float("inf"), -1.0, 99.0):
        window.temperature_spin.setValue(value)
        limits.check_temperature(window.generation_options().temperature)
    window.max_tokens_spin.setValue(10**9)
    assert window.generation_options().max_tokens == limits.check_max_tokens(
        window.max_tokens_spin.value()
    )
    window.max_tokens_spin.setValue(-5)
    assert window.generation_options().max_tokens == 1


def test_window_fits_a_small_laptop_screen_after_a_reply(qtbot, window: MainWindow) -> None:
    """A long status line used to set the composer's minimum width (1,305 px at least)."""
    send_turn(qtbot, window, "Say hello in five words.")
    window.turn_status.setText("Reused 123456, recomputed 654321 tokens · " * 6)
    window.resize(1024, 640)
    qtbot.waitUntil(lambda: window.size().toTuple() == (1024, 640), timeout=5000)
    hint = window.minimumSizeHint()
    assert hint.width() <= 1024 and hint.height() <= 640, hint
    plot = window.inspector.plot_widgets[window.inspector.current_chart()]
    assert plot.isVisible() and plot.height() >= 96, "the chart on show keeps a usable height"


def test_labels_describe_the_chat_on_screen(qtbot, window: MainWindow) -> None:
    first = window.current_chat_id or open_new_chat(qtbot, window)
    send_turn(qtbot, window, "Name a fruit.")
    assert window.turn_status.text().startswith("Reused")
    assert "saved" in window.inspector.size_label.text(), "the chat's state on disk"
    assert "budget" in window.inspector.size_label.toolTip(), "and all chats' against it"
    assert window.context_label.text() != "context — / 8192"
    first_count = window.context_label.text()
    second = open_new_chat(qtbot, window)
    assert window.current_chat_id == second
    assert window.turn_status.text() == "", "the previous chat's figures are gone"
    assert window.context_label.text() != first_count
    assert window.inspector.turns == []
    qtbot.waitUntil(lambda: window.inspector.view is not None, timeout=TURN_TIMEOUT_MS)
    view = window.inspector.view
    # The new chat is made by the worker, whose cache view of it may already have come:
    # the label then shows that count, never the first chat's.
    assert window.context_label.text() in (
        f"context — / {view.n_ctx}",
        f"context {view.cache_tokens} / {view.n_ctx}",
    )
    # Whatever the cache holds now belongs to the new chat's prompt (its preamble, shared
    # with the first chat, may be kept): nothing of the first chat's messages.
    assert view.chat_id in (None, second) and view.cache_tokens == view.matching_tokens
    assert "no model" not in window.inspector.size_label.text()
    window.select_chat(first)
    assert len(window.inspector.turns) == 1


def test_export_chat_as_markdown_and_json(qtbot, window: MainWindow, tmp_path: Path) -> None:
    window.instructions.editor.setPlainText("Answer for {{user}}.")
    window.instructions.variables_table.item(0, 1).setText("Ada")
    window.instructions.save_button.click()
    outcome, _ = send_turn(qtbot, window, "Give me a `code` word and a | pipe.")
    markdown = window.export_chat(tmp_path / "chat.md").read_text(encoding="utf-8")
    assert "## You\n\nGive me a `code` word and a | pipe." in markdown
    assert f"## Assistant\n\n{outcome.reply}" in markdown
    assert f"reused {outcome.metrics.reused_tokens}" in markdown
    assert "| user | Ada |" in markdown
    document = json.loads(window.export_chat(tmp_path / "chat.json").read_text(encoding="utf-8"))
    assert document["format"] == "kvchat-chat" and document["format_version"] == 1
    reply = document["messages"][-1]
    assert reply["text"] == outcome.reply and reply["role"] == "assistant"
    stored = window.store.messages(window.current_chat_id)[-1]
    assert reply["token_ids"] == list(stored.token_ids)
    assert reply["metrics"]["prefill_tokens"] == outcome.metrics.prefill_tokens
    assert document["instruction_versions"][-1]["variables"] == {"user": "Ada"}


def test_model_settings_reload_with_a_new_context_size(qtbot, window: MainWindow) -> None:
    send_turn(qtbot, window, "Hello.")
    dialog = window.ask_model_settings()
    assert dialog.n_ctx_spin.value() == window.model.n_ctx
    dialog.n_ctx_spin.setValue(2048)
    dialog.kv_combo.setCurrentIndex(dialog.kv_combo.findData("q8_0"))
    with qtbot.waitSignal(window.model_ready, timeout=TURN_TIMEOUT_MS) as loaded:
        dialog.accept()
    assert (loaded.args[0].n_ctx, loaded.args[0].kv_type) == (2048, "q8_0")
    assert window.settings.value("model/n_ctx") in (2048, "2048")
    assert "/ 2048" in window.context_label.text()
    outcome, _ = send_turn(qtbot, window, "Still there?")
    assert outcome.reply, "the chat goes on with the reloaded model"


def test_dark_theme_reaches_charts_and_rendered_replies(qtbot, window: MainWindow) -> None:
    from app.ui import theme

    send_turn(qtbot, window, "Write `x = 1` as a Python code block.")
    try:
        window.set_theme("dark")
        assert window.settings.value("view/theme") == "dark"
        plot = window.inspector.plot_widgets["tokens"]
        assert plot.backgroundBrush().color().name() == theme.DARK.chart_background
        assert theme.DARK.window in QApplication.instance().styleSheet()
        reply = window.chat_view.bubbles[-1]
        assert all(theme.LIGHT.code_background not in block.html for block in reply.body.blocks)
    finally:
        window.set_theme("light")
    assert plot.backgroundBrush().color().name() == theme.LIGHT.chart_background


def test_edit_makes_a_version_with_arrows_and_fork_makes_a_chat(
    qtbot, window: MainWindow
) -> None:
    first, _ = send_turn(qtbot, window, "Name a big city.")
    send_turn(qtbot, window, "Name a river there.")
    original = window.current_chat_id
    bubble = window.chat_view.bubbles[2]
    assert bubble.role == "user" and bubble.edit_button.isVisible()
    bubble.edit_button.click()
    assert window.composer.edit_bar.isVisible()
    assert window.input.toPlainText() == "Name a river there."
    window.input.setPlainText("Name a mountain there.")
    log = log_of(window)
    seen = len(log.replies)
    window.send()
    qtbot.waitUntil(lambda: len(log.replies) > seen, timeout=TURN_TIMEOUT_MS)
    edited = log.replies[-1]
    branch = window.current_chat_id
    assert branch != original and not window.composer.edit_bar.isVisible()
    shared = sum(len(m.token_ids) for m in window.store.messages(branch)[:2])
    assert edited.metrics.reused_tokens >= shared, "the messages before the edit are reused"
    texts = [b.text for b in window.chat_view.bubbles]
    assert texts[:2] == [m.text for m in window.store.messages(original)[:2]]
    assert texts[2] == "Name a mountain there."
    edited_bubble = window.chat_view.bubbles[2]
    assert edited_bubble.version_label.isVisible()
    assert edited_bubble.version_label.text() == "2/2"
    assert [window.chat_list.list.count()] == [1], "the versions are one chat in the list"

    wait_background(qtbot, window, edited.metrics_id)
    edited_bubble.previous_version.click()
    assert window.current_chat_id == original
    assert window.chat_view.bubbles[2].text == "Name a river there."
    assert window.chat_view.bubbles[2].version_label.text() == "1/2"

    def shown_bubbles() -> set[int]:
        children = window.chat_view.widget().findChildren(MessageBubble)
        return {id(bubble) for bubble in children if bubble.isVisible()}

    current = {id(b) for b in window.chat_view.bubbles}
    assert not shown_bubbles() - current, "no bubble of the other version stays on screen"
    qtbot.waitUntil(lambda: shown_bubbles() == current)  # the new ones show when the loop runs
    settle(qtbot, window)
    assert window.store.latest_in_family(original).id == original

    window.fork_at(1)  # "Fork from here" on the first reply
    qtbot.waitUntil(lambda: window.current_chat_id not in (None, original), timeout=5000)
    fork_id = window.current_chat_id
    assert fork_id is not None and window.store.chat(fork_id).name.endswith("(fork)")
    assert [m.text for m in window.store.messages(fork_id)] == [
        "Name a big city.", first.reply,
    ]
    assert window.chat_list.list.count() == 2


def test_regenerate_keeps_the_old_reply_as_version_one(qtbot, window: MainWindow) -> None:
    first, _ = send_turn(qtbot, window, "Say a number.")
    original = window.current_chat_id
    log = log_of(window)
    seen = len(log.replies)
    window.temperature_spin.setValue(1.0)
    window.regenerate()
    qtbot.waitUntil(lambda: len(log.replies) > seen, timeout=TURN_TIMEOUT_MS)
    again = log.replies[-1]
    assert again.version_of == original and window.current_chat_id == again.chat_id
    reply = window.chat_view.bubbles[-1]
    assert reply.role == "assistant" and reply.text == again.reply
    assert reply.version_label.text() == "2/2"
    # A bubble added by the rebuild shows when the event loop runs next.
    qtbot.waitUntil(reply.version_label.isVisible, timeout=5000)
    assert window.chat_list.list.count() == 1, "the versions are one chat in the list"
    wait_background(qtbot, window, again.metrics_id)
    reply.previous_version.click()
    assert window.current_chat_id == original
    old = window.chat_view.bubbles[-1]
    assert old.text == first.reply and old.version_label.text() == "1/2"
    assert [m.text for m in window.store.messages(original)][-1] == first.reply


def test_export_refuses_the_database_and_keeps_it(qtbot, window: MainWindow) -> None:
    outcome, _ = send_turn(qtbot, window, "Hello.")
    for target in (window.db_path, window.store.kv_path, Path(f"{window.db_path}.lock")):
        assert window.export_chat(target) is None
        assert "KV Chat's own files" in window.last_error
    assert window.db_path.read_bytes().startswith(b"SQLite format 3\x00")
    assert window.store.messages(window.current_chat_id)[-1].text == outcome.reply
