"""A hostile user at the command line: bad numbers, foreign files, copied states, full disks.

Real model, real SQLite files, real subprocesses where a kill or an abort is involved.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import GREEDY, TEST_CTX, set_state_field

from app import limits
from app.core.models import model_file_identity
from app.core.state_pages import PAGE_TOKENS
from app.domain import MessageStatus, Role, SegmentKind
from app.session.chat_session import ChatSession, GenerationOptions
from app.storage import migrations
from app.storage.kv_store import JOURNAL_LIMIT_BYTES, StateRecord
from app.storage.store import (
    APPLICATION_ID,
    JOURNAL_SIZE_LIMIT,
    NotOurDatabase,
    StorageWriteError,
    Store,
)

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("crash_worker.py")


def run_app(*args: str | bytes, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def _chat_with_state(store: Store, make_engine: Callable, name: str, *questions: str) -> int:
    chat = store.create_chat(name)
    engine = make_engine(store)
    for question in questions:
        engine.send(chat.id, question, GREEDY)
        engine.after_reply(chat.id)
    engine.close()
    return chat.id


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _dump(path: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)  # creates no files
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


# -- 1. context sizes ----------------------------------------------------------------------


def test_too_small_contexts_are_refused_before_anything_is_written(
    tmp_path: Path, make_engine: Callable
) -> None:
    db = tmp_path / "ctx.db"
    with Store(db) as store:
        chat_id = _chat_with_state(store, make_engine, "keep", "Name a planet.")
    kv = db.with_name("ctx.kv.db")
    before, dump = _files(tmp_path), (_dump(db), _dump(kv))
    tiny = run_app("chat", "--db", str(db), "--chat", "keep", "--n-ctx", "10", "hello")
    assert tiny.returncode == 2 and "context size 10" in one_line(tiny)
    small = run_app("chat", "--db", str(db), "--chat", "keep", "--n-ctx", "64", "hello")
    assert small.returncode == 1, small.stderr
    assert "context of 64 tokens" in one_line(small) and small.stdout == ""
    assert _files(tmp_path).keys() - {"ctx.db.lock"} == before.keys()  # no -wal/-shm left
    assert (_dump(db), _dump(kv)) == dump  # every row, the saved state's pages included
    with Store(db) as store:
        assert [m.role for m in store.messages(chat_id)] == [Role.USER, Role.ASSISTANT]
        assert make_engine(store).activate(chat_id).restored  # the saved state is still there


def test_a_context_smaller_than_the_batch_never_aborts(tmp_path: Path) -> None:
    """llama.cpp lowers n_batch to a small n_ctx and aborts on a larger decode call."""
    message = "Summarise: " + "the quiet river runs past the mill. " * 26  # 243-token prompt
    done = run_app(
        "chat", "--db", str(tmp_path / "b.db"), "--chat", "b", "--n-ctx", "240",
        "--max-tokens", "4", "--temperature", "0", "--json", message,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-500:]
    assert json.loads(done.stdout)["metrics"]["prefill_tokens"] > 240  # more than n_batch


# -- 3. unreadable token ids -----------------------------------------------------------------


def test_unreadable_token_ids_are_discarded_and_recomputed(
    store: Store, make_engine: Callable
) -> None:
    chat_id = _chat_with_state(store, make_engine, "odd", "Name a colour.")
    first_user = store.messages(chat_id)[0]
    set_state_field(store, chat_id, "token_ids", b"\x01\x02\x03\x04\x05")
    store.db.execute(
        "UPDATE messages SET token_ids = x'01020304050607' WHERE id = ?", (first_user.id,)
    )
    engine = make_engine(store)
    for _ in range(2):  # the chat is never blocked, on this turn or the next
        result = engine.send(chat_id, "And another?", GREEDY)
        assert result.reply_message_id is not None
        engine.after_reply(chat_id)
    notes = store.metrics(chat_id)[1].data["notes"]
    assert any("not a multiple of 4" in note for note in notes)
    assert any("re-tokenized from its text" in note for note in notes)
    assert store.messages(chat_id)[0].token_ids == list(
        engine.builder.user_segment("Name a colour.")
    )
    assert make_engine(store).activate(chat_id).restored  # a fresh, readable state was saved


# -- 4. other applications' files; read-only commands ----------------------------------------


def _foreign_database(path: Path, *, wal: bool = False) -> None:
    conn = sqlite3.connect(path)
    if wal:
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    conn.execute("INSERT INTO invoices (total) VALUES (12.5)")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("wal", [False, True])
def test_another_applications_database_is_never_written(tmp_path: Path, wal: bool) -> None:
    other = tmp_path / "other.db"
    _foreign_database(other, wal=wal)
    before = _files(tmp_path)
    with pytest.raises(NotOurDatabase, match="not a KV Chat database"):
        Store(other, exclusive=True)
    for command in ("chat", "history"):
        done = run_app(command, "--db", str(other), "--chat", "c", *(["hi"] * (command == "chat")))
        assert done.returncode == 1 and "not a KV Chat database" in one_line(done)
    assert _files(tmp_path) == before  # same files, same bytes, same times


def test_history_writes_nothing(tmp_path: Path, make_engine: Callable) -> None:
    db = tmp_path / "ro.db"
    with Store(db) as store:
        _chat_with_state(store, make_engine, "read", "Hello there.")
    conn = sqlite3.connect(db)  # a file left in WAL mode (by an older version, or a kill)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    before = _files(tmp_path)
    done = run_app("history", "--db", str(db), "--chat", "read", "--json")
    assert done.returncode == 0, done.stderr
    assert [m["role"] for m in json.loads(done.stdout)["messages"]] == ["user", "assistant"]
    assert _files(tmp_path) == before  # no -wal/-shm/.lock, bytes and mtime unchanged
    with Store(db, read_only=True) as store, pytest.raises(StorageWriteError, match="read-only"):
        store.create_chat("nope")


def test_an_old_database_of_ours_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for version, migrate in enumerate(migrations.MIGRATIONS[:2], start=1):
        import sqlite_utils

        migrate(sqlite_utils.Database(conn))
        conn.execute(f"PRAGMA user_version = {version}")
    conn.execute("INSERT INTO chats (name, created_at, updated_at) VALUES ('old', 0, 0)")
    conn.close()
    with Store(path) as store:
        pragma = {
            name: store.db.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("application_id", "auto_vacuum", "user_version")
        }
        assert pragma == {
            "application_id": APPLICATION_ID,
            "auto_vacuum": migrations.AUTO_VACUUM_INCREMENTAL,
            "user_version": migrations.SCHEMA_VERSION,
        }
        assert store.chat_by_name("old") is not None


# -- 5. a full disk ---------------------------------------------------------------------------


def _fill_to_the_brim(store: Store) -> None:
    """No page may be added and every page is packed: the next real insert fails."""
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count = {pages}")
    filler = store.chat_by_name("filler") or store.create_chat("filler")
    for size in (60_000, 6_000, 600, 60, 6, 1):
        while True:
            try:
                store.add_message(filler.id, "user", "f" * size)
            except StorageWriteError:
                break


def test_a_reply_that_cannot_be_stored_leaves_the_message_unanswered_and_retry_answers_it(
    tmp_path: Path, make_engine: Callable
) -> None:
    db = tmp_path / "full.db"
    question = "What is the capital of Italy?"
    with Store(db) as store:
        chat = store.create_chat("full")
        engine = make_engine(store)
        filled: list[bool] = []

        def fill_once(piece: str) -> None:
            if not filled:
                _fill_to_the_brim(store)
                filled.append(True)

        with pytest.raises(StorageWriteError, match="the disk is full"):
            engine.send(chat.id, question, GREEDY, on_token=fill_once)
        messages = store.messages(chat.id)
        assert [(m.text, m.status) for m in messages] == [(question, MessageStatus.UNANSWERED)]
        engine.close()
        store.delete_chat(store.chat_by_name("filler").id)
    done = run_app(
        "chat", "--db", str(db), "--chat", "full", "--temperature", "0", "--max-tokens", "8",
        question,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with Store(db) as store:
        messages = store.messages(store.chat_by_name("full").id)
    assert [(m.role, m.status) for m in messages] == [
        (Role.USER, MessageStatus.COMPLETE),
        (Role.ASSISTANT, MessageStatus.COMPLETE),
    ]
    assert messages[1].text == done.stdout.strip()


def test_a_state_that_cannot_be_saved_still_reports_the_stored_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from app import cli

    db = tmp_path / "nostate.db"
    opened = cli._open_store

    def capped(path: str) -> Store:
        store = opened(path)
        pages = store.kv.conn.execute("PRAGMA page_count").fetchone()[0]
        store.kv.conn.execute(f"PRAGMA max_page_count = {pages + 2}")  # no room for a state
        return store

    monkeypatch.setattr(cli, "_open_store", capped)
    code = cli.main(
        ["chat", "--db", str(db), "--chat", "s", "--temperature", "0", "--max-tokens", "6",
         "--n-ctx", str(TEST_CTX), "--json", "Name a fruit."]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    reply = json.loads(out)["reply"]
    assert "the disk is full" in err and "reply was saved" in err
    with Store(db) as store:
        chat_id = store.chat_by_name("s").id
        messages = store.messages(chat_id)
        assert [m.role for m in messages] == [Role.USER, Role.ASSISTANT]
        assert messages[1].text == reply
        assert store.kv.state(chat_id) is None


# -- 6. a kill after the user's message was stored ------------------------------------------------


@pytest.mark.slow
def test_a_message_left_unanswered_by_a_kill_is_shown_so_and_kept_out_of_the_prompt(
    tmp_path: Path, make_engine: Callable
) -> None:
    db = tmp_path / "kill.db"
    worker = subprocess.Popen(
        [sys.executable, str(WORKER), str(db), "generate"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    for line in worker.stdout:
        if line.startswith("TOKEN"):
            worker.send_signal(signal.SIGKILL)
            break
    worker.wait(timeout=60)
    worker.stdout.close()
    assert worker.returncode == -signal.SIGKILL
    store = Store(db, exclusive=True)
    try:
        chat_id = store.chat_by_name("crash").id
        [lost] = store.messages(chat_id)
        assert lost.status == MessageStatus.UNANSWERED
        engine = make_engine(store)
        plan = engine.prompt_plan(chat_id, "Something else, then.")
        roles = [
            s.role for s in plan.segments if s.kind in (SegmentKind.MESSAGE, SegmentKind.PENDING)
        ]
        assert roles == [Role.USER]  # only the new message: never two user turns in a row
        engine.regenerate(chat_id, GenerationOptions(max_tokens=4, temperature=0.0))  # Retry
        assert [(m.role, m.status) for m in store.messages(chat_id)] == [
            (Role.USER, MessageStatus.COMPLETE),
            (Role.ASSISTANT, MessageStatus.COMPLETE),
        ]
    finally:
        store.close()


# -- 7. numbers and 8. names ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--temperature", "nan", "temperature nan is out of range"),
        ("--temperature", "inf", "temperature inf is out of range"),
        ("--temperature", "-1", "temperature -1.0 is out of range"),
        ("--seed", "4294967301", "seed 4294967301 is out of range"),
        ("--seed", "4294967295", "or -1 for a random seed"),
        ("--seed", "-2", "seed -2 is out of range"),
        ("--max-tokens", "0", "max tokens 0 is out of range"),
        ("--max-tokens", "99999999", "max tokens 99999999 is out of range"),
        ("--trim-tokens", "0", "trim tokens 0 is out of range"),
        ("--n-ctx", "99999999", "context size 99999999 is out of range"),
    ],
)
def test_bad_numbers_are_one_line_each(
    tmp_path: Path, option: str, value: str, expected: str
) -> None:
    done = run_app("chat", "--db", str(tmp_path / "n.db"), "--chat", "c", f"{option}={value}", "hi")
    assert done.returncode == 2 and expected in one_line(done)
    assert not (tmp_path / "n.db").exists()


def test_generation_options_refuse_what_the_sampler_would_misread() -> None:
    for bad in ({"temperature": float("nan")}, {"temperature": -1.0}, {"seed": 2**32 + 5}):
        with pytest.raises(ValueError, match="out of range"):
            GenerationOptions(**bad)
    assert limits.llama_seed(-1) == 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: random
    assert limits.llama_seed(5) == 5


def test_llama_default_seed_is_the_random_one() -> None:
    import llama_cpp

    assert limits.LLAMA_RANDOM_SEED == llama_cpp.LLAMA_DEFAULT_SEED


def test_a_random_seed_gives_varying_replies(engine: ChatSession, store: Store) -> None:
    chat = store.create_chat("random")
    options = GenerationOptions(max_tokens=12, temperature=1.5, seed=limits.RANDOM_SEED)
    replies = {
        engine.regenerate(chat.id, options).reply
        if i
        else engine.send(chat.id, "Say any word.", options).reply
        for i in range(4)
    }
    assert len(replies) > 1


def test_a_chat_name_that_is_not_utf8_is_named_as_the_problem(tmp_path: Path) -> None:
    for command in (["chat"], ["history"]):
        done = subprocess.run(
            [sys.executable, "-m", "app", *command, "--db", str(tmp_path / "u.db"),
             "--chat", b"caf\xe9\xff", *(["hi"] if command == ["chat"] else [])],
            capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 1
        assert "the chat name is not valid UTF-8 text" in one_line(done)


# -- 9. growth ----------------------------------------------------------------------------------


def test_deleting_a_chat_with_a_large_state_shrinks_the_files_and_bounds_the_wal(
    tmp_path: Path,
) -> None:
    path = tmp_path / "grow.db"
    payload = os.urandom(30_000_000)
    with Store(path) as store:
        keep = store.create_chat("keep")
        store.add_message(keep.id, "user", "still here")
        big = store.create_chat("big")
        for index in range(60):  # 6 MB of messages in the chats database
            store.add_message(big.id, "user", f"{index} " + "x" * 100_000)
        record = StateRecord(big.id, 2, {"model": "m"}, 0, [], [1, 2, 3], whole=True)
        store.kv.save_state(record, whole=payload)  # a 30 MB state in the page store
        kv_path, wal, kv_wal = store.kv_path, Path(f"{path}-wal"), Path(f"{store.kv_path}-wal")
        assert path.stat().st_size + wal.stat().st_size > 6_000_000
        assert wal.stat().st_size < 2 * JOURNAL_SIZE_LIMIT  # checkpointed as it grows
        assert kv_path.stat().st_size > len(payload)
        assert kv_wal.stat().st_size <= JOURNAL_LIMIT_BYTES  # checkpointed after the write
        store.delete_chat(big.id)
        assert path.stat().st_size < 1_000_000 and kv_path.stat().st_size < 1_000_000
        assert wal.stat().st_size <= JOURNAL_SIZE_LIMIT
        assert kv_wal.stat().st_size <= JOURNAL_LIMIT_BYTES
        assert store.db.execute("PRAGMA freelist_count").fetchone()[0] == 0
        assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert [m.text for m in store.messages(keep.id)] == ["still here"]


# -- 10. saved state: integrity that an editor of the KV file cannot fake ----------------------

LONG_QUESTION = "Tell me about the old lighthouse keeper, the storm and the ships. " * 12
NEXT_QUESTION = "Name a river."


def _page_row(kv: sqlite3.Connection, address: bytes) -> tuple:
    query = "SELECT payload, digest, cache, first_position, count, bytes FROM pages WHERE hash = ?"
    return kv.execute(query, (address,)).fetchone()


def _state_pages(kv: sqlite3.Connection, chat_id: int) -> list[bytes]:
    query = "SELECT hash FROM state_pages WHERE chat_id = ? ORDER BY idx"
    return [row[0] for row in kv.execute(query, (chat_id,))]


def _set_page(kv: sqlite3.Connection, address: bytes, payload: bytes, digest: bytes) -> None:
    kv.execute(
        "UPDATE pages SET payload = ?, digest = ?, bytes = ? WHERE hash = ?",
        (payload, digest, len(payload), address),
    )


def _with_positions(payload: bytes, meta_size: int, first: int, count: int) -> bytes:
    """The page's cells claimed to hold positions first..first+count-1 (its meta rewritten)."""
    edited = bytearray(payload)
    for cell in range(count):
        edited[cell * meta_size : cell * meta_size + 4] = (first + cell).to_bytes(4, "little")
    return bytes(edited)


