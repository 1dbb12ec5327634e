"""Both SQLite files upgrade through one migration runner, and files written before it
open with all their data.

The fixtures were written by the code of commit 9e267fc (schema 8 chats database, page
store version 3), before the two files shared a runner: ``Store("chats.db")`` with a
system-first chat "kept from before" (instructions, a question and a reply with token
ids, a regenerated reply in a branch), a template and eval rates for "model-x", one
metrics row, and in ``chats.kv.db`` a three-page saved state of that chat and a budget of
123,456,789 bytes.
"""

from __future__ import annotations

import gzip
import sqlite3
from pathlib import Path

import pytest

from app.domain import TemplateChoice, TemplateKind
from app.storage import connection, kv_store, migrations
from app.storage.errors import SchemaTooNew
from app.storage.kv_store import KVStore
from app.storage.sqlite_file import PAGE_SIZE
from app.storage.store import Store

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def old_files(tmp_path: Path) -> Path:
    """The chats database and its KV file as the earlier code left them."""
    for name in ("chats-schema8.db", "chats-schema8.kv.db"):
        data = gzip.decompress((FIXTURES / f"{name}.gz").read_bytes())
        (tmp_path / name.replace("-schema8", "")).write_bytes(data)
    return tmp_path / "chats.db"


def _signing_key(path: Path) -> bytes:
    conn = sqlite3.connect(path)
    try:
        return bytes(conn.execute("SELECT key FROM kv_signing_key").fetchone()[0])
    finally:
        conn.close()


def test_a_chats_database_written_before_the_shared_runner_keeps_its_data(
    old_files: Path,
) -> None:
    key = _signing_key(old_files)
    with Store(old_files) as store:
        assert store.schema_version() == migrations.SCHEMA_VERSION
        (chat,) = store.chats()
        assert (chat.name, chat.layout) == ("kept from before", "system-first")
        block = store.current_instructions(chat.id)
        assert block is not None and (block.text, block.variables) == (
            "Answer briefly.",
            {"who": "you"},
        )
        messages = [(m.role, m.text, m.token_ids) for m in store.messages(chat.id)]
        assert messages == [("user", "Hello?", [1, 2, 3]), ("assistant", "Hi.", [4, 5])]
        assert list(store.branches(chat.id)) == [1]  # the regenerated reply is a version
        assert store.model_template("model-x") == TemplateChoice(
            TemplateKind.BUILTIN, "chatml", "ChatML"
        )
        assert store.eval_rates("model-x")["history-first"].followed == 9
        assert [row.data for row in store.metrics(chat.id)] == [{"prefill_tokens": 12}]
        assert store.kv_key() == key  # the KV file's pages stay signed by the same secret
        assert store.db.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE


def test_its_kv_file_keeps_the_saved_state_and_the_budget(old_files: Path) -> None:
    with Store(old_files) as store:
        chat_id = store.chats()[0].id
        kv = store.kv
        assert store.kv_notice is None  # opened, not set aside
        assert kv.conn.execute("PRAGMA user_version").fetchone()[0] == kv_store.KV_SCHEMA_VERSION
        assert kv.budget_bytes == 123_456_789
        record = kv.state(chat_id)
        assert record is not None and record.forged is None and record.unreadable is None
        assert record.token_ids == list(range(12))
        pages = kv.read_pages(record.page_hashes, record.formats)
        assert [page.payload for page in pages] == [bytes([n]) * 3000 for n in range(3)]
        assert kv.last_gap is None


def test_the_old_files_read_only_write_nothing(old_files: Path) -> None:
    before = {p.name: p.read_bytes() for p in old_files.parent.iterdir()}
    with Store(old_files, read_only=True) as store:
        assert [m.text for m in store.messages(store.chats()[0].id)] == ["Hello?", "Hi."]
        assert store.kv.total_bytes() == 9000
    assert {p.name: p.read_bytes() for p in old_files.parent.iterdir()} == before


def test_the_kv_file_upgrades_from_each_version_through_the_shared_runner(
    tmp_path: Path,
) -> None:
    for version in range(len(kv_store.KV_MIGRATIONS) + 1):
        path = tmp_path / f"v{version}.kv.db"
        conn = sqlite3.connect(path, isolation_level=None)
        connection.migrate(conn, path, kv_store.KV_MIGRATIONS[:version])
        conn.close()
        store = KVStore(path, key=b"k" * 32)
        try:
            assert store.conn.execute("PRAGMA user_version").fetchone()[0] == (
                kv_store.KV_SCHEMA_VERSION
            )
            assert store.conn.execute("PRAGMA application_id").fetchone()[0] == (
                kv_store.KV_APPLICATION_ID
            )
            assert store.conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        finally:
            store.close()


def test_a_failed_kv_migration_leaves_the_previous_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "chats.kv.db"
    KVStore(path, key=b"k" * 32).close()

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_done (x INTEGER)")
        raise RuntimeError("migration failed midway")

    monkeypatch.setattr(kv_store, "KV_MIGRATIONS", (*kv_store.KV_MIGRATIONS, broken))
    with pytest.raises(RuntimeError, match="midway"):
        KVStore(path, key=b"k" * 32)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == kv_store.KV_SCHEMA_VERSION
        assert "half_done" not in {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        conn.close()


def test_a_newer_kv_file_is_refused_as_too_new_and_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "chats.kv.db"
    KVStore(path, key=b"k" * 32).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(SchemaTooNew, match="newer KV Chat"):
        KVStore(path, key=b"k" * 32)
    assert path.read_bytes() == before


def test_a_failed_migration_releases_the_database_for_the_next_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "chats.db"
    Store(path).close()

    def broken(conn: sqlite3.Connection) -> None:
        raise RuntimeError("migration failed midway")

    monkeypatch.setattr("app.storage.store.MIGRATIONS", [*migrations.MIGRATIONS, broken])
    with pytest.raises(RuntimeError, match="midway"):
        Store(path, exclusive=True)
    monkeypatch.undo()
    with Store(path, exclusive=True) as store:  # the process lock was released
        assert store.schema_version() == migrations.SCHEMA_VERSION
