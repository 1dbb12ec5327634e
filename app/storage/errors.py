"""Storage errors, each explained in one line fit to show a user."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from app.storage.sqlite_file import PAGE_SIZE

__all__ = [
    "DatabaseCorrupt",
    "DatabaseInUse",
    "NotOurDatabase",
    "SchemaTooNew",
    "StorageError",
    "StorageWriteError",
    "describe_error",
]


class StorageError(Exception):
    """A database problem explained in one line."""


class DatabaseCorrupt(StorageError):
    pass


class SchemaTooNew(StorageError):
    pass


class DatabaseInUse(StorageError):
    pass


class StorageWriteError(StorageError):
    pass


class ChatNotFound(StorageError):
    """The chat (or message) is not in the database: it was deleted meanwhile."""


class UniqueConflict(StorageError):
    """A write would duplicate a value that must be unique (e.g. a chat's name)."""


class NotOurDatabase(StorageError):
    """Another application's SQLite file: never written to."""


#: SQLite primary result codes (sqlite3.h), read from sqlite3.Error.sqlite_errorcode.
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, SQLITE_IOERR = 5, 6, 8, 10
SQLITE_CORRUPT, SQLITE_FULL, SQLITE_CANTOPEN, SQLITE_NOTADB = 11, 13, 14, 26
SQLITE_CONSTRAINT_UNIQUE = 2067  # an extended result code
#: Below this much free space an I/O error is taken to be the disk filling up
#: (SQLite reports ENOSPC during a write as SQLITE_IOERR_WRITE, not SQLITE_FULL).
LOW_SPACE_BYTES = 4 * PAGE_SIZE


def _free_bytes(path: Path) -> int | None:
    try:
        stats = os.statvfs(path.parent if not path.is_dir() else path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def describe_error(error: sqlite3.Error, path: Path) -> StorageError:
    """A one-line StorageError for ``error``, chosen by SQLite's result code."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is None:  # not raised by SQLite itself (e.g. the driver): no code to go by
        return StorageError(f"database error in {path}: {error}")
    if code == SQLITE_CONSTRAINT_UNIQUE:
        return UniqueConflict(f"{path}: {error}")
    primary = code & 0xFF
    if primary in (SQLITE_CORRUPT, SQLITE_NOTADB):
        return DatabaseCorrupt(f"{path} is not a readable KV Chat database ({error})")
    if primary == SQLITE_FULL:
        return StorageWriteError(f"cannot write {path}: the disk is full")
    if primary == SQLITE_IOERR:
        free = _free_bytes(path)
        if free is not None and free < LOW_SPACE_BYTES:
            return StorageWriteError(f"cannot write {path}: the disk is full")
        return StorageWriteError(f"cannot write {path}: {error}")
    if primary == SQLITE_READONLY:
        return StorageWriteError(f"cannot write {path}: the file or its folder is read-only")
    if primary == SQLITE_CANTOPEN:
        return StorageWriteError(f"cannot open {path}: check that the folder exists")
    if primary in (SQLITE_BUSY, SQLITE_LOCKED):
        return DatabaseInUse(f"{path} is locked by another process; try again")
    return StorageError(f"database error in {path}: {error}")
