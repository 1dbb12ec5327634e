"""The KV store: saved model states as shared pages, in a SQLite file of their own.

Messages are precious and live in the chats database; KV pages are a cache that can be
recomputed, so they live beside it (``chats.db`` → ``chats.kv.db``). Deleting this file
loses no message: the next turn recomputes and says why.

A page is addressed by a hash chain over the model fingerprint, its tokens and their
positions (as vLLM addresses its blocks), so chats and branches with the same prefix
share pages and a save writes only the pages that are new.

Nothing in this file is trusted: every page carries a MAC (keyed BLAKE2b) over its
address, its cache and cell format and its bytes, and every state row a MAC over its
chat id, fingerprint, formats, token ids and page list, both keyed by a random secret
kept in the chats database (never here). A payload replaced with any digest public code
can compute, a page row copied to another address, or a state row copied to another
chat fails its MAC and is not used. The file also records which chats database it
belongs to (an id derived from the secret), so another database's KV file is never
written over. A chat's state row lists its
pages in order; states whose format is not paged keep their blob whole. The store keeps
its total size under a budget by evicting the least recently used pages that the open
chat does not hold; a chat whose tail pages went restores the prefix that is left.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import sqlite3
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from app.storage import connection
from app.storage.connection import Migration
from app.storage.errors import StorageError, describe_error
from app.storage.records import pack_tokens, unpack_tokens

KV_APPLICATION_ID = 0x4B564B56  # "KVKV": marks the file as a KV Chat page store
DEFAULT_BUDGET_BYTES = 2 * 1024**3
JOURNAL_LIMIT_BYTES = 64 * 1024**2  # the WAL is truncated back to this after a checkpoint

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


def _v1_page_store(conn: sqlite3.Connection) -> None:
    """The first version's tables, marked as a KV Chat page store."""
    for statement in _SCHEMA:
        conn.execute(statement)
    conn.execute(f"PRAGMA application_id = {KV_APPLICATION_ID}")


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


def _v3_signed_states(conn: sqlite3.Connection) -> None:
    """State rows carry a MAC keyed by the chats database's secret.

    Rows from before have none and are rejected (once) at their next restore; pages
    from before carry an unkeyed 16-byte digest, which is never taken for a 32-byte MAC:
    such a page fails its check if read, and is written anew by the next save.
    """
    conn.execute("ALTER TABLE states ADD COLUMN mac BLOB")


#: The page store's ordered migrations: entry i brings user_version i to i + 1 (run by
#: :func:`app.storage.connection.migrate`, as the chats database's are).
KV_MIGRATIONS: tuple[Migration, ...] = (_v1_page_store, _v2_page_use, _v3_signed_states)
KV_SCHEMA_VERSION = len(KV_MIGRATIONS)

MAC_SIZE = 32
KEY_SIZE = 32


def payload_digest(payload: bytes | bytearray | memoryview) -> bytes:
    """The unkeyed digest pages carried before MACs (anyone can compute it)."""
    return hashlib.blake2b(payload, digest_size=16).digest()


def _framed(mac: Any, *parts: bytes | bytearray | memoryview) -> None:
    """Feed ``parts`` to ``mac``, each after its length, so no two inputs run together."""
    for part in parts:
        mac.update(struct.pack("<Q", len(part)))
        mac.update(part)


def page_mac(
    key: bytes,
    address: bytes,
    cache: int,
    first_position: int,
    count: int,
    cell_format: Any,
    payload: bytes | bytearray | memoryview,
) -> bytes:
    """A page's MAC: its address (the hash chain), cache, positions, cell format, bytes."""
    mac = hashlib.blake2b(key=key, digest_size=MAC_SIZE, person=b"kvchat-page")
    header = struct.pack("<qqq", cache, first_position, count)
    _framed(mac, address, header, json.dumps(cell_format).encode(), payload)
    return mac.digest()


def database_id(key: bytes) -> str:
    """Which chats database a KV file belongs to; derived from its secret, reveals nothing."""
    return hashlib.blake2b(b"", key=key, digest_size=16, person=b"kvchat-db-id").hexdigest()


