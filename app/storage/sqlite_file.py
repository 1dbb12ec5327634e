"""The bytes of our SQLite files, read before SQLite opens them: both the chats database
and the KV page store use these (no SQL here, and no import of the rest of storage, so
the error translation can use the page size too)."""

from __future__ import annotations

import contextlib
from pathlib import Path

#: Page size of both files. Saved states are tens of MB: 64 KiB pages make their
#: overflow chains 16x shorter than SQLite's default 4 KiB.
PAGE_SIZE = 65536
SQLITE_MAGIC = b"SQLite format 3\x00"
HEADER_SIZE = 100
#: Offsets in the 100-byte database header (https://sqlite.org/fileformat.html).
_PAGE_SIZE_AT, _READ_VERSION_AT, _PAGE_COUNT_AT, _APPLICATION_ID_AT = 16, 18, 28, 68
_WAL_READ_VERSION = 2


def _header(path: Path) -> bytes:
    with path.open("rb") as handle:
        return handle.read(HEADER_SIZE)


def application_id(path: Path) -> int:
    """The header's ``PRAGMA application_id`` (0 if the file is shorter than a header)."""
    field = _header(path)[_APPLICATION_ID_AT : _APPLICATION_ID_AT + 4]
    return int.from_bytes(field, "big") if len(field) == 4 else 0


def truncation(path: Path) -> str | None:
    """Why the non-empty file at ``path`` cannot be read safely (not SQLite, or its header
    counts more pages than it holds), or None. Raises OSError if it cannot be read."""
    size = path.stat().st_size
    if size == 0:
        return None
    header = _header(path)
    if len(header) < HEADER_SIZE or not header.startswith(SQLITE_MAGIC):
        return "it is not a SQLite database"
    page_size = int.from_bytes(header[_PAGE_SIZE_AT : _PAGE_SIZE_AT + 2], "big")
    page_size = 65536 if page_size == 1 else page_size  # the header's way to write 64 KiB
    pages = int.from_bytes(header[_PAGE_COUNT_AT : _PAGE_COUNT_AT + 4], "big")
    if page_size * pages > size:
        return f"it is truncated ({size} of {page_size * pages} bytes)"
    return None


def read_only_uri(path: Path, *, immutable: bool | None = None) -> str:
    """A ``mode=ro`` URI for ``path``. ``immutable`` None: immutable when the file is in WAL
    mode without a WAL (nothing to read from one, and SQLite would otherwise create
    -wal/-shm files and leave them behind); a live reader passes False."""
    if immutable is None:
        wal_mode = False
        with contextlib.suppress(OSError):
            header = _header(path)
            wal_mode = len(header) > _READ_VERSION_AT and (
                header[_READ_VERSION_AT] == _WAL_READ_VERSION
            )
        immutable = wal_mode and not path.with_name(path.name + "-wal").exists()
    uri = path.resolve().as_uri() + "?mode=ro"
    return uri + "&immutable=1" if immutable else uri
