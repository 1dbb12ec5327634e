"""The KV store: saved model states as shared pages, in a SQLite file of their own.

Messages are precious and live in the chats database; KV pages are a cache that can be
recomputed, so they live beside it (``chats.db`` → ``chats.kv.db``). Deleting this file
loses no message: the next turn recomputes and says why.

A page is addressed by a hash chain over the model fingerprint, its tokens and their
positions (as vLLM addresses its blocks), so chats and branches with the same prefix
share pages and a save writes only the pages that are new. A chat's state row lists its
pages in order; states whose format is not paged keep their blob whole. The store keeps
its total size under a budget by evicting the least recently used pages that the open
chat does not hold; a chat whose tail pages went restores the prefix that is left.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.storage.errors import StorageError, describe_error
from app.storage.records import pack_tokens, unpack_tokens

KV_SCHEMA_VERSION = 2
KV_APPLICATION_ID = 0x4B564B56  # "KVKV": marks the file as a KV Chat page store
DEFAULT_BUDGET_BYTES = 2 * 1024**3
JOURNAL_LIMIT_BYTES = 64 * 1024**2  # the WAL is truncated back to this after a checkpoint
PAGE_SIZE = 65536

_SCHEMA = (
    """
    CREATE TABLE pages (
        id INTEGER PRIMARY KEY,
        hash BLOB NOT NULL UNIQUE,
        cache INTEGER NOT NULL,
        first_position INTEGER NOT NULL,
        count INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        digest BLOB NOT NULL,
        payload BLOB NOT NULL,
        last_used REAL NOT NULL
    )
    """,
    "CREATE INDEX pages_by_use ON pages(last_used)",
    """
    CREATE TABLE states (
        chat_id INTEGER PRIMARY KEY,
        format_version INTEGER NOT NULL,
        fingerprint TEXT NOT NULL,
        seq_id INTEGER NOT NULL,
        formats TEXT NOT NULL,
        token_ids BLOB NOT NULL,
        whole BLOB,
        checksum INTEGER NOT NULL,
        saved_at REAL NOT NULL
    )
    """,
    """
    CREATE TABLE state_pages (
        chat_id INTEGER NOT NULL REFERENCES states(chat_id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        hash BLOB NOT NULL,
        PRIMARY KEY (chat_id, idx)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX state_pages_by_hash ON state_pages(hash)",
    "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


def _v2_page_use(conn: sqlite3.Connection) -> None:
    """When each page was last used, in a table of its own.

    Updating ``pages.last_used`` made SQLite read each page's megabytes of payload to
    rewrite its row: a save that marked a long chat's pages as used cost time in
    proportion to the chat. ``pages.last_used`` stays (dropping a column rewrites every
    page) but is no longer read.
    """
    conn.execute(
        "CREATE TABLE page_use (page_id INTEGER PRIMARY KEY"
        " REFERENCES pages(id) ON DELETE CASCADE, last_used REAL NOT NULL)"
    )
    conn.execute("INSERT INTO page_use (page_id, last_used) SELECT id, last_used FROM pages")
    conn.execute("CREATE INDEX page_use_by_time ON page_use(last_used)")
    conn.execute("DROP INDEX pages_by_use")


#: Ordered upgrades of the page store; entry i brings user_version i + 1 to i + 2.
_MIGRATIONS = (_v2_page_use,)


def payload_digest(payload: bytes | bytearray | memoryview) -> bytes:
    """A page's checksum: a cryptographic digest, so no edit can fix it up to match."""
    return hashlib.blake2b(payload, digest_size=16).digest()


@dataclass(frozen=True)
class StoredPage:
    hash: bytes
    cache: int
    first_position: int
    count: int
    payload: bytes


@dataclass
class StateRecord:
    """One chat's saved state: what it holds and the pages (or whole blob) that hold it."""

    chat_id: int
    format_version: int
    fingerprint: dict[str, Any]
    seq_id: int
    formats: list[Any]  # per cache, the cell format (null: the cache held no cells)
    token_ids: list[int]
    page_hashes: list[bytes] = field(default_factory=list)
    whole: bool = False
    checksum: int = 0
    saved_at: float = 0.0
    #: Why the row could not be read (its token ids or JSON); the state is then discarded.
    unreadable: str | None = None


@dataclass(frozen=True)
class ChatUsage:
    chat_id: int
    bytes: int  # all the pages this chat's state lists (or its whole blob)
    shared_bytes: int  # of those, pages another chat's state lists too


class KVStore:
    """One open page store. Owned by the thread that owns the model (the only writer)."""

    def __init__(self, path: str | Path, *, budget_bytes: int | None = None) -> None:
        self.path = Path(path)
        self.created = not self.path.exists()
        self.last_gap: str | None = None
        try:
            self.conn = sqlite3.connect(
                self.path, timeout=5.0, isolation_level=None, check_same_thread=False
            )
            self._configure()
        except sqlite3.Error as error:
            with contextlib.suppress(sqlite3.Error):
                self.conn.close()
            raise describe_error(error, self.path) from error
        stored = self._query("SELECT value FROM settings WHERE key = 'budget_bytes'")
        self.budget_bytes = int(stored[0][0]) if stored else DEFAULT_BUDGET_BYTES
        if budget_bytes is not None:
            self.set_budget(budget_bytes)

    def set_budget(self, budget_bytes: int) -> None:
        """The most bytes of pages to keep (kept in this file); evicts down to it at once."""
        if budget_bytes <= 0:
            raise ValueError("the KV storage budget must be greater than 0")
        with self.transaction():
            self.conn.execute(
                "INSERT OR REPLACE INTO settings (key, value) VALUES ('budget_bytes', ?)",
                (str(budget_bytes),),
            )
        self.budget_bytes = budget_bytes
        self.enforce_budget()

    def _configure(self) -> None:
        conn = self.conn
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        application = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if tables and application != KV_APPLICATION_ID:
            raise StorageError(f"{self.path} is not a KV Chat page store; move it away")
        if version > KV_SCHEMA_VERSION:
            raise StorageError(f"{self.path} was written by a newer KV Chat")
        if not tables:
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only before the first table
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_LIMIT_BYTES}")
        if version == 0:
            with self.transaction():
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA application_id = {KV_APPLICATION_ID}")
                conn.execute("PRAGMA user_version = 1")
            version = 1
        for target in range(version + 1, KV_SCHEMA_VERSION + 1):
            with self.transaction():
                _MIGRATIONS[target - 2](conn)
                conn.execute(f"PRAGMA user_version = {target}")

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            raise describe_error(error, self.path) from error
        try:
            yield
        except BaseException as error:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            if isinstance(error, sqlite3.Error):
                raise describe_error(error, self.path) from error
            raise
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error as error:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise describe_error(error, self.path) from error

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self.conn.execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as error:
            raise describe_error(error, self.path) from error

    # -- pages ----------------------------------------------------------------------

    def known_pages(self, hashes: Iterable[bytes]) -> set[bytes]:
        wanted = list(hashes)
        known: set[bytes] = set()
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._query(f"SELECT hash FROM pages WHERE hash IN ({marks})", chunk)
            known.update(row[0] for row in rows)
        return known

    def read_pages(self, hashes: Sequence[bytes]) -> list[StoredPage]:
        """The pages in order, stopping at the first one that is missing or damaged.

        ``last_gap`` then says which, for the caller's message.
        """
        self.last_gap: str | None = None
        pages: list[StoredPage] = []
        now = time.time()
        for digest in hashes:
            rows = self._query(
                "SELECT id, cache, first_position, count, bytes, digest FROM pages WHERE hash = ?",
                (digest,),
            )
            if not rows:
                self.last_gap = f"page {len(pages) + 1} was evicted from the KV store"
                break
            row_id, cache, first, count, size, digest_stored = rows[0]
            try:
                with self.conn.blobopen("pages", "payload", row_id, readonly=True) as blob:
                    payload = blob.read()
            except sqlite3.Error as error:
                raise describe_error(error, self.path) from error
            if len(payload) != size or payload_digest(payload) != digest_stored:
                self.last_gap = f"page {len(pages) + 1} failed its checksum (damaged bytes)"
                break
            pages.append(StoredPage(digest, cache, first, count, payload))
        if pages:
            self._touch([page.hash for page in pages], now)
        return pages

    def _touch(self, hashes: list[bytes], when: float) -> None:
        with self.transaction():
            self.conn.executemany(
                "UPDATE page_use SET last_used = ?"
                " WHERE page_id = (SELECT id FROM pages WHERE hash = ?)",
                [(when, h) for h in hashes],
            )

    # -- states ---------------------------------------------------------------------

    def save_state(
        self,
        record: StateRecord,
        new_pages: Sequence[StoredPage] = (),
        whole: bytes | bytearray | None = None,
    ) -> int:
        """Replace the chat's state; write only ``new_pages``. Returns the bytes written."""
        now = time.time()
        written = 0
        with self.transaction():
            for page in new_pages:
                cursor = self.conn.execute(
                    "INSERT OR IGNORE INTO pages (hash, cache, first_position, count, bytes,"
                    " digest, payload, last_used) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        page.hash,
                        page.cache,
                        page.first_position,
                        page.count,
                        len(page.payload),
                        payload_digest(page.payload),
                        page.payload,
                        now,
                    ),
                )
                if cursor.rowcount:
                    written += len(page.payload)
                    self.conn.execute(
                        "INSERT INTO page_use (page_id, last_used) VALUES (?, ?)",
                        (cursor.lastrowid, now),
                    )
            self.conn.execute(
                "INSERT OR REPLACE INTO states (chat_id, format_version, fingerprint, seq_id,"
                " formats, token_ids, whole, checksum, saved_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.chat_id,
                    record.format_version,
                    json.dumps(record.fingerprint, sort_keys=True),
                    record.seq_id,
                    json.dumps(record.formats),
                    pack_tokens(record.token_ids),
                    whole,
                    record.checksum,
                    now,
                ),
            )
            self.conn.execute("DELETE FROM state_pages WHERE chat_id = ?", (record.chat_id,))
            self.conn.executemany(
                "INSERT INTO state_pages (chat_id, idx, hash) VALUES (?, ?, ?)",
                [(record.chat_id, i, digest) for i, digest in enumerate(record.page_hashes)],
            )
            self.conn.executemany(
                "UPDATE page_use SET last_used = ?"
                " WHERE page_id = (SELECT id FROM pages WHERE hash = ?)",
                [(now, digest) for digest in record.page_hashes],
            )
            # Pages no state lists any more (e.g. the last turn's partial page) go now.
            orphans = self.conn.execute(
                "DELETE FROM pages WHERE hash NOT IN (SELECT hash FROM state_pages)"
            ).rowcount
        written += len(whole) if whole else 0
        if orphans:
            self.reclaim()
        if written > JOURNAL_LIMIT_BYTES // 4:
            self.checkpoint()
        return written

    def state(self, chat_id: int) -> StateRecord | None:
        rows = self._query(
            "SELECT format_version, fingerprint, seq_id, formats, token_ids, whole IS NOT NULL,"
            " checksum, saved_at FROM states WHERE chat_id = ?",
            (chat_id,),
        )
        if not rows:
            return None
        version, fingerprint, seq_id, formats, tokens, whole, checksum, saved_at = rows[0]
        try:
            fingerprint_data = json.loads(fingerprint)
            format_data = json.loads(formats)
            token_ids = unpack_tokens(tokens)
        except (TypeError, ValueError) as error:  # rejected (and deleted) with this reason
            return StateRecord(chat_id, -1, {}, 0, [], [], unreadable=f"unreadable: {error}")
        hashes = [
            row[0]
            for row in self._query(
                "SELECT hash FROM state_pages WHERE chat_id = ? ORDER BY idx", (chat_id,)
            )
        ]
        return StateRecord(
            chat_id,
            version,
            fingerprint_data,
            seq_id,
            format_data,
            token_ids,
            hashes,
            bool(whole),
            checksum,
            saved_at,
        )

    def read_whole(self, chat_id: int) -> bytes | None:
        rows = self._query("SELECT rowid FROM states WHERE chat_id = ? AND whole IS NOT NULL",
                           (chat_id,))
        if not rows:
            return None
        try:
            with self.conn.blobopen("states", "whole", rows[0][0], readonly=True) as blob:
                return blob.read()
        except sqlite3.Error as error:
            raise describe_error(error, self.path) from error

    def any_state_shape(self, fingerprint: str) -> tuple[int, list[Any]] | None:
        """Sequence id and cell formats of any paged state saved under ``fingerprint``."""
        rows = self._query(
            "SELECT seq_id, formats FROM states WHERE fingerprint = ? AND whole IS NULL LIMIT 1",
            (fingerprint,),
        )
        if not rows:
            return None
        try:
            return int(rows[0][0]), json.loads(rows[0][1])
        except (TypeError, ValueError):
            return None

    def copy_state(self, source: int, target: int) -> None:
        """Give ``target`` the state of ``source`` (its page list; no page is copied)."""
        with self.transaction():
            self.conn.execute("DELETE FROM states WHERE chat_id = ?", (target,))
            self.conn.execute(
                "INSERT INTO states (chat_id, format_version, fingerprint, seq_id, formats,"
                " token_ids, whole, checksum, saved_at) SELECT ?, format_version, fingerprint,"
                " seq_id, formats, token_ids, whole, checksum, saved_at FROM states"
                " WHERE chat_id = ?",
                (target, source),
            )
            self.conn.execute(
                "INSERT INTO state_pages (chat_id, idx, hash) SELECT ?, idx, hash"
                " FROM state_pages WHERE chat_id = ?",
                (target, source),
            )

    def saved_token_ids(self, chat_id: int) -> list[int]:
        rows = self._query("SELECT token_ids FROM states WHERE chat_id = ?", (chat_id,))
        try:
            return unpack_tokens(rows[0][0]) if rows else []
        except ValueError:
            return []

    def delete_state(self, chat_id: int) -> None:
        """Forget a chat's state and free the pages no other state lists."""
        with self.transaction():
            self.conn.execute("DELETE FROM states WHERE chat_id = ?", (chat_id,))
            self.conn.execute(
                "DELETE FROM pages WHERE hash NOT IN (SELECT hash FROM state_pages)"
            )
        self.reclaim()

    # -- size -----------------------------------------------------------------------

    def total_bytes(self) -> int:
        """Every page once, plus whole blobs."""
        pages = self._query("SELECT coalesce(sum(bytes), 0) FROM pages")[0][0]
        whole = self._query("SELECT coalesce(sum(length(whole)), 0) FROM states")[0][0]
        return int(pages) + int(whole)

    def usage(self, chat_id: int | None = None) -> list[ChatUsage]:
        """Bytes per chat (one chat's, with ``chat_id``): what deleting it would not free
        is in ``shared_bytes``."""
        where = "" if chat_id is None else "WHERE s.chat_id = ?"
        rows = self._query(
            f"""
            SELECT s.chat_id,
                   coalesce(sum(p.bytes), 0) + coalesce(length(s.whole), 0),
                   coalesce(sum(CASE WHEN (SELECT count(DISTINCT o.chat_id) FROM state_pages o
                                           WHERE o.hash = sp.hash) > 1
                                     THEN p.bytes END), 0)
            FROM states s
            LEFT JOIN state_pages sp ON sp.chat_id = s.chat_id
            LEFT JOIN pages p ON p.hash = sp.hash
            {where}
            GROUP BY s.chat_id ORDER BY s.chat_id
            """,
            () if chat_id is None else (chat_id,),
        )
        return [ChatUsage(int(c), int(b), int(s)) for c, b, s in rows]

    def enforce_budget(self, keep: Iterable[bytes] = ()) -> int:
        """Evict least recently used pages outside ``keep`` until under budget. Bytes freed."""
        excess = self.total_bytes() - self.budget_bytes
        if excess <= 0:
            return 0
        protected = set(keep)
        victims: list[tuple[bytes, int]] = []
        # Oldest first; within one save, the last pages first: a prefix stays restorable.
        query = (
            "SELECT hash, bytes FROM pages JOIN page_use ON page_use.page_id = pages.id"
            " ORDER BY page_use.last_used, pages.first_position DESC"
        )
        for digest, size in self._query(query):
            if digest in protected:
                continue
            victims.append((digest, int(size)))
            excess -= int(size)
            if excess <= 0:
                break
        with self.transaction():
            self.conn.executemany("DELETE FROM pages WHERE hash = ?", [(d,) for d, _ in victims])
        self.reclaim()
        return sum(size for _, size in victims)

    def checkpoint(self) -> None:
        """Fold the WAL into the file and truncate it (large writes would leave it huge)."""
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def reclaim(self) -> None:
        """Give freed pages back to the file system, then truncate the WAL."""
        with contextlib.suppress(sqlite3.Error):
            # executescript steps the pragma to the end; execute() would free one page only.
            self.conn.executescript("PRAGMA incremental_vacuum;")
        self.checkpoint()
