"""A hostile user at the command line: bad numbers, foreign files, copied states, full disks.

Real model, real SQLite files, real subprocesses where a kill or an abort is involved.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import GREEDY, TEST_CTX, set_state_field

from app import limits
from app.core.models import model_file_identity
from app.core.state_pages import PAGE_TOKENS
from app.domain import FinishReason, MessageStatus, Role, SegmentKind
from app.remote.client import MAX_BODY_BYTES, ServerError
from app.remote.session import RemoteChatSession
from app.session.chat_session import ChatSession, ContextOverflowError, GenerationOptions
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
        migrate(conn)
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
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        # One 64 KiB page per table and index, whatever the schema grows to.
        small = path.stat().st_size
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
        assert path.stat().st_size <= small + 2 * 65536, "the chats file is back to its size"
        assert kv_path.stat().st_size < 1_000_000
        assert wal.stat().st_size <= JOURNAL_SIZE_LIMIT
        assert kv_wal.stat().st_size <= JOURNAL_LIMIT_BYTES
        assert store.db.execute("PRAGMA freelist_count").fetchone()[0] == 0
        assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert [m.text for m in store.messages(keep.id)] == ["still here"]


# -- hostile servers (the remote engine) ------------------------------------------------
#
# A tiny local HTTP server on 127.0.0.1 plays the hostile server: it lists one model and
# answers chat completions with whatever the test scripts. Its threads are daemons and
# every stall waits on a flag with a bound, so it always stops by itself.

STALL_BOUND_S = 15.0


class _HostileHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    props: bytes | None = None  # /props body (None: 404)
    models: bytes = b'{"object": "list", "data": [{"id": "small"}]}'
    chat: Callable[[BaseHTTPRequestHandler], None]
    asked: threading.Event
    release: threading.Event

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._send(200, self.models)
        elif self.path == "/props" and self.props is not None:
            self._send(200, self.props)
        else:
            self._send(404, b'{"error": {"message": "not found"}}')

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/tokenize" and self.props is not None:  # a llama-server that stalls
            self.asked.set()
            self.release.wait(STALL_BOUND_S)
            self.close_connection = True
            return
        if self.path != "/v1/chat/completions":
            self._send(404, b'{"error": {"message": "not found"}}')
            return
        self.asked.set()
        with contextlib.suppress(OSError):
            type(self).chat(self)


def _stream_head(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Connection", "close")  # the body ends when the server closes
    handler.end_headers()
    handler.close_connection = True


def _events(*payloads: str) -> Callable[[BaseHTTPRequestHandler], None]:
    """A chat answer that streams ``payloads`` as ``data:`` events."""

    def answer(handler: BaseHTTPRequestHandler) -> None:
        _stream_head(handler)
        for payload in payloads:
            handler.wfile.write(f"data: {payload}\n\n".encode())
        handler.wfile.flush()

    return answer


def _stall_before_headers(handler: BaseHTTPRequestHandler) -> None:
    """A prefill that never ends: the request is read, nothing is answered."""
    type(handler).release.wait(STALL_BOUND_S)
    handler.close_connection = True


def _stall_after_a_piece(handler: BaseHTTPRequestHandler) -> None:
    _stream_head(handler)
    handler.wfile.write(_piece("Hel") + b"\n\n")
    handler.wfile.flush()
    type(handler).release.wait(STALL_BOUND_S)


def _keep_alives_only(handler: BaseHTTPRequestHandler) -> None:
    _stream_head(handler)
    deadline = time.monotonic() + STALL_BOUND_S
    while time.monotonic() < deadline and not type(handler).release.is_set():
        handler.wfile.write(b": keep-alive\n\n")
        handler.wfile.flush()
        time.sleep(0.1)


def _piece(text: str) -> bytes:
    chunk = {"choices": [{"index": 0, "delta": {"content": text}}]}
    return b"data: " + json.dumps(chunk).encode()


@contextlib.contextmanager
def hostile_server(
    chat: Callable[[BaseHTTPRequestHandler], None], props: bytes | None = None
) -> Iterator[type[_HostileHandler]]:
    handler = type(
        "Hostile",
        (_HostileHandler,),
        {
            "chat": staticmethod(chat),
            "props": props,
            "asked": threading.Event(),
            "release": threading.Event(),
        },
    )
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"  # type: ignore[attr-defined]
    try:
        yield handler
    finally:
        handler.release.set()
        httpd.shutdown()
        httpd.server_close()


def _unanswered(store: Store, chat_id: int, text: str) -> None:
    """The message is stored, unanswered, and nothing else was written."""
    assert [(m.role, m.text) for m in store.messages(chat_id)] == [(Role.USER, text)]
    assert store.metrics(chat_id) == []


def _server_error_line(error: pytest.ExceptionInfo[ServerError]) -> str:
    text = str(error.value)
    assert text and "\n" not in text
    return text


ONE_PIECE = json.dumps({"choices": [{"delta": {"content": "Hi"}, "finish_reason": None}]})


@pytest.mark.parametrize(
    "payload",
    [
        "5",
        '{"choices": ["x"]}',
        '{"choices": [{"delta": "x"}]}',
        '{"choices": [{"delta": {"content": 5}}]}',
        '{"choices": [], "usage": {"prompt_tokens": Infinity, "completion_tokens": 1}}',
        '{"choices": [], "usage": {"prompt_tokens": 1e400, "completion_tokens": 1}}',
        '{"choices": [], "timings": {"prompt_ms": "fast"}}',
    ],
)
def test_a_malformed_server_payload_is_one_line_and_leaves_the_message_unanswered(
    store: Store, payload: str
) -> None:
    with hostile_server(_events(ONE_PIECE, payload, "[DONE]")) as server:
        session = RemoteChatSession(store, server.url)  # type: ignore[attr-defined]
        chat_id = store.create_chat("bad payload").id
        try:
            with pytest.raises(ServerError) as error:
                session.send(chat_id, "Hello?", GenerationOptions(max_tokens=8))
        finally:
            session.close()
    assert "not a chat completion chunk" in _server_error_line(error)
    _unanswered(store, chat_id, "Hello?")


@pytest.mark.parametrize(
    "props",
    [
        b'{"default_generation_settings": [], "total_slots": 1}',
        b'{"default_generation_settings": {"n_ctx": "big"}}',
        b'{"default_generation_settings": {"n_ctx": 2048}, "total_slots": -3}',
    ],
)
def test_props_of_the_wrong_shape_are_one_line(store: Store, tmp_path: Path, props: bytes) -> None:
    with hostile_server(_events("[DONE]"), props=props) as server:
        with pytest.raises(ServerError) as error:
            RemoteChatSession(store, server.url)  # type: ignore[attr-defined]
        assert "/props" in _server_error_line(error)
        done = run_app(
            "chat", "--db", str(tmp_path / "cli.db"), "--chat", "x",
            "--server", server.url, "Hello",  # type: ignore[attr-defined]
            timeout=120,
        )  # fmt: skip
    assert done.returncode == 1 and "/props" in one_line(done)


def test_impossible_server_figures_are_clamped_and_marked_as_the_servers(store: Store) -> None:
    last = {
        "choices": [{"delta": {}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": 12,
            "completion_tokens": -4,
            "prompt_tokens_details": {"cached_tokens": 900},
        },
        "timings": {"cache_n": 900, "prompt_n": -3, "prompt_ms": -50.0, "predicted_ms": -1},
    }
    with hostile_server(_events(ONE_PIECE, json.dumps(last), "[DONE]")) as server:
        session = RemoteChatSession(store, server.url)  # type: ignore[attr-defined]
        chat_id = store.create_chat("figures").id
        try:
            result = session.send(chat_id, "Hello?", GenerationOptions(max_tokens=8))
        finally:
            session.close()
    m = result.metrics
    assert result.reply == "Hi"
    assert 0 <= m.reused_tokens <= m.prompt_tokens == 12
    assert m.prefill_tokens >= 0 and m.decode_tokens >= 0 and m.prefill_ms >= 0
    (note,) = [n for n in m.notes if "server's own figures" in n]
    assert "cached tokens 900 → 12" in note and "timings.prompt_ms -50 → 0" in note
    (row,) = store.metrics(chat_id)
    assert note in row.data["notes"]


def test_a_server_that_only_sends_keep_alives_is_abandoned_after_the_timeout(
    store: Store, tmp_path: Path
) -> None:
    with hostile_server(_keep_alives_only) as server:
        session = RemoteChatSession(store, server.url, timeout_s=1.0)  # type: ignore[attr-defined]
        chat_id = store.create_chat("keep-alives").id
        started = time.monotonic()
        try:
            with pytest.raises(ServerError) as error:
                session.send(chat_id, "Hello?", GenerationOptions(max_tokens=8))
        finally:
            session.close()
        waited = time.monotonic() - started
        assert "sent no data for 1 s" in _server_error_line(error)
        assert 1.0 <= waited < 8.0, waited  # keep-alives every 0.1 s did not reset the clock
        _unanswered(store, chat_id, "Hello?")
        done = run_app(
            "chat", "--db", str(tmp_path / "cli.db"), "--chat", "x", "--server-timeout", "1",
            "--server", server.url, "Hello",  # type: ignore[attr-defined]
            timeout=120,
        )  # fmt: skip
    assert done.returncode == 1 and "sent no data for 1 s" in one_line(done)


@pytest.mark.parametrize("stall", [_stall_before_headers, _stall_after_a_piece])
def test_cancel_ends_a_remote_reply_while_the_server_sends_nothing(
    store: Store, stall: Callable[[BaseHTTPRequestHandler], None]
) -> None:
    with hostile_server(stall) as server:
        session = RemoteChatSession(store, server.url)  # type: ignore[attr-defined]
        chat_id = store.create_chat("stalled").id
        cancel = threading.Event()
        stopped_at: list[float] = []

        def stop_when_asked() -> None:
            server.asked.wait(STALL_BOUND_S)
            time.sleep(0.3)  # the worker is now blocked on its read
            stopped_at.append(time.monotonic())
            cancel.set()

        stopper = threading.Thread(target=stop_when_asked, daemon=True)
        stopper.start()
        try:
            result = session.send(chat_id, "Hello?", GenerationOptions(max_tokens=8), cancel=cancel)
        finally:
            session.close()
        latency = time.monotonic() - stopped_at[0]
        stopper.join()
    print(f"remote cancel latency ({stall.__name__}): {latency * 1000:.0f} ms")
    assert latency < 2.0, latency
    assert result.metrics.finish_reason == FinishReason.CANCELLED
    assert store.messages(chat_id)[0].text == "Hello?"


def test_stop_while_a_llama_server_stalls_on_tokenize_ends_the_turn(store: Store) -> None:
    """The turn counts the message's tokens first (/tokenize): Stop must end that too."""
    props = b'{"default_generation_settings": {"n_ctx": 4096}, "total_slots": 1}'
    with hostile_server(_stall_before_headers, props=props) as server:
        session = RemoteChatSession(store, server.url)  # type: ignore[attr-defined]
        chat_id = store.create_chat("tokenize").id
        cancel = threading.Event()

        def stop_when_asked() -> None:
            server.asked.wait(STALL_BOUND_S)
            time.sleep(0.3)
            cancel.set()

        stopper = threading.Thread(target=stop_when_asked, daemon=True)
        stopper.start()
        started = time.monotonic()
        try:
            result = session.send(chat_id, "Hello?", GenerationOptions(max_tokens=8), cancel=cancel)
        finally:
            session.close()
        took = time.monotonic() - started
        stopper.join()
    assert session.info.kind == "llama-server"
    assert result.metrics.finish_reason == FinishReason.CANCELLED
    assert took < 3.0, took  # 0.3 s before Stop, then at once


