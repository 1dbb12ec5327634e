"""New chats numbered without gaps, and exports that land where the user looks for them.

Real SQLite files; the window tests run the real window (and model) with the worker
writing; only the file dialog is answered by the test (it would wait for a person).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gui_helpers import TURN_TIMEOUT_MS, close_window, open_new_chat, open_window, temp_settings
from PySide6.QtWidgets import QFileDialog

from app.cli import main as cli_main
from app.domain import Role
from app.storage.export import export_chat, export_file_name
from app.storage.store import Store
from app.ui.chat_export import documents_folder
from app.ui.chat_list import next_chat_name
from app.ui.main_window import MainWindow


def test_next_chat_name_fills_the_lowest_free_number() -> None:
    assert next_chat_name([]) == "Chat 1"
    assert next_chat_name(["Chat 1", "Chat 3"]) == "Chat 2"
    assert next_chat_name(["Chat 2", "Chat 3"]) == "Chat 1"
    # Names that only look numbered (renamed, forked, huge) leave the numbers alone.
    odd = ["Chat 1 (fork)", "Chat 99999999999999999999", "chat 1", "Chat 1", "Chat ١"]
    assert next_chat_name(odd) == "Chat 2"


@pytest.mark.gui
def test_a_deleted_chats_number_is_given_to_the_next_new_chat(
    qtbot, db_path: Path, tmp_path: Path
) -> None:
    window = open_window(qtbot, db_path, temp_settings(tmp_path))
    try:
        ids = [window.current_chat_id or open_new_chat(qtbot, window)]
        while len(ids) < 3:
            ids.append(open_new_chat(qtbot, window))
        names = [window.store.chat(chat_id).name for chat_id in ids]
        assert names == ["Chat 1", "Chat 2", "Chat 3"]
        with qtbot.waitSignal(window.chat_removed, timeout=TURN_TIMEOUT_MS):
            window.delete_chat(ids[1])
        assert window.store.chat(open_new_chat(qtbot, window)).name == "Chat 2"
        assert window.store.chat(open_new_chat(qtbot, window)).name == "Chat 4"
    finally:
        close_window(window)


def _family(store: Store) -> tuple[int, int]:
    """A chat and a second version of its reply (a branch), as Regenerate leaves them."""
    chat = store.create_chat("Trip (Rome) 🇮🇹")
    store.add_message(chat.id, Role.USER, "Plan a day in Rome.")
    first = store.add_message(chat.id, Role.ASSISTANT, "Morning: the Colosseum.")
    branch, _ = store.add_reply_version(chat.id, first.seq, "Morning: the Vatican.")
    return chat.id, branch.id


def test_export_file_names_read_like_the_title_and_are_always_valid() -> None:
    assert export_file_name("Trip (Rome) 🇮🇹", ".md") == "Trip (Rome) 🇮🇹.md"
    assert export_file_name('a/b\\c:d*e?f"g<h>i|j', ".md") == "a_b_c_d_e_f_g_h_i_j.md"
    assert export_file_name("...", ".json") == "chat.json"  # never hidden, never empty
    assert export_file_name("x\x00y\n", ".md") == "x_y_.md"
    assert len(export_file_name("long " * 500, ".md")) <= 123


def test_json_export_with_every_version_keeps_both_replies(store: Store, tmp_path: Path) -> None:
    chat_id, branch_id = _family(store)
    target = export_chat(store, branch_id, tmp_path / "all.json", all_versions=True)
    document = json.loads(target.read_text(encoding="utf-8"))
    versions = document["versions"]
    replies = [version["messages"][-1]["text"] for version in versions]
    assert replies == ["Morning: the Colosseum.", "Morning: the Vatican."]
    assert versions[1]["branch_of"] == "Trip (Rome) 🇮🇹" and versions[1]["branch_seq"] == 1
    assert [v["used_last"] for v in versions] == [False, True]
    plain = export_chat(store, chat_id, tmp_path / "one.json")
    assert "versions" not in json.loads(plain.read_text(encoding="utf-8"))


@pytest.mark.gui
def test_the_export_dialog_proposes_the_visible_title_in_the_documents_folder(
    qtbot, db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store(db_path) as store:
        _chat_id, branch_id = _family(store)
    window: MainWindow = open_window(qtbot, db_path, temp_settings(tmp_path))
    proposed: list[str] = []

    def answer(_parent: object, _title: str, path: str, _filter: str) -> tuple[str, str]:
        proposed.append(path)
        return str(tmp_path / ("out" + Path(path).suffix)), ""

    monkeypatch.setattr(QFileDialog, "getSaveFileName", answer)
    try:
        window.select_chat(branch_id)
        window.menus.export_tree_action.trigger()
        window.menus.export_markdown_action.trigger()
    finally:
        close_window(window)
    assert [Path(p).name for p in proposed] == ["Trip (Rome) 🇮🇹.json", "Trip (Rome) 🇮🇹.md"]
    assert {Path(p).parent for p in proposed} == {documents_folder()}
    exported = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert len(exported["versions"]) == 2
    assert "Morning: the Vatican." in (tmp_path / "out.md").read_text(encoding="utf-8")


def test_cli_export_defaults_to_the_title_in_the_documents_folder(
    db_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with Store(db_path) as store:
        _family(store)
    documents = tmp_path / "Documents"
    documents.mkdir()
    monkeypatch.setenv("XDG_DOCUMENTS_DIR", str(documents))
    assert cli_main(["export", "--db", str(db_path), "--chat", "Trip (Rome) 🇮🇹"]) == 0
    assert capsys.readouterr().out.strip() == str(documents / "Trip (Rome) 🇮🇹.md")
    argv = ["export", "--db", str(db_path), "--chat", "Trip (Rome) 🇮🇹", "--all-versions"]
    assert cli_main(argv) == 0
    document = json.loads((documents / "Trip (Rome) 🇮🇹.json").read_text(encoding="utf-8"))
    assert len(document["versions"]) == 2
    assert cli_main([*argv, "--out", str(tmp_path / "x.md")]) != 0
    assert "--all-versions writes JSON" in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists()