class KVFileOfAnotherDatabase(StorageError):
    """The KV file records another chats database as its owner: it is never written."""


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
    #: Why the row's MAC does not hold (edited, copied from another chat, or unsigned).
    forged: str | None = None


@dataclass(frozen=True)
class ChatUsage:
    chat_id: int
    bytes: int  # all the pages this chat's state lists (or its whole blob)
    shared_bytes: int  # of those, pages another chat's state lists too


def _state_mac(key: bytes, chat_id: int, row: Sequence[Any], hashes: Sequence[bytes],
               whole: bytes | bytearray | None = None) -> bytes:
    """A state row's MAC: ``row`` is (format_version, fingerprint, seq_id, formats,
    token_ids, has_whole, checksum) exactly as stored; ``whole`` the whole blob, if any."""
    version, fingerprint, seq_id, formats, tokens, has_whole, checksum = row
    mac = hashlib.blake2b(key=key, digest_size=MAC_SIZE, person=b"kvchat-state")
    header = struct.pack("<qqqqq", chat_id, version, seq_id, int(bool(has_whole)), checksum)
    _framed(mac, header, _as_bytes(fingerprint), _as_bytes(formats), _as_bytes(tokens),
            b"".join(hashes), whole or b"")
    return mac.digest()


def _as_bytes(value: object) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8", errors="surrogatepass")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"a {type(value).__name__} where text or bytes belong")


