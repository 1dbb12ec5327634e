"""SQLite store: schema versions, migrations, corruption, locking, exact text, write failures."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from app.domain import TemplateChoice, TemplateKind
from app.storage import migrations
from app.storage.kv_store import StateRecord, StoredPage
from app.storage.store import (
    DatabaseCorrupt,
    DatabaseInUse,
    SchemaTooNew,
    StorageError,
    StorageWriteError,
    Store,
    set_aside,
)


def _save_state(store: Store, chat_id: int, payload: bytes) -> int:
    """A one-page state in the KV store; returns the bytes written."""
    digest = payload[:16].ljust(16, b"\0")
    record = StateRecord(chat_id, 2, {"model": "m"}, 0, [None], [1, 2, 3], [digest])
    return store.kv.save_state(record, [StoredPage(digest, 0, 0, 3, payload)])


def _state_payload(store: Store, chat_id: int) -> bytes | None:
    record = store.kv.state(chat_id)
    pages = store.kv.read_pages(record.page_hashes, record.formats) if record else []
    return pages[0].payload if pages else None


def test_fresh_database_is_versioned_wal_with_foreign_keys(store: Store) -> None:
    assert store.schema_version() == migrations.SCHEMA_VERSION
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_failed_migration_leaves_the_previous_version(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "m.db"
    Store(path).close()

    def broken(db) -> None:
        db.execute("CREATE TABLE half_done (x INTEGER)")
        raise RuntimeError("migration failed midway")

    monkeypatch.setattr("app.storage.store.MIGRATIONS", [*migrations.MIGRATIONS, broken])
    with pytest.raises(RuntimeError, match="midway"):
        Store(path)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == migrations.SCHEMA_VERSION
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "half_done" not in tables
    conn.close()


def test_newer_schema_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(SchemaTooNew, match="newer KV Chat"):
        Store(path)


@pytest.mark.parametrize("damage", ["random", "truncated", "empty-header"])
def test_corrupt_file_is_refused_and_can_be_set_aside(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "bad.db"
    with Store(path) as store:
        chat = store.create_chat("keep me")
        for index in range(300):
            store.add_message(chat.id, "user", f"message {index} " + "x" * 200)
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    if damage == "random":
        path.write_bytes(os.urandom(50_000))
    elif damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"SQLite format 3\x00" + b"\x00" * 10)
    original = path.read_bytes()
    with pytest.raises(DatabaseCorrupt) as raised:
        Store(path)
    assert str(path) in str(raised.value)
    moved = set_aside(path)
    assert moved.read_bytes() == original  # the old file is kept, byte for byte
    assert not path.exists()
    with Store(path) as fresh:
        assert fresh.chats() == []


def test_second_process_on_the_same_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from app.storage.store import Store
                store = Store({str(path)!r}, exclusive=True)
                print("ready", flush=True)
                sys.stdin.readline()
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(DatabaseInUse, match="already open"):
            Store(path, exclusive=True)
    finally:
        holder.communicate("\n", timeout=30)
    with Store(path, exclusive=True) as store:  # free again once the holder exits
        assert store.chats() == []


def test_deleting_a_chat_removes_its_messages_state_and_metrics(store: Store) -> None:
    chat = store.create_chat("gone")
    store.add_message(chat.id, "user", "hi")
    store.add_metrics(chat.id, None, {"x": 1})
    _save_state(store, chat.id, b"abc")
    store.delete_chat(chat.id)
    for table in ("messages", "turn_metrics", "instruction_versions"):
        assert store.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0
    for table in ("states", "state_pages", "pages"):
        assert store.kv.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0


@pytest.mark.parametrize(
    "text",
    [
        "emoji 👩‍👩‍👧 and flags 🇫🇷",
        "עברית RTL \u202e reversed",
        "zero\u200bwidth\ufeff",
        "nul \x00 inside",
        "lone \ud800 surrogate",
        "",
    ],
)
def test_message_text_is_stored_exactly(store: Store, text: str) -> None:
    chat = store.create_chat("exact")
    message = store.add_message(chat.id, "user", text)
    assert store.message(message.id).text == text
    version = store.add_instruction_version(chat.id, text)
    assert store.current_instructions(chat.id).text == text
    assert version.version == 1


def test_bad_chat_names_are_refused(store: Store) -> None:
    for name in ("", "   ", "bad\x00name", "half \udc80"):
        with pytest.raises(ValueError):
            store.create_chat(name)
    store.create_chat("dup")
    with pytest.raises(ValueError, match="already exists"):
        store.create_chat("dup")


def test_disk_full_keeps_the_previous_state_and_messages(store: Store) -> None:
    chat = store.create_chat("full")
    store.add_message(chat.id, "user", "before")
    _save_state(store, chat.id, b"old state")
    for conn in (store.db, store.kv.conn):  # SQLite's real SQLITE_FULL path
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 2}")
    with pytest.raises(StorageWriteError, match="disk is full"):
        _save_state(store, chat.id, os.urandom(2_000_000))
    with pytest.raises(StorageWriteError, match="disk is full"):
        store.add_message(chat.id, "user", "y" * 2_000_000)
    assert _state_payload(store, chat.id) == b"old state"
    assert [m.text for m in store.messages(chat.id)] == ["before"]
    assert store.db.execute("PRAGMA quick_check").fetchone()[0] == "ok"


def test_read_only_database_gives_a_clear_message(store: Store) -> None:
    chat = store.create_chat("ro")
    store.db.execute("PRAGMA query_only = ON")
    with pytest.raises(StorageWriteError, match="read-only"):
        store.add_message(chat.id, "user", "hello")
    store.db.execute("PRAGMA query_only = OFF")
    assert store.messages(chat.id) == []


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StorageWriteError, match="cannot open"):
        Store(tmp_path / "no" / "such" / "dir" / "x.db")


def test_old_databases_upgrade_to_branches(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "v4.db"
    monkeypatch.setattr("app.storage.store.MIGRATIONS", migrations.MIGRATIONS[:4])
    with Store(path) as old:
        chat = old.create_chat("before branches")
        old.add_message(chat.id, "user", "hello")
    monkeypatch.undo()
    with Store(path) as store:
        assert store.schema_version() == migrations.SCHEMA_VERSION
        upgraded = store.chat(chat.id)
        assert (upgraded.root_chat_id, upgraded.branch_seq, upgraded.family_id) == (
            None, None, chat.id,
        )
        assert [c.name for c in store.chats()] == ["before branches"]
        branch = store.branch_chat(chat.id, 0)  # the first message can be edited too
        assert store.messages(branch.id) == []


def test_branches_share_the_prefix_and_list_as_one_chat(store: Store) -> None:
    chat = store.create_chat("trip")
    store.add_instruction_version(chat.id, "Be brief.", {"city": "Oslo"})
    for index, (role, text) in enumerate(
        [("user", "Where to?"), ("assistant", "Oslo."), ("user", "When?"), ("assistant", "May.")]
    ):
        store.add_message(chat.id, role, text, token_ids=[index, index + 1])
    branch = store.branch_chat(chat.id, 2)
    assert (branch.root_chat_id, branch.branch_seq) == (chat.id, 2)
    assert [(m.seq, m.text, m.token_ids) for m in store.messages(branch.id)] == [
        (0, "Where to?", [0, 1]), (1, "Oslo.", [1, 2]),
    ]
    assert store.current_instructions(branch.id).variables == {"city": "Oslo"}
    assert store.branches(chat.id) == {}, "no second version of a message yet"
    store.add_message(branch.id, "user", "How long?")
    assert store.branches(chat.id) == {2: [chat.id, branch.id]}
    assert store.branches(branch.id) == {2: [chat.id, branch.id]}
    nested = store.branch_chat(branch.id, 2)  # a third version of the same message
    store.add_message(nested.id, "user", "How much?")
    assert store.branches(chat.id)[2] == [chat.id, branch.id, nested.id]
    assert nested.root_chat_id == chat.id

    assert [c.id for c in store.chats()] == [chat.id], "one entry per family"
    assert [c.id for c in store.chats("How long")] == [chat.id], "search finds branch text"
    store.touch_chat(branch.id)
    assert store.latest_in_family(chat.id).id == branch.id
    with pytest.raises(ValueError, match="no user message"):
        store.branch_chat(chat.id, 1)

    _save_state(store, branch.id, b"branch state")
    store.delete_chat(chat.id)
    assert store.chats() == [] and store.kv.state(branch.id) is None


def test_old_databases_upgrade_to_templates_chosen_per_model(
    tmp_path: Path, monkeypatch
) -> None:
    path = tmp_path / "v5.db"
    monkeypatch.setattr("app.storage.store.MIGRATIONS", migrations.MIGRATIONS[:5])
    with Store(path) as old:
        chat = old.create_chat("before templates")
        old.add_message(chat.id, "user", "hello")
        assert old.schema_version() == 5
    monkeypatch.undo()
    assert migrations.SCHEMA_VERSION >= 6  # templates came with version 6
    choice = TemplateChoice(TemplateKind.BUILTIN, "gemma", "gemma")
    with Store(path) as store:
        assert store.schema_version() == migrations.SCHEMA_VERSION
        assert [m.text for m in store.messages(chat.id)] == ["hello"]
        assert store.model_template("123:abc") is None
        store.set_model_template("123:abc", choice)
        jinja = TemplateChoice(TemplateKind.JINJA, "{{ messages }}", "mine.jinja")
        store.set_model_template("456:def", jinja)
    with Store(path) as reopened:
        assert reopened.model_template("123:abc") == choice
        assert reopened.model_template("456:def") == jinja
        reopened.set_model_template("123:abc", None)
        assert reopened.model_template("123:abc") is None
        with pytest.raises(StorageError):
            reopened.set_model_template("7:x", TemplateChoice(TemplateKind.GGUF, "", "x"))