def test_ctrl_c_ends_a_cli_reply_while_the_server_sends_nothing(tmp_path: Path) -> None:
    with hostile_server(_stall_before_headers) as server:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "chat", "--db", str(tmp_path / "cli.db"),
             "--chat", "x", "--server", server.url, "Hello"],  # type: ignore[attr-defined]
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert server.asked.wait(120)
            time.sleep(0.3)
            started = time.monotonic()
            process.send_signal(signal.SIGINT)
            assert process.stderr is not None
            line = process.stderr.readline()  # printed when the reply has ended
            latency = time.monotonic() - started
            _, rest = process.communicate(timeout=30)
            exited = time.monotonic() - started
        finally:
            process.kill()
    print(f"CLI Ctrl+C on a stalled server: reply ended after {latency * 1000:.0f} ms, "
          f"process exited after {exited * 1000:.0f} ms")  # fmt: skip
    assert process.returncode == 130 and (line + rest).strip() == "kvchat: interrupted"
    assert latency < 2.0, latency


def test_a_reply_longer_than_max_tokens_is_cut_at_max_tokens(store: Store) -> None:
    pieces = [_piece(f"w{i} ").decode()[6:] for i in range(50)]
    with hostile_server(_events(*pieces, "[DONE]")) as server:
        session = RemoteChatSession(store, server.url)  # type: ignore[attr-defined]
        chat_id = store.create_chat("long").id
        try:
            result = session.send(chat_id, "Hello?", GenerationOptions(max_tokens=5))
        finally:
            session.close()
    assert result.reply == "w0 w1 w2 w3 w4 "
    assert result.metrics.finish_reason == FinishReason.LENGTH
    assert any("more than max_tokens" in note for note in result.metrics.notes)