class KVStore:
    """One open page store. Owned by the thread that owns the model (the only writer).

    ``key`` is the chats database's secret: pages and states are written and read only
    with it. ``read_only`` opens for figures (sizes, usage) and writes nothing at all.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        key: bytes | None = None,
        budget_bytes: int | None = None,
        read_only: bool = False,
    ) -> None:
        self.path = Path(path)
        self.created = not self.path.exists()
        self.read_only = read_only
        self.key = key
        self.last_gap: str | None = None
        self.damaged_pages: list[bytes] = []
        try:
            self.conn = connection.connect(self.path, read_only=read_only)
            self._check_kind()
            if not read_only:
                connection.configure_writer(self.conn, self.path, journal_limit=JOURNAL_LIMIT_BYTES)
                connection.migrate(self.conn, self.path, KV_MIGRATIONS)
            stored = self._query("SELECT value FROM settings WHERE key = 'budget_bytes'")
        except Exception as error:  # a failed migration too: never leave the file open
            with contextlib.suppress(sqlite3.Error, AttributeError):
                self.conn.close()
            if isinstance(error, sqlite3.Error):
                raise describe_error(error, self.path) from error
            raise
        self.budget_bytes = int(stored[0][0]) if stored else DEFAULT_BUDGET_BYTES
        if key is not None and not read_only:
            self._claim(database_id(key))
        if budget_bytes is not None:
            self.set_budget(budget_bytes)

    def _claim(self, owner: str) -> None:
        """Record the chats database this file belongs to; refuse another's file."""
        stored = self._query("SELECT value FROM settings WHERE key = 'database'")
        if stored and stored[0][0] != owner:
            self.close()
            raise KVFileOfAnotherDatabase(f"{self.path} belongs to another chats database")
        if not stored:
            with self.transaction():
                self.conn.execute(
                    "INSERT INTO settings (key, value) VALUES ('database', ?)", (owner,)
                )

    def _signing_key(self) -> bytes:
        if self.key is None or self.read_only:
            raise StorageError(f"{self.path} is open without its database's key")
        return self.key

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

    def _check_kind(self) -> None:
        """Refuse a file that is not a page store of ours, or one too new to read."""
        conn = self.conn
        application = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if tables and application != KV_APPLICATION_ID:
            raise StorageError(f"{self.path} is not a KV Chat page store; move it away")
        connection.check_version(conn, self.path, len(KV_MIGRATIONS))
        if self.read_only and not tables:
            raise StorageError(f"{self.path} holds no KV pages yet")

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """One atomic write: everything inside commits together or not at all."""
        return connection.transaction(self.conn, self.path)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cursor = connection.execute(self.conn, self.path, sql, params)
        try:
            return cursor.fetchall()
        except sqlite3.Error as error:
            raise describe_error(error, self.path) from error

    # -- pages ----------------------------------------------------------------------

    def known_pages(self, hashes: Iterable[bytes]) -> set[bytes]:
        """The addresses stored with a MAC (a page from before MACs is written anew)."""
        wanted = list(hashes)
        known: set[bytes] = set()
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT hash FROM pages WHERE hash IN ({marks}) AND length(digest) = ?"
            rows = self._query(query, [*chunk, MAC_SIZE])
            known.update(row[0] for row in rows)
        return known

    def read_pages(self, hashes: Sequence[bytes], formats: Sequence[Any]) -> list[StoredPage]:
        """The pages in order, stopping at the first one that is missing or fails its MAC.

        ``formats`` are the cell formats (per cache) the pages are read for. ``last_gap``
        then says which page and why; ``damaged_pages`` lists a page that failed its MAC
        (the caller drops it, so the next save writes it anew).
        """
        key = self._signing_key()
        self.last_gap = None
        self.damaged_pages = []
        pages: list[StoredPage] = []
        now = time.time()
        for address in hashes:
            rows = self._query(
                "SELECT id, cache, first_position, count, bytes, digest FROM pages WHERE hash = ?",
                (address,),
            )
            if not rows:
                self.last_gap = f"page {len(pages) + 1} was evicted from the KV store"
                break
            row_id, cache, first, count, size, mac = rows[0]
            try:
                with self.conn.blobopen("pages", "payload", row_id, readonly=True) as blob:
                    payload = blob.read()
            except sqlite3.Error as error:
                raise describe_error(error, self.path) from error
            row = (address, cache, first, count, mac)
            if len(payload) != size or not self._page_holds(key, row, formats, payload):
                self.last_gap = (
                    f"page {len(pages) + 1} failed its checksum (a MAC keyed by this chats"
                    " database: its bytes, address or format were changed)"
                )
                self.damaged_pages.append(address)
                break
            pages.append(StoredPage(address, cache, first, count, payload))
        if pages:
            self._touch([page.hash for page in pages], now)
        return pages

    @staticmethod
    def _page_holds(
        key: bytes, row: tuple[Any, ...], formats: Sequence[Any], payload: bytes
    ) -> bool:
        address, cache, first, count, mac = row
        if not isinstance(cache, int) or not 0 <= cache < len(formats):
            return False
        try:
            expected = page_mac(key, address, cache, first, count, formats[cache], payload)
        except (TypeError, ValueError, struct.error):  # an edited row: text where ints belong
            return False
        return isinstance(mac, bytes) and hmac.compare_digest(mac, expected)

    def drop_pages(self, hashes: Sequence[bytes]) -> None:
        """Delete pages that failed their MAC, so no later save takes them as stored."""
        if hashes:
            with self.transaction():
                self.conn.executemany("DELETE FROM pages WHERE hash = ?", [(h,) for h in hashes])

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
        key = self._signing_key()
        now = time.time()
        written = 0
        row = (
            record.format_version,
            json.dumps(record.fingerprint, sort_keys=True),
            record.seq_id,
            json.dumps(record.formats),
            pack_tokens(record.token_ids),
            whole is not None,
            record.checksum,
        )
        mac = _state_mac(key, record.chat_id, row, record.page_hashes, whole)
        with self.transaction():
            for page in new_pages:
                # A page from before MACs at this address is replaced, never kept.
                self.conn.execute(
                    "DELETE FROM pages WHERE hash = ? AND length(digest) != ?",
                    (page.hash, MAC_SIZE),
                )
                cell_format = record.formats[page.cache]
                cursor = self.conn.execute(
                    "INSERT OR IGNORE INTO pages (hash, cache, first_position, count, bytes,"
                    " digest, payload, last_used) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        page.hash,
                        page.cache,
                        page.first_position,
                        page.count,
                        len(page.payload),
                        page_mac(key, page.hash, page.cache, page.first_position, page.count,
                                 cell_format, page.payload),
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
                " formats, token_ids, whole, checksum, saved_at, mac)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.chat_id, *row[:5], whole, record.checksum, now, mac),
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
        """The chat's state row; ``forged`` says why its MAC does not hold, if it does not
        (a whole blob's MAC covers the blob too: ``read_whole`` checks that one)."""
        rows = self._query(
            "SELECT format_version, fingerprint, seq_id, formats, token_ids, whole IS NOT NULL,"
            " checksum, saved_at, mac FROM states WHERE chat_id = ?",
            (chat_id,),
        )
        if not rows:
            return None
        hashes = self._state_pages(chat_id)
        record = self._parse_state(chat_id, rows[0], hashes)
        if record.unreadable is None and not record.whole:
            record.forged = self._forgery(chat_id, rows[0], hashes)
        return record

    def _state_pages(self, chat_id: int) -> list[bytes]:
        query = "SELECT hash FROM state_pages WHERE chat_id = ? ORDER BY idx"
        return [row[0] for row in self._query(query, (chat_id,))]

    def _forgery(
        self, chat_id: int, row: Sequence[Any], hashes: Sequence[bytes], whole: bytes | None = None
    ) -> str | None:
        """Why a state row's MAC does not hold, or None when it does."""
        stored = row[8]
        if stored is None:
            return "it was saved by an older KV Chat, before saved states were signed"
        try:
            expected = _state_mac(self._signing_key(), chat_id, row[:7], hashes, whole)
        except (TypeError, ValueError, struct.error, OverflowError):
            expected = b""
        if isinstance(stored, bytes) and hmac.compare_digest(stored, expected):
            return None
        return (
            "its record fails its MAC (keyed by this chats database): it was edited, copied"
            " from another chat, or written for another database"
        )

    @staticmethod
    def _parse_state(chat_id: int, row: Sequence[Any], hashes: list[bytes]) -> StateRecord:
        version, fingerprint, seq_id, formats, tokens, whole, checksum, saved_at = row[:8]
        try:
            fingerprint_data = json.loads(fingerprint)
            format_data = json.loads(formats)
            token_ids = unpack_tokens(tokens)
        except (TypeError, ValueError) as error:  # rejected (and deleted) with this reason
            return StateRecord(chat_id, -1, {}, 0, [], [], unreadable=f"unreadable: {error}")
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

    def read_whole(self, chat_id: int) -> tuple[bytes | None, str | None]:
        """The chat's whole blob and None, or None and why it cannot be used (its MAC,
        over the row and the blob, does not hold)."""
        rows = self._query(
            "SELECT rowid, format_version, fingerprint, seq_id, formats, token_ids,"
            " whole IS NOT NULL, checksum, saved_at, mac FROM states"
            " WHERE chat_id = ? AND whole IS NOT NULL",
            (chat_id,),
        )
        if not rows:
            return None, "the saved state's blob is missing"
        try:
            with self.conn.blobopen("states", "whole", rows[0][0], readonly=True) as blob:
                data = blob.read()
        except sqlite3.Error as error:
            raise describe_error(error, self.path) from error
        forged = self._forgery(chat_id, rows[0][1:], self._state_pages(chat_id), data)
        return (None, forged) if forged else (data, None)

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

    def page_owners(self, page_hash: bytes) -> list[int]:
        """The chats whose saved states list a page, in chat order."""
        rows = self._query(
            "SELECT DISTINCT chat_id FROM state_pages WHERE hash = ? ORDER BY chat_id",
            (page_hash,),
        )
        return [int(row[0]) for row in rows]

    def copy_state(self, source: int, target: int) -> None:
        """Give ``target`` the state of ``source`` (its page list; no page is copied),
        signed for ``target``; a source whose MAC does not hold is not copied."""
        record = self.state(source)
        whole, why = self.read_whole(source) if record and record.whole else (None, None)
        if record is None or record.unreadable or record.forged or why:
            self.delete_state(target)
            return
        self.save_state(replace(record, chat_id=target), whole=whole)

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
