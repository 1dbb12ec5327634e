"""Instruction presets: stored in the chats database (migration 9), used by any chat, the
same block tokens in every chat that uses one with the same values; and the dialog.

Real SQLite files, the real model for the tokens, the real window for the dialog.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from gui_helpers import (
    TURN_TIMEOUT_MS,
    close_window,
    open_new_chat,
    open_window,
    settle,
    temp_settings,
)

from app.core.variables import MissingValue, fill_values
from app.domain import Layout, SegmentKind
from app.session.chat_session import ChatSession
from app.storage import connection, migrations
from app.storage.store import Store
from app.ui.main_window import MainWindow

DAY = datetime.date(2026, 12, 8)
TUTOR = "You are {{name}}, a patient tutor. Today is {{weekday}}, {{date}}. Answer briefly."


def test_a_database_from_before_presets_gains_the_table_and_keeps_its_chats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "old.db"
    with monkeypatch.context() as old:
        old.setattr("app.storage.store.MIGRATIONS", migrations.MIGRATIONS[:8])
        with Store(path) as store:
            store.create_chat("kept")
            assert store.schema_version() == 8
            assert "instruction_presets" not in connection.table_names(store.db)
    with Store(path) as store:
        assert store.schema_version() == migrations.SCHEMA_VERSION >= 9
        assert [chat.name for chat in store.chats()] == ["kept"]
        assert store.presets() == []
        store.save_preset("Tutor", TUTOR, {"name": "Ada"})
    with Store(path) as store:
        assert [preset.name for preset in store.presets()] == ["Tutor"]


def test_presets_are_saved_replaced_by_name_and_deleted(store: Store) -> None:
    first = store.save_preset("  Tutor  ", TUTOR, {"name": "Ada"})
    again = store.save_preset("Tutor", TUTOR + " Use examples.", {"name": "Bo"})
    assert again.id == first.id and again.name == "Tutor"
    assert store.preset(first.id).text.endswith("Use examples.")
    assert store.preset(first.id).variables == {"name": "Bo"}
    odd = store.save_preset("Ω 🐉 שלום", "Lone surrogate \ud800 and NUL \x00 kept", {})
    assert store.preset(odd.id).text == "Lone surrogate \ud800 and NUL \x00 kept"
    store.delete_preset(first.id)
    assert [preset.name for preset in store.presets()] == ["Ω 🐉 שלום"]


@pytest.mark.parametrize(
    ("name", "text", "error"),
    [("", TUTOR, "needs a name"), ("   ", TUTOR, "needs a name"), ("x", "  \n", "needs some"),
     ("n" * 201, TUTOR, "at most 200")],
)  # fmt: skip
def test_a_preset_without_a_name_or_text_is_refused_and_writes_nothing(
    store: Store, name: str, text: str, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        store.save_preset(name, text)
    assert store.presets() == []


def test_values_are_filled_when_a_preset_is_used() -> None:
    values = fill_values(TUTOR, {"name": "Ada"}, None, DAY)
    assert values == {"name": "Ada", "weekday": "Tuesday", "date": "2026-12-08"}
    given = fill_values(TUTOR, {"name": "Ada"}, {"name": "Bo", "date": "tomorrow"}, DAY)
    assert given["name"] == "Bo" and given["date"] == "tomorrow"
    with pytest.raises(MissingValue, match=r"\{\{name\}\}"):
        fill_values(TUTOR, {}, {"name": "   "}, DAY)


@pytest.mark.parametrize("layout", [Layout.SYSTEM_FIRST, Layout.HISTORY_FIRST])
def test_a_preset_is_the_same_block_tokens_in_every_chat_that_uses_it(
    engine: ChatSession, store: Store, layout: Layout
) -> None:
    preset = store.save_preset("Tutor", TUTOR, {"name": "Ada"})
    values = fill_values(preset.text, preset.variables, None, DAY)
    blocks = []
    for name in ("first", "second"):
        chat = store.create_chat(name, layout)
        store.add_instruction_version(chat.id, "an older block of this chat", {})
        version = store.use_preset(chat.id, preset.id, values)
        assert version.text == TUTOR and version.variables == values
        plan = engine.history_plan(chat.id, with_block=True)
        blocks.append([s.tokens for s in plan.segments if s.kind == SegmentKind.BLOCK])
    assert blocks[0] and blocks[0] == blocks[1]
    rendered = engine.builder.rendered_text(list(blocks[0][0]))
    assert "You are Ada, a patient tutor. Today is Tuesday, 2026-12-08." in rendered


@pytest.mark.gui
def test_the_presets_dialog_saves_the_editors_block_and_uses_it_in_another_chat(
    qtbot, db_path: Path, tmp_path: Path
) -> None:
    window: MainWindow = open_window(qtbot, db_path, temp_settings(tmp_path))
    try:
        window.current_chat_id or open_new_chat(qtbot, window)
        window.instructions.editor.setPlainText(TUTOR)
        window.instructions.presets_button.click()
        dialog = window.presets.dialog
        assert dialog is not None and dialog.isVisible()
        dialog.new_button.click()
        assert dialog.text_edit.toPlainText() == TUTOR
        assert set(dialog.value_edits) == {"name", "weekday", "date"}
        dialog.save_button.click()  # no name yet: refused in the dialog, nothing sent
        assert "needs a name" in dialog.problem.text()
        dialog.name_edit.setText("Tutor")
        dialog.save_button.click()
        qtbot.waitUntil(lambda: dialog.preset_list.count() == 1, timeout=TURN_TIMEOUT_MS)
        assert dialog.selected() is not None
        dialog.use_button.click()  # {{name}} has no value: said in one line
        assert dialog.problem.text() == "The preset needs a value for {{name}}."

        other = open_new_chat(qtbot, window)
        dialog = window.presets.show_dialog()
        dialog.preset_list.setCurrentRow(0)
        dialog.value_edits["name"].setText("Ada")
        dialog.use_button.click()
        settle(qtbot, window)
        current = window.store.current_instructions(other)
        assert current is not None and current.text == TUTOR
        assert current.variables["name"] == "Ada"
        assert current.variables["date"] == datetime.date.today().isoformat()
        assert window.instructions.text() == TUTOR and not dialog.isVisible()
    finally:
        close_window(window)