def _forge(kv_path: Path, chat_id: int, other_id: int, forgery: str) -> None:
    """What an editor of the KV file can do with public code alone (no key)."""
    kv = sqlite3.connect(kv_path, isolation_level=None)
    try:
        mine, theirs = _state_pages(kv, chat_id), _state_pages(kv, other_id)
        assert len(mine) >= 2 and len(theirs) >= 2
        kv.execute("BEGIN")
        if forgery == "payload-with-a-public-digest":  # another chat's cells, same positions
            payload = _page_row(kv, theirs[0])[0]
            _set_page(kv, mine[0], payload, hashlib.blake2b(payload, digest_size=16).digest())
        elif forgery == "row-from-another-chat":  # the whole row, its digest as stored
            payload, digest, *_ = _page_row(kv, theirs[0])
            _set_page(kv, mine[0], payload, digest)
        elif forgery == "row-from-another-position":  # page 2's cells claimed as page 1's
            payload = _page_row(kv, mine[1])[0]
            (formats,) = kv.execute(
                "SELECT formats FROM states WHERE chat_id = ?", (chat_id,)
            ).fetchone()
            meta_size = json.loads(formats)[0][0]
            moved = _with_positions(payload, meta_size, 0, PAGE_TOKENS)
            _set_page(kv, mine[0], moved, hashlib.blake2b(moved, digest_size=16).digest())
        else:  # "state-row-from-another-chat": the other chat's row and page list, as this one's
            kv.execute("DELETE FROM states WHERE chat_id = ?", (chat_id,))
            kv.execute("DELETE FROM state_pages WHERE chat_id = ?", (chat_id,))
            names = [row[1] for row in kv.execute("PRAGMA table_info(states)")][1:]
            columns = ", ".join(names)  # every column but chat_id, the MAC's too
            kv.execute(
                f"INSERT INTO states (chat_id, {columns}) SELECT ?, {columns} FROM states"
                " WHERE chat_id = ?",
                (chat_id, other_id),
            )
            kv.execute(
                "INSERT INTO state_pages SELECT ?, idx, hash FROM state_pages WHERE chat_id = ?",
                (chat_id, other_id),
            )
        kv.execute("COMMIT")
    finally:
        kv.close()


