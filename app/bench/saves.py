"""What a turn's save and a reopen cost as a chat grows: paged store vs whole blobs.

For each history size a chat is prefilled (untimed), then one measured turn runs its
commit, warm-up and save. The paged save's bytes and time come from the turn's own
metrics; in the same run the same state is also written whole into a SQLite blob, as
saves worked before pages, so the ratio is measured on one machine at one moment.
Reopen is the restore of the saved pages into an emptied cache, as after a restart.
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from app.bench.script import Script
from app.domain import Role
from app.session.chat_session import ChatSession, GenerationOptions
from app.storage.store import Store

DEFAULT_SIZES = (500, 2000, 4000, 8000)


@dataclass
class SaveSample:
    history_tokens: int
    cache_tokens: int
    state_mb: float
    paged_written_mb: float
    paged_save_ms: float
    whole_written_mb: float
    whole_save_ms: float
    reopen_ms: float
    reopen_tokens: int


def _history(
    session: ChatSession,
    store: Store,
    name: str,
    target: int,
    seed: int,
    block_tokens: int = 400,
) -> int:
    script = Script(session.builder.content_tokens, seed)
    chat = store.create_chat(name)
    store.add_instruction_version(chat.id, script.rules(block_tokens))
    size = 0
    while size < target:
        user = script.user_message(40)
        reply = script.reply(120)
        store.add_message(chat.id, Role.USER, user)
        store.add_message(chat.id, Role.ASSISTANT, reply)
        size += len(session.builder.user_segment(user))
        size += len(session.builder.assistant_segment_from_text(reply))
    return chat.id


def _whole_blob_save(path: Path, blob: bytes | bytearray) -> float:
    """Write the state as one blob in one transaction (how saves worked before pages)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS states (id INTEGER PRIMARY KEY, state BLOB)")
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT OR REPLACE INTO states (id, state) VALUES (1, ?)", (blob,))
        conn.execute("COMMIT")
        return (time.perf_counter() - started) * 1000
    finally:
        conn.close()


def run_save_benchmark(
    model_path: str | Path | None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    n_threads: int | None = None,
    on_sample: Callable[[SaveSample], None] | None = None,
) -> list[SaveSample]:
    samples: list[SaveSample] = []
    options = GenerationOptions(max_tokens=16, temperature=0.0)
    with tempfile.TemporaryDirectory(prefix="kvchat-saves-") as folder:
        store = Store(Path(folder) / "saves.db")
        n_ctx = max(sizes) + 1024
        session = ChatSession(store, model_path, n_ctx=n_ctx, n_threads=n_threads)
        try:
            for index, size in enumerate(sizes):
                chat_id = _history(session, store, f"chat {size}", size, index)
                session.after_reply(chat_id)  # prefill and first save: untimed
                session.send(chat_id, "And what should I plant next to them?", options)
                metrics = session.after_reply(chat_id)
                assert metrics is not None
                blob = session.mirror.snapshot()
                whole_ms = _whole_blob_save(Path(folder) / "whole.db", blob)
                session.forget_chat(chat_id)
                load = session.activate(chat_id)
                sample = SaveSample(
                    history_tokens=size,
                    cache_tokens=metrics.cache_tokens,
                    state_mb=metrics.state_bytes / 1e6,
                    paged_written_mb=metrics.state_bytes_written / 1e6,
                    paged_save_ms=metrics.state_save_ms or 0.0,
                    whole_written_mb=len(blob) / 1e6,
                    whole_save_ms=whole_ms,
                    reopen_ms=load.ms or 0.0,
                    reopen_tokens=load.tokens,
                )
                samples.append(sample)
                if on_sample is not None:
                    on_sample(sample)
        finally:
            session.close()
            store.close()
    return samples


