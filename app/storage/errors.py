"""Storage errors, each explained in one line fit to show a user."""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = [
    "DatabaseCorrupt",
    "DatabaseInUse",
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



def describe_error(error: sqlite3.Error, path: Path) -> StorageError:
    text = str(error).lower()
    if isinstance(error, sqlite3.DatabaseError) and (
        "not a database" in text or "malformed" in text or "corrupt" in text
    ):
        return DatabaseCorrupt(f"{path} is not a readable KV Chat database ({error})")
    if "full" in text:
        return StorageWriteError(f"cannot write {path}: the disk is full")
    if "readonly" in text or "read-only" in text:
        return StorageWriteError(f"cannot write {path}: the file or its folder is read-only")
    if "unable to open" in text:
        return StorageWriteError(
            f"cannot open {path}: check that the folder exists and is writable"
        )
    if "locked" in text or "busy" in text:
        return DatabaseInUse(f"{path} is locked by another process; try again")
    return StorageError(f"database error in {path}: {error}")