def _two_chats_with_states(folder: Path, make_engine: Callable) -> tuple[Path, int, int]:
    folder.mkdir()
    db = folder / "chats.db"
    with Store(db) as store:
        mine = _chat_with_state(store, make_engine, "mine", LONG_QUESTION)
        other = _chat_with_state(store, make_engine, "other", "Describe the ocean. " * 20)
    return db, mine, other


def _cold_reply(db: Path, chat_id: int, make_engine: Callable, tmp_path: Path) -> str:
    """The next reply with no saved state at all: a copy of the chats database, no KV file."""
    cold = tmp_path / "cold" / "chats.db"
    cold.parent.mkdir()
    shutil.copyfile(db, cold)
    with Store(cold) as store:
        result = make_engine(store).send(chat_id, NEXT_QUESTION, GREEDY)
        assert result.metrics.reused_tokens == 0
        return result.reply


@pytest.mark.parametrize(
    "forgery",
    [
        "payload-with-a-public-digest",
        "row-from-another-chat",
        "row-from-another-position",
        "state-row-from-another-chat",
    ],
)
def test_a_forged_page_or_state_row_is_rejected_and_the_reply_equals_a_cold_one(
    tmp_path: Path, make_engine: Callable, forgery: str
) -> None:
    db, mine, other = _two_chats_with_states(tmp_path / "chats", make_engine)
    expected = _cold_reply(db, mine, make_engine, tmp_path)
    _forge(db.with_name("chats.kv.db"), mine, other, forgery)
    with Store(db) as store:
        engine = make_engine(store)
        result = engine.send(mine, NEXT_QUESTION, GREEDY)
        assert result.metrics.state_rejected, result.metrics.notes
        why = "failed its checksum" if forgery.startswith(("payload", "row")) else "not this chat's"
        assert any("saved state discarded" in n and why in n for n in result.metrics.notes)
        assert result.metrics.reused_tokens == 0
        assert result.reply == expected
        engine.after_reply(mine)
        again = make_engine(store).send(mine, "And a mountain?", GREEDY)  # the next turn restores
        assert again.metrics.state_rejected is None and again.metrics.reused_tokens > 0


