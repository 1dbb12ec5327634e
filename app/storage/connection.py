"""What both SQLite files of the app do the same way: open for writing, run one statement,
write in one transaction, and upgrade their schema.

The schema version lives in ``PRAGMA user_version`` (in the header, so it is read
without a table). ``migrations[i]`` moves a file from version ``i`` to ``i + 1``; each
runs inside one transaction together with the version bump, so a crash leaves the file
at a whole version and the next open goes on from there.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from app.storage.errors import SchemaTooNew, StorageWriteError, describe_error
from app.storage.sqlite_file import PAGE_SIZE, read_only_uri

#: One schema step; it runs inside the transaction :func:`migrate` opens for it.
Migration = Callable[[sqlite3.Connection], None]
Params = Sequence[Any] | dict[str, Any]
#: How long a write waits for another connection's lock before it fails as "in use".
BUSY_TIMEOUT_S = 5.0


def connect(path: Path, *, read_only: bool = False, live: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (every write goes through :func:`transaction`),
    usable from the thread that owns the store. ``read_only`` writes nothing at all;
    ``live`` (with it) sees what a writer beside it commits."""
    if read_only:
        target = read_only_uri(path, immutable=False if live else None)
        return sqlite3.connect(
            target, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None,
            check_same_thread=False,
        )  # fmt: skip
    return sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )


def execute(conn: sqlite3.Connection, path: Path, sql: str, params: Params = ()) -> sqlite3.Cursor:
    """One statement; a SQLite error becomes a one-line :class:`StorageError`."""
    try:
        return conn.execute(sql, params if isinstance(params, dict) else tuple(params))
    except sqlite3.Error as error:
        raise describe_error(error, path) from error


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, path: Path) -> Iterator[None]:
    """One atomic write: everything inside commits together or not at all.

    ``BEGIN IMMEDIATE`` takes the write lock first, so a file another process is writing
    fails here (after the busy timeout), before any work. A SQLite error inside becomes a
    one-line :class:`StorageError`; any other exception passes through unchanged.
    """
    execute(conn, path, "BEGIN IMMEDIATE")
    try:
        yield
    except BaseException as error:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        if isinstance(error, sqlite3.Error):
            raise describe_error(error, path) from error
        raise
    try:
        conn.execute("COMMIT")
    except sqlite3.Error as error:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise describe_error(error, path) from error


def table_names(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def check_version(conn: sqlite3.Connection, path: Path, latest: int) -> int:
    """The file's schema version; :class:`SchemaTooNew` if this code cannot read it."""
    version = schema_version(conn)
    if version > latest:
        raise SchemaTooNew(
            f"{path} was written by a newer KV Chat (schema {version}, this version "
            f"reads up to {latest}); update KV Chat or open another file"
        )
    return version


def migrate(conn: sqlite3.Connection, path: Path, migrations: Sequence[Migration]) -> int:
    """Bring the file up to version ``len(migrations)``; returns the version it had."""
    version = check_version(conn, path, len(migrations))
    for target in range(version, len(migrations)):
        with transaction(conn, path):
            migrations[target](conn)
            conn.execute(f"PRAGMA user_version = {target + 1}")
    return version


def configure_writer(conn: sqlite3.Connection, path: Path, *, journal_limit: int) -> None:
    """The settings of a writable connection: foreign keys, WAL with ``synchronous =
    NORMAL`` (a power cut may lose the last commits, never corrupt the file), a WAL kept
    under ``journal_limit`` bytes; for a new file also our page size and incremental
    auto-vacuum (only possible before the first table)."""
    # Reading the schema first turns "file is not a database" into an error here.
    objects = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    conn.execute("PRAGMA foreign_keys = ON")
    if not objects:
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StorageWriteError(f"cannot use WAL journal for {path} (got {mode})")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(f"PRAGMA journal_size_limit = {journal_limit}")
    # With 64 KiB pages SQLite's default (1000 pages) would let the WAL reach 64 MB.
    conn.execute(f"PRAGMA wal_autocheckpoint = {max(1, journal_limit // PAGE_SIZE)}")
