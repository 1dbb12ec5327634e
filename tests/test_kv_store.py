"""The paged KV store on the real model: byte-exact pages, saves of new pages only, shared
prefixes across chats, a budget, and a KV file that can be deleted without losing a message."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import GREEDY, TEST_CTX

from app.core.llama_backend import LlamaBackend
from app.core.state_pages import (
    PAGE_TOKENS,
    CacheFormat,
    Page,
    join_pages,
    parse_state,
    split_pages,
)
from app.domain import Role
from app.session.chat_session import ChatSession
from app.storage import kv_store
from app.storage.sqlite_file import PAGE_SIZE
from app.storage.store import Store

ROOT = Path(__file__).resolve().parents[1]
LONG = "The garden needs water on dry days, and the tomatoes want more sun than the beans. "


def _prefilled_backend(model_path: Path, kv_type: str, tokens: int) -> LlamaBackend:
    backend = LlamaBackend(model_path, n_ctx=TEST_CTX, kv_type=kv_type)
    ids = backend.tokenize(LONG * 60, special=False)[:tokens]
    for start in range(0, len(ids), backend.n_batch):
        backend.decode(ids[start : start + backend.n_batch], start, logits_for_last=False)
    return backend


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])  # V transposed (f16) and row-major (q8_0)
def test_split_then_join_is_byte_identical_to_llama_cpp_state(
    model_path: Path, kv_type: str
) -> None:
    backend = _prefilled_backend(model_path, kv_type, 5 * PAGE_TOKENS + 17)
    try:
        blob = bytes(backend.get_state())
        parsed = parse_state(blob)
        assert parsed is not None
        pages = split_pages(parsed)
        assert [p.count for p in pages] == [PAGE_TOKENS] * 5 + [17]
        joined = join_pages(parsed.seq_id, [c.format for c in parsed.caches], pages)
        assert bytes(joined) == blob
        assert backend.set_state(joined) and backend.last_position() == 5 * PAGE_TOKENS + 16
    finally:
        backend.close()


def test_an_unknown_state_layout_is_not_parsed() -> None:
    assert parse_state(b"") is None
    assert parse_state(b"\xd8\x3c\x14\xaf" + bytes(40)) is None  # the magic, then nonsense


def _long_chat(store: Store, session: ChatSession, name: str, turns: int = 4) -> int:
    chat = store.create_chat(name)
    store.add_instruction_version(chat.id, "Answer in one short sentence.")
    for index in range(turns):
        store.add_message(chat.id, Role.USER, f"{name} question {index}: " + LONG * 3)
        store.add_message(chat.id, Role.ASSISTANT, f"{name} answer {index}: " + LONG * 2)
    session.after_reply(chat.id)  # prefill + save (untimed set-up)
    return chat.id


def test_a_save_writes_only_the_new_pages(store: Store, engine: ChatSession) -> None:
    chat_id = _long_chat(store, engine, "long")
    first_pages = len(store.kv.state(chat_id).page_hashes)
    assert first_pages >= 8
    engine.send(chat_id, "Which plants need the most sun?", GREEDY)
    metrics = engine.after_reply(chat_id)
    assert metrics is not None
    per_token = metrics.state_bytes / metrics.cache_tokens
    # Pages of the history before this turn are already stored; what changed is the
    # block on top, the new message and reply, and the page they start in.
    changed = metrics.block_tokens + metrics.message_tokens + metrics.decode_tokens + 32
    assert metrics.state_bytes_written <= (changed + PAGE_TOKENS) * per_token
    assert metrics.state_bytes_written < metrics.state_bytes / 3
    stored = store.metrics(chat_id)[-1].data
    assert stored["state_bytes_written"] == metrics.state_bytes_written


def test_a_save_copies_out_only_the_new_cells_and_its_pages_join_to_the_whole_state(
    store: Store, engine: ChatSession
) -> None:
    chat_id = _long_chat(store, engine, "long")
    engine.send(chat_id, "Which plants need the most sun?", GREEDY)
    engine.after_reply(chat_id)
    engine.send(chat_id, "And which need shade?", GREEDY)
    engine.mirror.changed = True
    save = engine.states.save(chat_id)  # the cells as they are now, most pages stored
    whole = bytes(engine.mirror.snapshot())
    assert save.bytes == len(whole)
    assert 0 < save.copied < len(whole) / 3, "only the cells past the stored pages are copied"
    record = store.kv.state(chat_id)
    pages = store.kv.read_pages(record.page_hashes, record.formats)
    formats = [CacheFormat.from_description(f) for f in record.formats]
    stored = [Page(p.cache, p.first_position, p.count, p.payload) for p in pages]
    assert bytes(join_pages(record.seq_id, formats, stored)) == whole


def test_a_fork_restores_the_pages_it_shares(store: Store, engine: ChatSession) -> None:
    chat_id = _long_chat(store, engine, "original")
    engine.send(chat_id, "Which plants need the most sun?", GREEDY)
    engine.after_reply(chat_id)
    last_history_seq = store.messages(chat_id)[-3].seq  # before the last question
    fork = store.fork_chat(chat_id, last_history_seq, "fork")
    shared = engine.history_plan(fork.id).tokens
    assert shared == engine.history_plan(chat_id).tokens[: len(shared)]
    engine.drop_cache()  # as after a restart: the fork restores pages, not cells in memory
    result = engine.send(fork.id, "And which need shade?", GREEDY)
    full_pages = len(shared) // PAGE_TOKENS * PAGE_TOKENS
    assert result.metrics.reused_tokens >= full_pages > 0
    assert any("shared with another chat" in note for note in result.metrics.notes)
    engine.after_reply(fork.id)
    usage = {u.chat_id: u for u in store.kv.usage()}
    assert usage[fork.id].shared_bytes > 0
    assert store.kv.total_bytes() < usage[chat_id].bytes + usage[fork.id].bytes
    assert store.kv.usage(fork.id) == [usage[fork.id]]
    view = engine.cache_view(fork.id)  # what the inspector shows for the chat on screen
    assert (view.saved_bytes, view.saved_shared_bytes) == (
        usage[fork.id].bytes,
        usage[fork.id].shared_bytes,
    )
    assert (view.store_bytes, view.budget_bytes) == (
        store.kv.total_bytes(),
        store.kv.budget_bytes,
    )


def test_deleting_the_kv_file_loses_no_message(
    db_path: Path, store: Store, make_engine: Callable
) -> None:
    first = make_engine(store)
    chat_id = _long_chat(store, first, "kept", turns=2)
    first.close()
    messages = [m.text for m in store.messages(chat_id)]
    kv_path = store.kv_path
    store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(kv_path) + suffix).unlink(missing_ok=True)
    with Store(db_path) as reopened:
        session = make_engine(reopened)
        result = session.send(chat_id, "Anything else?", GREEDY)
        assert [m.text for m in reopened.messages(chat_id)][: len(messages)] == messages
        assert result.metrics.reused_tokens == 0
        assert any("no saved state" in note for note in result.metrics.notes)
        assert session.after_reply(chat_id) is not None
        assert reopened.kv.state(chat_id) is not None  # a new KV file, filled again


def test_the_budget_evicts_other_chats_pages_first(store: Store, engine: ChatSession) -> None:
    older = _long_chat(store, engine, "older")
    older_bytes = store.kv.total_bytes()
    newer = _long_chat(store, engine, "newer", turns=3)
    store.kv.set_budget(store.kv.total_bytes() - older_bytes // 2)
    assert store.kv.total_bytes() <= store.kv.budget_bytes
    # The least recently used pages went: the newer chat's are all there.
    record = store.kv.state(newer)
    assert len(store.kv.read_pages(record.page_hashes, record.formats)) == len(record.page_hashes)
    engine.forget_chat(newer)
    result = engine.send(older, "What about the beans?", GREEDY)
    history = engine.history_plan(older).tokens
    assert result.metrics.state_rejected is None
    assert 0 < result.metrics.reused_tokens < len(history)  # the prefix that was left
    assert any("restored" in note and "of" in note for note in result.metrics.notes)


def test_deleting_a_chat_shrinks_the_kv_file_and_bounds_the_wal(
    store: Store, engine: ChatSession
) -> None:
    chat_id = _long_chat(store, engine, "big")
    kv_path = store.kv_path
    wal = Path(str(kv_path) + "-wal")

    def on_disk() -> int:
        return kv_path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)

    size = on_disk()
    assert size > 5_000_000
    assert not wal.exists() or wal.stat().st_size <= 64 * 1024**2
    engine.forget_chat(chat_id)
    store.delete_chat(chat_id)
    assert on_disk() < size / 4
    assert not wal.exists() or wal.stat().st_size < 1_000_000


def test_storage_and_fork_commands(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"

    def run(*args: str) -> dict:
        done = subprocess.run(
            [sys.executable, "-m", "app", *args, "--json"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    common = ("--db", str(db), "--temperature", "0", "--max-tokens", "8")
    run("chat", *common, "--chat", "a", "--instructions", "Be brief.", LONG * 6)
    run("chat", *common, "--chat", "a", "And the beans?")
    forked = run("fork", "--db", str(db), "--chat", "a", "--at", "1", "--name", "b")
    assert forked == {"chat": "b", "from": "a", "at": 1, "messages": 2}
    turn = run("chat", *common, "--chat", "b", "What about peas?")
    assert turn["metrics"]["reused_tokens"] >= PAGE_TOKENS
    report = run("storage", "--db", str(db))
    assert report["kv_path"] == str(tmp_path / "cli.kv.db")
    assert report["budget_bytes"] == 2 * 1024**3
    chats = {c["name"]: c for c in report["chats"]}
    assert set(chats) == {"a", "b"} and chats["b"]["shared_bytes"] > 0
    assert report["total_bytes"] == sum(c["bytes"] for c in chats.values()) - chats["b"][
        "shared_bytes"
    ]


def test_branches_restore_the_shared_prefix_and_share_storage(
    store: Store, engine: ChatSession
) -> None:
    """Five edits of the last question: each branch restores the shared history from the
    original's pages (no prefill of it) and stores only what differs: the page the edit
    falls in, the new message, reply and block. So the cost of a branch does not grow
    with the chat (5 branches of a 3,000-token chat: see README)."""
    chat_id = _long_chat(store, engine, "original")
    engine.send(chat_id, "Which plants need the most sun?", GREEDY)
    engine.after_reply(chat_id)
    one_chat = store.kv.usage(chat_id)[0].bytes
    edited_seq = store.messages(chat_id)[-2].seq
    last_pair = sum(len(m.token_ids) for m in store.messages(chat_id)[-2:])
    shared = len(engine.history_plan(chat_id).tokens) - last_pair
    per_token = 0.0
    for number in range(5):
        before = store.kv.total_bytes()
        branch = store.branch_chat(chat_id, edited_seq)
        result = engine.send(branch.id, f"Which plants need shade? Version {number}.", GREEDY)
        assert result.metrics.reused_tokens >= shared // PAGE_TOKENS * PAGE_TOKENS
        assert result.metrics.prefill_tokens < shared // 4, "the shared history is reused"
        finished = engine.after_reply(branch.id)
        per_token = finished.state_bytes / finished.cache_tokens
        own_tokens = (
            finished.block_tokens + finished.message_tokens + finished.decode_tokens + 32
        )
        added = store.kv.total_bytes() - before
        assert added <= (own_tokens + PAGE_TOKENS) * per_token, (added, own_tokens)
        if number == 0:  # the reply on reused cells is the reply of a cold evaluation
            saved = {c.id: store.kv.state(c.id) for c in store.family(chat_id)}
            engine.drop_cache()
            for family_chat in saved:
                store.kv.delete_state(family_chat)
            cold = engine.regenerate(branch.id, GREEDY)
            assert cold.metrics.reused_tokens == 0
            assert cold.reply == result.reply
            engine.after_reply(branch.id)
            engine.forget_chat(branch.id)
            engine.activate(chat_id, None)  # the original's pages are gone: recompute it
            engine.regenerate(chat_id, GREEDY)
            engine.after_reply(chat_id)
    assert len(store.branches(chat_id)[edited_seq]) == 6
    ratio = store.kv.total_bytes() / one_chat
    print(f"\n{shared} shared tokens, 6 versions of the last question: {ratio:.2f}x one chat")


def test_a_first_version_page_store_is_upgraded_with_its_pages_and_their_use(
    tmp_path: Path,
) -> None:
    path = tmp_path / "chats.kv.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    for statement in kv_store._SCHEMA:  # the first version's tables, as older files have them
        conn.execute(statement)
    conn.execute(f"PRAGMA application_id = {kv_store.KV_APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 1")
    for number, used in ((1, 50.0), (2, 10.0)):
        payload = bytes([number]) * 1000
        conn.execute(
            "INSERT INTO pages (hash, cache, first_position, count, bytes, digest, payload,"
            " last_used) VALUES (?, 0, 0, 1, ?, ?, ?, ?)",
            (bytes([number]) * 16, len(payload), kv_store.payload_digest(payload), payload, used),
        )
    conn.close()

    store = kv_store.KVStore(path)
    try:
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == kv_store.KV_SCHEMA_VERSION
        uses = store.conn.execute("SELECT page_id, last_used FROM page_use ORDER BY page_id")
        assert uses.fetchall() == [(1, 50.0), (2, 10.0)]
        store.set_budget(1500)
        left = store.conn.execute("SELECT hash FROM pages").fetchall()
        assert left == [(bytes([1]) * 16,)], "the least recently used page goes first"
        assert store.conn.execute("SELECT count(*) FROM page_use").fetchone()[0] == 1
    finally:
        store.close()