def _pages_of_mine(store: Store) -> list[bytes]:
    return store.kv.state(store.chat_by_name("mine").id).page_hashes


def test_states_saved_before_signing_are_rejected_once_then_saved_signed(
    tmp_path: Path, make_engine: Callable
) -> None:
    db, mine, _other = _two_chats_with_states(tmp_path / "chats", make_engine)
    kv = sqlite3.connect(db.with_name("chats.kv.db"), isolation_level=None)
    try:  # as an older KV Chat left them: no state MAC, unkeyed 16-byte page digests
        kv.execute("UPDATE states SET mac = NULL")
        for address, payload in kv.execute("SELECT hash, payload FROM pages").fetchall():
            digest = hashlib.blake2b(payload, digest_size=16).digest()
            kv.execute("UPDATE pages SET digest = ? WHERE hash = ?", (digest, address))
    finally:
        kv.close()
    with Store(db) as store:
        engine = make_engine(store)
        first = engine.send(mine, NEXT_QUESTION, GREEDY)
        assert "before saved states were signed" in (first.metrics.state_rejected or "")
        engine.after_reply(mine)
        second = make_engine(store).send(mine, "And a mountain?", GREEDY)
        assert second.metrics.state_rejected is None and second.metrics.reused_tokens > 0
        query = "SELECT length(digest) FROM pages WHERE hash = ?"
        sizes = {store.kv.conn.execute(query, (h,)).fetchone()[0] for h in _pages_of_mine(store)}
        assert sizes == {32}  # this chat's pages were all written anew, with MACs