def format_saves(samples: Sequence[SaveSample]) -> str:
    header = (
        f"{'history':>8} {'cache':>6} {'state':>7} {'paged':>7} {'paged':>7} {'whole':>7} "
        f"{'whole':>7} {'reopen':>7}\n"
        f"{'tokens':>8} {'tokens':>6} {'MB':>7} {'MB wr.':>7} {'save ms':>7} {'MB wr.':>7} "
        f"{'save ms':>7} {'ms':>7}"
    )
    rows = [
        f"{s.history_tokens:>8} {s.cache_tokens:>6} {s.state_mb:>7.1f} {s.paged_written_mb:>7.1f} "
        f"{s.paged_save_ms:>7.0f} {s.whole_written_mb:>7.1f} {s.whole_save_ms:>7.0f} "
        f"{s.reopen_ms:>7.0f}"
        for s in samples
    ]
    if len(samples) >= 2:
        first, last = samples[0], samples[-1]
        written = last.paged_written_mb / first.paged_written_mb
        rows.append(
            f"largest / smallest: paged written x{written:.1f},"
            f" paged save x{last.paged_save_ms / first.paged_save_ms:.1f};"
            f" whole written x{last.whole_written_mb / first.whole_written_mb:.1f},"
            f" whole save x{last.whole_save_ms / first.whole_save_ms:.1f}"
        )
    return "\n".join([header, *rows])


def saves_as_json(samples: Sequence[SaveSample]) -> list[dict[str, Any]]:
    return [asdict(sample) for sample in samples]


@dataclass
class BranchSample:
    """One version of the chat's last question: what it reused and what it added on disk."""

    version: int
    reused_tokens: int
    prefill_tokens: int
    ttft_ms: float
    added_mb: float
    total_mb: float


def run_branch_benchmark(
    model_path: str | Path | None,
    history_tokens: int = 3000,
    branches: int = 5,
    *,
    block_tokens: int = 400,
    n_threads: int | None = None,
    on_sample: Callable[[BranchSample], None] | None = None,
) -> tuple[float, list[BranchSample]]:
    """A chat of ``history_tokens``, then ``branches`` edits of its last question, each a
    branch (as Edit in the app does). Returns one chat's saved MB and a sample per branch."""
    options = GenerationOptions(max_tokens=16, temperature=0.0)
    samples: list[BranchSample] = []
    with tempfile.TemporaryDirectory(prefix="kvchat-branches-") as folder:
        store = Store(Path(folder) / "branches.db")
        session = ChatSession(
            store, model_path, n_ctx=history_tokens + 1024, n_threads=n_threads
        )
        try:
            chat_id = _history(session, store, "original", history_tokens, 0, block_tokens)
            session.after_reply(chat_id)
            session.send(chat_id, "And what should I plant next to them?", options)
            session.after_reply(chat_id)
            one_chat_mb = store.kv.usage(chat_id)[0].bytes / 1e6
            edited = store.messages(chat_id)[-2].seq
            for version in range(1, branches + 1):
                before = store.kv.total_bytes()
                branch = store.branch_chat(chat_id, edited)
                result = session.send(
                    branch.id, f"And what grows well in shade? (version {version})", options
                )
                session.after_reply(branch.id)
                sample = BranchSample(
                    version=version,
                    reused_tokens=result.metrics.reused_tokens,
                    prefill_tokens=result.metrics.prefill_tokens,
                    ttft_ms=result.metrics.ttft_ms or 0.0,
                    added_mb=(store.kv.total_bytes() - before) / 1e6,
                    total_mb=store.kv.total_bytes() / 1e6,
                )
                samples.append(sample)
                if on_sample is not None:
                    on_sample(sample)
        finally:
            session.close()
            store.close()
    return one_chat_mb, samples


def format_branches(one_chat_mb: float, samples: Sequence[BranchSample]) -> str:
    rows = [f"one chat: {one_chat_mb:.1f} MB saved"]
    rows.append(
        f"{'branch':>6} {'reused':>7} {'prefill':>7} {'TTFT ms':>8} {'+MB':>6} {'total MB':>9}"
    )
    rows += [
        f"{s.version:>6} {s.reused_tokens:>7} {s.prefill_tokens:>7} {s.ttft_ms:>8.0f} "
        f"{s.added_mb:>6.2f} {s.total_mb:>9.1f}"
        for s in samples
    ]
    if samples:
        # The original plus the branches, against the original alone.
        rows.append(
            f"{len(samples)} branches + the original: x{samples[-1].total_mb / one_chat_mb:.2f}"
            " the storage of one chat"
        )
    return "\n".join(rows)