def test_a_line_or_body_over_the_cap_is_refused(store: Store) -> None:
    huge = _piece("x" * (MAX_BODY_BYTES + 10)).decode()[6:]
    with hostile_server(_events(huge, "[DONE]")) as server:
        session = RemoteChatSession(store, server.url)  # type: ignore[attr-defined]
        chat_id = store.create_chat("huge").id
        try:
            with pytest.raises(ServerError) as error:
                session.send(chat_id, "Hello?", GenerationOptions(max_tokens=8))
        finally:
            session.close()
        assert "larger than 8 MB" in _server_error_line(error)
        _unanswered(store, chat_id, "Hello?")
        server.models = b'{"data": [{"id": "' + b"m" * (MAX_BODY_BYTES + 10) + b'"}]}'
        with pytest.raises(ServerError) as error:
            RemoteChatSession(store, server.url)  # type: ignore[attr-defined]
    assert "larger than 8 MB" in _server_error_line(error)


def test_a_long_streamed_reply_is_gathered_in_linear_time(store: Store) -> None:
    """32768 pieces of 240 characters (7.5 MB): joined once, not copied at every piece."""
    piece = "y" * 239 + " "
    count = 32_768

    def answer(handler: BaseHTTPRequestHandler) -> None:
        _stream_head(handler)
        line = _piece(piece) + b"\n\n"
        for _ in range(count // 256):
            handler.wfile.write(line * 256)
        handler.wfile.write(b"data: [DONE]\n\n")
        handler.wfile.flush()

    with hostile_server(answer) as server:
        session = RemoteChatSession(store, server.url)  # type: ignore[attr-defined]
        chat_id = store.create_chat("long").id
        started = time.monotonic()
        try:
            result = session.send(chat_id, "Hello?", GenerationOptions(max_tokens=count))
        finally:
            session.close()
    took = time.monotonic() - started
    print(f"7.5 MB reply in {count} pieces gathered in {took:.1f} s")
    assert len(result.reply) == count * len(piece)
    assert took < 20.0, took


@pytest.mark.gui
def test_stop_and_closing_the_window_during_a_server_prefill_never_wait_on_the_server(
    qtbot, db_path: Path, tmp_path: Path
) -> None:
    from gui_helpers import close_window, open_window, temp_settings

    window = open_window(qtbot, db_path, temp_settings(tmp_path))
    try:
        with hostile_server(_stall_before_headers) as server:
            dialog = window.ask_server()
            dialog.url_edit.setText(server.url)  # type: ignore[attr-defined]
            dialog.timeout_spin.setValue(30)
            with qtbot.waitSignal(window.model_ready, timeout=30_000):
                dialog.accept()
            assert window.settings.value("server/timeout") in (30, 30.0, "30", "30.0")
            assert window.host.worker.session.client.timeout_s == 30

            window.input.setPlainText("Hello?")
            window.send()  # the chat is made first (on the worker): the loop must run
            qtbot.waitUntil(server.asked.is_set, timeout=30_000)
            time.sleep(0.3)  # the worker is blocked on the server
            started = time.monotonic()
            window.stop()
            qtbot.waitUntil(lambda: not window.busy, timeout=5_000)
            stop_latency = time.monotonic() - started

            server.asked.clear()
            window.input.setPlainText("Hello again?")
            window.send()
            qtbot.waitUntil(server.asked.is_set, timeout=30_000)
            time.sleep(0.3)
            started = time.monotonic()
            close_window(window)
            close_latency = time.monotonic() - started
    finally:
        window.close()
    print(f"GUI Stop during a server prefill: {stop_latency * 1000:.0f} ms; "
          f"closing the window: {close_latency * 1000:.0f} ms")  # fmt: skip
    assert stop_latency < 2.0 and close_latency < 5.0, (stop_latency, close_latency)


# -- hostile templates ---------------------------------------------------------------------

_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
#: Templates that would run for hours or take gigabytes, each then a usable ChatML.
HOSTILE_TEMPLATES = {
    "nested ranges": "{% for i in range(100000) %}{% for j in range(100000) %}"
    "{% endfor %}{% endfor %}",
    "huge power": "{{ 9**(9**9) }}",
    "huge repeat": "{{ 'x' * 6000000000 }}",
    "doubling with ~": "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "doubling with +": "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "huge output": "{% for i in range(100000) %}{{ 'y' * 100000 }}{% endfor %}",
    "huge width": "{{ '{:>999999999}'.format(1) }}{{ 'x'.ljust(999999999) }}",
    "huge join": "{{ range(100000)|join('x' * 1000000) }}",
    "huge lorem ipsum": "{{ lipsum(1000000000) }}",
}
TEMPLATE_BOUND_S = 20.0  # the limit is 2 s; a loaded machine may be slow to start


def _run_snippet(code: str, timeout: int = 240) -> list[dict]:
    """Python in a subprocess (a template that hangs ends the run, not the test suite)."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
        check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_a_hostile_gguf_template_falls_back_to_chatml_with_a_warning_in_bounded_time() -> None:
    code = f"""
import json, time
from app.core.chat_template import markup_for
for name, body in {HOSTILE_TEMPLATES!r}.items():
    started = time.monotonic()
    markup = markup_for(body + {_CHATML!r}, "<s>", "</s>")
    print(json.dumps({{"name": name, "origin": markup.template_origin,
                      "note": markup.notes[0], "s": time.monotonic() - started}}), flush=True)
"""
    results = _run_snippet(code)
    assert [r["name"] for r in results] == list(HOSTILE_TEMPLATES)
    for result in results:
        print(f"{result['name']}: refused in {result['s']:.2f} s")
        assert result["origin"] == "builtin-chatml", result
        assert "the template went past a limit" in result["note"], result
        assert "\n" not in result["note"] and result["s"] < TEMPLATE_BOUND_S, result


def test_a_stored_hostile_template_choice_falls_back_to_the_models_own(tmp_path: Path) -> None:
    db = tmp_path / "chats.db"
    code = f"""
import json, time
from pathlib import Path
from app.core.models import default_model_path, model_file_identity
from app.domain import TemplateChoice, TemplateKind
from app.session.chat_session import ChatSession
from app.storage.store import Store
with Store(Path({str(db)!r})) as store:
    body = {HOSTILE_TEMPLATES["nested ranges"]!r} + {_CHATML!r}
    choice = TemplateChoice(TemplateKind.JINJA, body, "evil.jinja")
    store.set_model_template(model_file_identity(default_model_path()), choice)
    started = time.monotonic()
    engine = ChatSession(store, default_model_path(), n_ctx=2048)
    print(json.dumps({{"origin": engine.markup.template_origin, "notes": engine.markup.notes,
                      "s": time.monotonic() - started}}))
    engine.close()
"""
    (result,) = _run_snippet(code)
    print(f"model load with a stored hostile template: {result['s']:.1f} s")
    assert result["origin"] == "gguf"
    assert "evil.jinja (Jinja) cannot be used" in result["notes"][0]
    assert "went past a limit: it ran longer than 2 s" in result["notes"][0]


@pytest.mark.parametrize("name", ["nested ranges", "huge repeat", "huge output"])
def test_a_hostile_chat_template_file_is_refused_in_one_line(tmp_path: Path, name: str) -> None:
    template = tmp_path / "evil.jinja"
    template.write_text(HOSTILE_TEMPLATES[name] + _CHATML, encoding="utf-8")
    started = time.monotonic()
    try:
        done = run_app(
            "chat", "--db", str(tmp_path / "chats.db"), "--chat", "x",
            "--chat-template", str(template), "Hello", timeout=240,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {name} template hung the model load")
    took = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    assert "went past a limit" in one_line(done)
    assert took < 120, took


# -- 10. the user's files: export, names, refused options ------------------------------------


def _chat_in(db: Path, name: str, *texts: str) -> None:
    """A chat written straight to the store (no model needed), with its KV file."""
    with Store(db) as store:
        chat = store.create_chat(name)
        store.add_instruction_version(chat.id, "Be brief.")
        for index, text in enumerate(texts):
            store.add_message(chat.id, "user" if index % 2 == 0 else "assistant", text)
        store.kv.total_bytes()  # the KV file exists, as after any turn


def test_export_never_overwrites_the_database_its_files_or_any_sqlite_file(
    tmp_path: Path,
) -> None:
    db = tmp_path / "chats.db"
    _chat_in(db, "demo", "Hello", "Hi there")
    other = tmp_path / "notes.sqlite"
    _foreign_database(other)
    (tmp_path / "link.md").symlink_to(db)
    os.link(db, tmp_path / "hard.md")
    before = _files(tmp_path)
    for target in (
        db, db.with_name("chats.kv.db"), f"{db}-wal", f"{db}-shm", f"{db}.lock",
        tmp_path / "chats.kv.db-wal", tmp_path / "link.md", tmp_path / "hard.md", other,
        f"{other}-wal", tmp_path,
    ):  # fmt: skip
        done = run_app("export", "--db", str(db), "--chat", "demo", "--out", str(target))
        assert done.returncode == 1, (target, done.stderr)
        assert "Traceback" not in done.stderr
        line = one_line(done)
        assert "KV Chat's own files" in line or "SQLite" in line or "folder" in line, line
        assert _files(tmp_path) == before, f"{target} was written"


def _export_with_a_file_size_limit(db: Path, out: Path, limit: int) -> subprocess.CompletedProcess:
    """``export`` in a process that may write files of at most ``limit`` bytes (a full
    disk, as the kernel reports it: EFBIG)."""
    import resource

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "app", "export", "--db", str(db), "--chat", "demo",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
        preexec_fn=limit_file_size, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )  # fmt: skip


def test_a_failed_export_leaves_the_existing_file_whole(tmp_path: Path) -> None:
    db = tmp_path / "chats.db"
    _chat_in(db, "demo", "Tell me a long story. " * 400, "Once upon a time. " * 400)
    out = tmp_path / "story.md"
    out.write_text("my notes, written before\n", encoding="utf-8")
    out.chmod(0o640)
    failed = _export_with_a_file_size_limit(db, out, 4096)
    assert failed.returncode == 1 and "cannot write" in one_line(failed)
    assert out.read_text(encoding="utf-8") == "my notes, written before\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["chats.db", "chats.kv.db", "story.md"]
    ), "no temporary file is left behind"
    done = run_app("export", "--db", str(db), "--chat", "demo", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_text(encoding="utf-8").startswith("# demo")
    assert out.stat().st_mode & 0o777 == 0o640, "the replaced file keeps its permissions"


def test_text_from_raw_bytes_is_exported_never_a_traceback(tmp_path: Path) -> None:
    db = tmp_path / "raw.db"
    chat = subprocess.run(
        [sys.executable, "-m", "app", "chat", "--db", str(db), "--chat", "raw",
         "--instructions", b"Be brief \xff", "--max-tokens", "2", "--temperature", "0", "-"],
        input=b"caf\xe9 ok?\n", capture_output=True, timeout=300, check=False, cwd=ROOT,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    as_json = run_app("export", "--db", str(db), "--chat", "raw", "--out", str(tmp_path / "r.json"))
    as_md = run_app("export", "--db", str(db), "--chat", "raw", "--out", str(tmp_path / "r.md"))
    shown = run_app("history", "--db", str(db), "--chat", "raw")
    for done in (as_json, as_md, shown):
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    document = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert document["messages"][0]["text"] == "caf\udce9 ok?\n", "JSON keeps the text exactly"
    assert document["instruction_versions"][0]["text"] == "Be brief \udcff"
    markdown = (tmp_path / "r.md").read_text(encoding="utf-8")
    assert "caf\ufffd ok?" in markdown and "Be brief \ufffd" in markdown
    assert "user: caf\\udce9 ok?" in shown.stdout


def test_a_chat_name_is_one_name_however_it_is_spaced(tmp_path: Path) -> None:
    db = str(tmp_path / "names.db")
    turn = ("--max-tokens", "2", "--temperature", "0")
    assert run_app("chat", "--db", db, "--chat", "demo ", *turn, "Hi").returncode == 0
    again = run_app("chat", "--db", db, "--chat", "demo", *turn, "Again")
    assert again.returncode == 0, again.stderr
    shown = run_app("history", "--db", db, "--chat", "\tdemo  ", "--json")
    assert shown.returncode == 0, shown.stderr
    payload = json.loads(shown.stdout)
    assert payload["chat"]["name"] == "demo" and len(payload["messages"]) == 4
    out = tmp_path / "demo.md"
    assert run_app("export", "--db", db, "--chat", " demo", "--out", str(out)).returncode == 0
    decomposed = " cafe\u0301 "
    fork = run_app("fork", "--db", db, "--chat", "demo ", "--at", "1", "--name", decomposed)
    assert fork.returncode == 0, fork.stderr
    composed = run_app("history", "--db", db, "--chat", "caf\u00e9", "--json")
    assert composed.returncode == 0, composed.stderr
    assert json.loads(composed.stdout)["chat"]["name"] == "caf\u00e9"
    with Store(Path(db), read_only=True) as store:
        assert sorted(chat.name for chat in store.chats()) == ["caf\u00e9", "demo"]


def test_refused_options_create_no_files(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    db = str(folder / "chats.db")
    chat = ("chat", "--db", db, "--chat", "c")
    refused = [
        (*chat, "--n-ctx", "64", "hi"),
        (*chat, "--model", str(folder / "missing.gguf"), "hi"),
        (*chat, "--chat-template", "no-such-format", "hi"),
        (*chat, "--server-model", "m", "hi"),
        (*chat, "--server", "http://127.0.0.1:9/v1", "hi"),  # nothing listens on port 9
        (*chat, "--server", "http://127.0.0.1:9/v1", "--n-ctx", "256", "hi"),
        ("fork", "--db", db, "--chat", "c", "--at", "0", "--name", "d"),
        ("export", "--db", db, "--chat", "c", "--out", str(folder / "c.md")),
        ("history", "--db", db, "--chat", "c"),
        ("storage", "--db", db),
    ]
    for args in refused:
        done = run_app(*args)
        assert done.returncode == 1, (args, done.stderr)
        assert "Traceback" not in done.stderr and one_line(done)
        assert list(folder.iterdir()) == [], (args, list(folder.iterdir()))
    existing = tmp_path / "second" / "old.db"
    existing.parent.mkdir()
    _chat_in(existing, "c", "Hello")
    existing.with_name("old.kv.db").unlink()
    before = _files(existing.parent)
    done = run_app("chat", "--db", str(existing), "--chat", "c", "--n-ctx", "64", "hi")
    assert done.returncode == 1 and "context of 64 tokens" in one_line(done)
    assert _files(existing.parent).keys() == before.keys(), "no lock file, no KV file"


def test_token_ids_edited_outside_the_vocabulary_are_retokenized_not_fatal(tmp_path: Path) -> None:
    """A chats database edited by hand: a message's token ids name tokens the model does not
    have. Decoding them would fail on every turn; they are re-tokenized from the text, with a
    note, and the reply equals the one the unedited chat gives."""
    turn = ("--max-tokens", "6", "--temperature", "0")
    replies = {}
    for name, edit in (("plain", False), ("edited", True)):
        db = tmp_path / f"{name}.db"
        assert run_app("chat", "--db", str(db), "--chat", "c", *turn, "Hi").returncode == 0
        if edit:
            conn = sqlite3.connect(db)
            with conn:
                conn.execute("UPDATE messages SET token_ids = ? WHERE seq = 0",
                             (array.array("i", [1, 10**6, 2]).tobytes(),))  # fmt: skip
            conn.close()
        db.with_name(f"{name}.kv.db").unlink()  # no saved state: the history is decoded again
        done = run_app("chat", "--db", str(db), "--chat", "c", "--json", *turn, "And now?")
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        answer = json.loads(done.stdout)
        replies[name] = answer["reply"]
        retokenized = [n for n in answer["metrics"]["notes"] if "re-tokenized" in n]
        expected = ["message 0: stored token ids were unreadable; re-tokenized from its text"]
        assert retokenized == (expected if edit else []), answer["metrics"]["notes"]
        with Store(db, read_only=True) as store:
            first = store.messages(store.chat_by_name("c").id)[0]
            assert max(first.token_ids) < 10**6, "the repaired ids are stored"
    assert replies["edited"] == replies["plain"]


# -- 11. regenerate keeps every version ------------------------------------------------------


def _replies(store: Store, chat_id: int) -> list[tuple[str, str, list[int]]]:
    return [(m.role, m.text, m.token_ids) for m in store.messages(chat_id)]


def test_regenerate_keeps_the_old_reply_as_a_version_and_reuses_the_shared_cells(
    store: Store, engine: ChatSession
) -> None:
    chat = store.create_chat("versions")
    store.add_instruction_version(chat.id, "Answer briefly.")
    for question in ("Name a planet.", "Name a metal."):
        engine.send(chat.id, question, GREEDY)
        engine.after_reply(chat.id)
    before = _replies(store, chat.id)
    last_pair = sum(len(m.token_ids) for m in store.messages(chat.id)[-2:])
    shared = len(engine.history_plan(chat.id).tokens) - last_pair
    sampled = GenerationOptions(max_tokens=12, temperature=1.0, seed=5)
    again = engine.regenerate(chat.id, sampled)
    assert again.version_of == chat.id and again.chat_id != chat.id
    assert _replies(store, chat.id) == before, "the old reply is still there, unchanged"
    branch = _replies(store, again.chat_id)
    assert branch[:-1] == before[:-1] and branch[-1][1] == again.reply
    assert again.metrics.reused_tokens >= shared, "the shared prefix's cells are reused"
    assert again.metrics.prefill_tokens < again.metrics.prompt_tokens - shared + 1
    reply_seq = len(before) - 1
    versions = store.branches(chat.id)
    assert versions == store.branches(again.chat_id) == {reply_seq: [chat.id, again.chat_id]}
    assert versions[reply_seq].index(chat.id) == 0, "the old reply is version 1/2"
    assert versions[reply_seq].index(again.chat_id) == 1, "the new one 2/2"
    finished = engine.after_reply(again.chat_id)
    assert finished is not None and finished.state_bytes > 0
    third = engine.regenerate(chat.id, GREEDY)  # from version 1 again: a third version
    assert store.branches(chat.id)[reply_seq] == [chat.id, again.chat_id, third.chat_id]
    assert third.reply == before[-1][1], "greedy: version 1's reply, as a version of its own"


def test_a_regenerate_that_fails_leaves_the_old_reply_as_it_was(
    store: Store, make_engine: Callable
) -> None:
    chat = store.create_chat("fails")
    roomy = make_engine(store)
    roomy.send(chat.id, "Summarise: " + "the quiet river runs past the old mill. " * 40, GREEDY)
    roomy.after_reply(chat.id)
    before = _replies(store, chat.id)
    small = make_engine(store, n_ctx=256)  # the message alone no longer fits
    with pytest.raises(ContextOverflowError):
        small.regenerate(chat.id, GREEDY)
    assert _replies(store, chat.id) == before and len(store.family(chat.id)) == 1
    assert len(store.family(chat.id)) == 1, "no empty version is left behind"


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
        ("garbage-header", "not a SQLite database"),
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