def test_a_model_changed_only_in_the_middle_restores_no_old_state(
    tmp_path: Path, make_engine: Callable, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVCHAT_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "model.gguf"
    shutil.copyfile(model_path, model)
    with Store(tmp_path / "chats.db") as store:
        chat_id = _chat_with_state(store, make_engine, "mine", "Name a colour.")
        with model.open("r+b") as handle:  # one weight byte, far from both ends
            handle.seek(model.stat().st_size // 2)
            byte = handle.read(1)
            handle.seek(-1, os.SEEK_CUR)
            handle.write(bytes([byte[0] ^ 0x01]))
        load = make_engine(store, model_path=model).activate(chat_id)
        assert not load.restored and "model" in (load.rejected or "")


def test_a_model_digest_is_computed_once_and_again_after_any_edit(
    tmp_path: Path, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVCHAT_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "model.gguf"
    shutil.copyfile(model_path, model)
    progress: list[float] = []
    first = model_file_identity(model, progress.append)
    assert progress and progress[-1] == 1.0  # hashed whole, with progress
    progress.clear()
    assert model_file_identity(model, progress.append) == first and not progress  # cached
    times = model.stat()
    with model.open("r+b") as handle:  # edited in place, same size and inode ...
        handle.seek(times.st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x01]))
    os.utime(model, ns=(times.st_atime_ns, times.st_mtime_ns))  # ... and its old mtime back
    assert model_file_identity(model, progress.append) != first and progress


# -- 11. a damaged KV file never blocks a chat ---------------------------------------------------


def _cli_turn(db: Path, message: str) -> dict:
    done = run_app(
        "chat", "--db", str(db), "--chat", "c", "--temperature", "0", "--max-tokens", "8",
        "--json", message,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-800:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def saved_cli_chat(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A chat with a saved state (made by the CLI), and the next reply computed cold."""
    folder = tmp_path_factory.mktemp("saved")
    _cli_turn(folder / "chats.db", LONG_QUESTION)
    cold = tmp_path_factory.mktemp("cold") / "chats.db"
    shutil.copyfile(folder / "chats.db", cold)
    return folder, _cli_turn(cold, NEXT_QUESTION)["reply"]


def _damage(kv_path: Path, damage: str) -> bytes | None:
    """Damage the KV file as a crash, a bad disk or an editor would; returns a forged
    payload or formats row that must not survive the turn (None for whole-file damage)."""
    size = kv_path.stat().st_size
    if damage == "truncated":
        os.truncate(kv_path, size // 2)
        return None
    if damage in ("garbage-header", "garbage-body"):
        with kv_path.open("r+b") as handle:
            handle.seek(0 if damage == "garbage-header" else 65536)  # past the first page
            handle.write(os.urandom(100 if damage == "garbage-header" else size - 65536))
        return None
    kv = sqlite3.connect(kv_path, isolation_level=None)
    try:
        first = kv.execute("SELECT hash FROM state_pages WHERE idx = 0").fetchone()[0]
        if damage == "page-size-mismatch":  # a page cut short, its public digest fixed up
            short = _page_row(kv, first)[0][:-100]
            _set_page(kv, first, short, hashlib.blake2b(short, digest_size=16).digest())
            return short
        (formats,) = kv.execute("SELECT formats FROM states").fetchone()
        edited = json.loads(formats)
        edited[0][2][0][1] += 2  # the first layer's K rows two bytes longer
        kv.execute("UPDATE states SET formats = ?", (json.dumps(edited),))
        return json.dumps(edited).encode()
    finally:
        kv.close()


@pytest.mark.parametrize(
    ("damage", "cause"),
    [
        ("truncated", "it is truncated"),
        ("garbage-header", "not a SQLite file"),
        ("garbage-body", "is unreadable"),
        ("page-size-mismatch", "failed its checksum"),
        ("formats-edited", "fails its MAC"),
    ],
)
def test_a_damaged_kv_file_is_set_aside_and_the_turn_and_the_next_work(
    tmp_path: Path, saved_cli_chat: tuple[Path, str], damage: str, cause: str
) -> None:
    saved, cold_reply = saved_cli_chat
    db, kv_path = tmp_path / "chats.db", tmp_path / "chats.kv.db"
    shutil.copyfile(saved / "chats.db", db)
    shutil.copyfile(saved / "chats.kv.db", kv_path)
    forged = _damage(kv_path, damage)
    turn = _cli_turn(db, NEXT_QUESTION)
    assert turn["reply"] == cold_reply
    assert turn["metrics"]["reused_tokens"] == 0
    assert any(cause in note for note in turn["metrics"]["notes"]), turn["metrics"]["notes"]
    aside = sorted(tmp_path.glob("chats.kv.db.damaged-*"))
    if forged is None:  # the whole file was set aside (renamed, not deleted)
        assert len([p for p in aside if not p.name.endswith(("-wal", "-shm"))]) == 1
    else:  # the forged page or state row was dropped
        assert aside == []
        kv = sqlite3.connect(f"file:{kv_path}?mode=ro", uri=True)
        try:
            rows = kv.execute("SELECT payload FROM pages").fetchall()
            rows += kv.execute("SELECT CAST(formats AS BLOB) FROM states").fetchall()
        finally:
            kv.close()
        assert all(row[0] != forged for row in rows)
    after = _cli_turn(db, "And a mountain?")
    assert after["metrics"]["state_rejected"] is None
    assert after["metrics"]["reused_tokens"] > 0  # the state saved after the damage is used


# -- 12. one KV file per chats database ----------------------------------------------------------


def test_two_database_names_that_once_shared_a_kv_file_keep_their_own_states(
    tmp_path: Path,
) -> None:
    bare, suffixed = tmp_path / "chats", tmp_path / "chats.db"
    _cli_turn(bare, "Tell me about apples. " * 10)
    _cli_turn(suffixed, "Describe the night sky over the sea. " * 10)  # the same chat id, 1
    turn = _cli_turn(bare, NEXT_QUESTION)
    assert turn["metrics"]["state_rejected"] is None, turn["metrics"]["notes"]
    assert turn["metrics"]["reused_tokens"] > 60  # its own history, not the other's
    assert (tmp_path / "chats.kv").exists() and (tmp_path / "chats.kv.db").exists()


def test_a_kv_file_of_another_database_is_set_aside_never_written_over(tmp_path: Path) -> None:
    first, second = tmp_path / "first.db", tmp_path / "second.db"
    _cli_turn(first, "Tell me about apples. " * 10)
    _cli_turn(second, "Describe the night sky over the sea. " * 10)
    theirs = (tmp_path / "first.kv.db").read_bytes()
    (tmp_path / "first.kv.db").replace(tmp_path / "second.kv.db")  # moved by hand
    turn = _cli_turn(second, NEXT_QUESTION)
    assert any("belongs to another chats database" in n for n in turn["metrics"]["notes"])
    assert turn["metrics"]["reused_tokens"] == 0
    [aside] = tmp_path.glob("second.kv.db.other-database-*")
    assert aside.read_bytes() == theirs  # kept as it was
    assert _cli_turn(second, "And a mountain?")["metrics"]["reused_tokens"] > 0


# -- 13. storage figures while a chat writes ------------------------------------------------------

HOLD_THE_WRITER = """
import sys
from app.storage.store import Store
store = Store(sys.argv[1], exclusive=True)
store.kv.transaction().__enter__()  # a state save in progress
print("ready", flush=True)
sys.stdin.read()
"""


def test_storage_figures_are_read_only_and_work_while_a_chat_writes(tmp_path: Path) -> None:
    db = tmp_path / "chats.db"
    _cli_turn(db, "Tell me about apples. " * 10)
    writer = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_WRITER, str(db)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert writer.stdout.readline().strip() == "ready"
        before = _files(tmp_path)
        done = run_app("storage", "--db", str(db), "--json", timeout=60)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert [chat["name"] for chat in report["chats"]] == ["c"]
        assert report["chats"][0]["bytes"] > 0
        assert _files(tmp_path) == before  # nothing written, no file created
    finally:
        writer.communicate("", timeout=60)


def test_the_signing_key_lives_in_the_chats_database_never_in_the_kv_file(tmp_path: Path) -> None:
    with Store(tmp_path / "chats.db") as store:
        chat = store.create_chat("c")
        record = StateRecord(chat.id, 2, {"model": "m"}, 0, [], [1, 2, 3], whole=True)
        store.kv.save_state(record, whole=b"state bytes")
        key = store.kv_key()
        assert key is not None and len(key) == 32
        store.kv.checkpoint()
    assert key in (tmp_path / "chats.db").read_bytes()
    assert key not in (tmp_path / "chats.kv.db").read_bytes()
