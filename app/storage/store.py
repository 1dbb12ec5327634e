"""All SQL of the app: chats, messages, instruction versions, saved states, metrics.

Durability rules: WAL journal, foreign keys on, every write in one explicit
transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``), schema version checked at open.
SQLite errors are translated into :class:`StorageError` subclasses whose message
is fit to show a user.

sqlite-utils holds the connection and answers queries; writes are hand-written SQL
because each must sit inside one explicit transaction with its neighbours, and saved
states need incremental blob I/O, neither of which its table helpers expose.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlite_utils

from app.domain import Layout, TrimMode
from app.storage.errors import (
    DatabaseCorrupt,
    DatabaseInUse,
    SchemaTooNew,
    StorageError,
    StorageWriteError,
    describe_error,
)
from app.storage.kv_store import KVStore
from app.storage.migrations import MIGRATIONS, SCHEMA_VERSION
from app.storage.records import (
    Chat,
    InstructionVersion,
    Message,
    TurnMetricsRow,
    pack_tokens,
    storable_text,
)

PAGE_SIZE = 65536
_CHAT_FIELDS = {"name", "layout", "trim_tokens", "trim_mode", "cache_start_seq"}


def _valid_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise ValueError("a chat needs a name")
    if isinstance(storable_text(name), bytes) or "\x00" in name:
        raise ValueError("a chat name cannot contain NUL or unpaired surrogate characters")
    return name


SQLITE_MAGIC = b"SQLite format 3\x00"


def _check_file_header(path: Path) -> None:
    """Catch a foreign or truncated file before SQLite half-reads it."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    except OSError as error:
        raise StorageWriteError(f"cannot open {path}: {error.strerror}") from error
    if size == 0:
        return
    try:
        with path.open("rb") as handle:
            header = handle.read(100)
    except OSError as error:
        raise StorageError(f"cannot read {path}: {error.strerror}") from error
    if not header.startswith(SQLITE_MAGIC) or len(header) < 100:
        raise DatabaseCorrupt(f"{path} is not a SQLite database")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    if page_size * pages > size:
        raise DatabaseCorrupt(
            f"{path} is truncated ({size} of {page_size * pages} bytes); it cannot be read safely"
        )


def set_aside(path: str | os.PathLike[str]) -> Path:
    """Rename an unreadable database (and its WAL/SHM files) out of the way, never delete it.

    Returns the new name of the old file; ``path`` is then free for a fresh database.
    """
    source = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = source.with_name(f"{source.name}.unreadable-{stamp}")
    counter = 1
    while target.exists():
        counter += 1
        target = source.with_name(f"{source.name}.unreadable-{stamp}-{counter}")
    for suffix in ("-wal", "-shm"):
        companion = source.with_name(source.name + suffix)
        if companion.exists():
            companion.rename(target.with_name(target.name + suffix))
    source.rename(target)
    return target


class Store:
    """One open database. Not shared between threads: the engine worker owns it."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        exclusive: bool = False,
    ) -> None:
        self.path = Path(path)
        self._kv: KVStore | None = None
        self._lock_file: int | None = None
        _check_file_header(self.path)
        if exclusive:
            self._take_process_lock()
        try:
            conn = sqlite3.connect(
                self.path, timeout=5.0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as error:
            self._release_process_lock()
            raise describe_error(error, self.path) from error
        self.db = sqlite_utils.Database(conn)
        try:
            self._configure()
            self._migrate()
        except sqlite3.Error as error:
            self.close()
            raise describe_error(error, self.path) from error
        except StorageError:
            self.close()
            raise

    # -- opening --------------------------------------------------------------------

    def _take_process_lock(self) -> None:
        """Refuse a second app on the same database: two writers would fight over states."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise StorageWriteError(f"cannot create {lock_path}: {error.strerror}") from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            raise DatabaseInUse(
                f"{self.path} is already open in another KV Chat window or process"
            ) from error
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_file = fd

    def _release_process_lock(self) -> None:
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                os.close(self._lock_file)
            self._lock_file = None

    def _configure(self) -> None:
        # Reading the schema first turns "file is not a database" into an error here.
        self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        self.db.execute("PRAGMA foreign_keys = ON")
        if self.schema_version() == 0 and not self.db.table_names():
            # Saved states are tens of MB: 64 KiB pages make their overflow chains 16x shorter.
            # Only possible before the first table and the switch to WAL.
            self.db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StorageWriteError(f"cannot use WAL journal for {self.path} (got {mode})")
        self.db.execute("PRAGMA synchronous = NORMAL")

    def _migrate(self) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"{self.path} was written by a newer KV Chat (schema {version}, this version "
                f"reads up to {SCHEMA_VERSION}); update KV Chat or open another database"
            )
        for target in range(version, SCHEMA_VERSION):
            with self.transaction():
                MIGRATIONS[target](self.db)
                self.db.execute(f"PRAGMA user_version = {target + 1}")
        if version > 0:
            # The tables must exist at the version the file claims.
            missing = {"chats", "messages"} - set(self.db.table_names())
            if missing:
                raise DatabaseCorrupt(f"{self.path} lacks tables {sorted(missing)}")

    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        if self._kv is not None:
            self._kv.close()
            self._kv = None
        with contextlib.suppress(sqlite3.Error):
            self.db.conn.close()
        self._release_process_lock()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic write: everything inside commits together or not at all."""
        conn = self.db.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            raise describe_error(error, self.path) from error
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as error:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise describe_error(error, self.path) from error

    def _write(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> sqlite3.Cursor:
        try:
            return self.db.execute(sql, params)
        except sqlite3.Error as error:
            raise describe_error(error, self.path) from error

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        try:
            return list(self.db.query(sql, params))
        except sqlite3.Error as error:
            raise describe_error(error, self.path) from error

    # -- chats ----------------------------------------------------------------------

    def create_chat(self, name: str, layout: str = "history-first") -> Chat:
        name = _valid_name(name)
        if layout not in tuple(Layout):
            raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(Layout)}")
        now = time.time()
        with self.transaction():
            try:
                cursor = self._write(
                    "INSERT INTO chats (name, layout, created_at, updated_at) VALUES (?, ?, ?, ?)",
                    (name, layout, now, now),
                )
            except StorageError as error:
                if "unique" in str(error).lower():
                    raise ValueError(f"a chat named {name!r} already exists") from error
                raise
        return self.chat(cursor.lastrowid)

    def chat(self, chat_id: int) -> Chat:
        rows = self._rows("SELECT * FROM chats WHERE id = ?", (chat_id,))
        if not rows:
            raise KeyError(f"no chat with id {chat_id}")
        return Chat(**rows[0])

    def chat_by_name(self, name: str) -> Chat | None:
        rows = self._rows("SELECT * FROM chats WHERE name = ?", (name,))
        return Chat(**rows[0]) if rows else None

    def chats(self, search: str = "") -> list[Chat]:
        """Chats, most recently used first; ``search`` matches names and message text."""
        if not search:
            rows = self._rows("SELECT * FROM chats ORDER BY updated_at DESC, id DESC")
        else:
            pattern = f"%{search}%"
            rows = self._rows(
                """
                SELECT * FROM chats WHERE name LIKE ?1 OR id IN (
                    SELECT chat_id FROM messages WHERE text LIKE ?1
                ) ORDER BY updated_at DESC, id DESC
                """,
                (pattern,),
            )
        return [Chat(**row) for row in rows]

    def update_chat(self, chat_id: int, **fields: Any) -> Chat:
        unknown = set(fields) - _CHAT_FIELDS
        if unknown:
            raise ValueError(f"cannot update chat fields {sorted(unknown)}")
        if "layout" in fields and fields["layout"] not in tuple(Layout):
            raise ValueError(f"unknown layout {fields['layout']!r}")
        if "trim_mode" in fields and fields["trim_mode"] not in tuple(TrimMode):
            raise ValueError(f"unknown trim mode {fields['trim_mode']!r}")
        if fields:
            assignments = ", ".join(f"{key} = :{key}" for key in fields)
            with self.transaction():
                self._write(
                    f"UPDATE chats SET {assignments}, updated_at = :now WHERE id = :id",
                    {**fields, "now": time.time(), "id": chat_id},
                )
        return self.chat(chat_id)

    def rename_chat(self, chat_id: int, name: str) -> Chat:
        name = _valid_name(name)
        existing = self.chat_by_name(name)
        if existing is not None and existing.id != chat_id:
            raise ValueError(f"a chat named {name!r} already exists")
        return self.update_chat(chat_id, name=name)

    def fork_chat(self, chat_id: int, at_seq: int, name: str) -> Chat:
        """A new chat holding ``chat_id``'s messages up to ``at_seq`` and its instructions.

        Messages keep their token ids, so the fork's prompt begins with exactly the tokens
        of the original and restores from the pages they share.
        """
        source = self.chat(chat_id)
        kept = [m for m in self.messages(chat_id) if m.seq <= at_seq]
        if not kept or kept[-1].seq != at_seq:
            raise ValueError(f"{source.name!r} has no message with seq {at_seq}")
        current = self.current_instructions(chat_id)
        fork = self.create_chat(name, source.layout)
        with self.transaction():
            self._write(
                "UPDATE chats SET trim_tokens = ?, trim_mode = ?, cache_start_seq = ? WHERE id = ?",
                (source.trim_tokens, source.trim_mode, min(source.cache_start_seq, at_seq + 1),
                 fork.id),
            )
            if current is not None:
                self._write(
                    "INSERT INTO instruction_versions (chat_id, version, text, variables,"
                    " created_at) VALUES (?, 1, ?, ?, ?)",
                    (fork.id, storable_text(current.text), json.dumps(current.variables),
                     time.time()),
                )
            self._write(
                "INSERT INTO messages (chat_id, seq, role, text, token_ids, token_format, status,"
                " instruction_version, created_at, finished_at)"
                " SELECT ?, seq, role, text, token_ids, token_format, status,"
                " CASE WHEN instruction_version IS NULL THEN NULL ELSE 1 END,"
                " created_at, finished_at FROM messages WHERE chat_id = ? AND seq <= ?",
                (fork.id, chat_id, at_seq),
            )
        return self.chat(fork.id)

    def delete_chat(self, chat_id: int) -> None:
        with self.transaction():
            self._write("DELETE FROM chats WHERE id = ?", (chat_id,))
        if self._kv is not None or self.kv_path.exists():
            self.kv.delete_state(chat_id)

    # -- instruction block ----------------------------------------------------------

    def add_instruction_version(
        self, chat_id: int, text: str, variables: dict[str, str] | None = None
    ) -> InstructionVersion:
        with self.transaction():
            row = self._write(
                "SELECT coalesce(max(version), 0) FROM instruction_versions WHERE chat_id = ?",
                (chat_id,),
            ).fetchone()
            self._write(
                "INSERT INTO instruction_versions (chat_id, version, text, variables, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    chat_id,
                    row[0] + 1,
                    storable_text(text),
                    json.dumps(variables or {}),
                    time.time(),
                ),
            )
        current = self.current_instructions(chat_id)
        assert current is not None
        return current

    def current_instructions(self, chat_id: int) -> InstructionVersion | None:
        rows = self._rows(
            "SELECT * FROM instruction_versions WHERE chat_id = ? ORDER BY version DESC LIMIT 1",
            (chat_id,),
        )
        return InstructionVersion.from_row(rows[0]) if rows else None

    def instruction_versions(self, chat_id: int) -> list[InstructionVersion]:
        rows = self._rows(
            "SELECT * FROM instruction_versions WHERE chat_id = ? ORDER BY version", (chat_id,)
        )
        return [InstructionVersion.from_row(row) for row in rows]

    # -- messages -------------------------------------------------------------------

    def add_message(
        self,
        chat_id: int,
        role: str,
        text: str,
        *,
        token_ids: list[int] | None = None,
        token_format: str | None = None,
        status: str = "complete",
        instruction_version: int | None = None,
        created_at: float | None = None,
    ) -> Message:
        now = time.time()
        with self.transaction():
            seq = self._write(
                "SELECT coalesce(max(seq), -1) + 1 FROM messages WHERE chat_id = ?", (chat_id,)
            ).fetchone()[0]
            cursor = self._write(
                "INSERT INTO messages (chat_id, seq, role, text, token_ids, token_format, status,"
                " instruction_version, created_at, finished_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    chat_id,
                    seq,
                    role,
                    storable_text(text),
                    pack_tokens(token_ids) if token_ids is not None else None,
                    token_format,
                    status,
                    instruction_version,
                    created_at if created_at is not None else now,
                    now,
                ),
            )
            self._write("UPDATE chats SET updated_at = ? WHERE id = ?", (now, chat_id))
        return self.message(cursor.lastrowid)

    def message(self, message_id: int) -> Message:
        rows = self._rows("SELECT * FROM messages WHERE id = ?", (message_id,))
        if not rows:
            raise KeyError(f"no message with id {message_id}")
        return Message.from_row(rows[0])

    def messages(self, chat_id: int) -> list[Message]:
        rows = self._rows("SELECT * FROM messages WHERE chat_id = ? ORDER BY seq", (chat_id,))
        return [Message.from_row(row) for row in rows]

    def set_message_tokens(self, message_id: int, token_ids: list[int], token_format: str) -> None:
        with self.transaction():
            self._write(
                "UPDATE messages SET token_ids = ?, token_format = ? WHERE id = ?",
                (pack_tokens(token_ids), token_format, message_id),
            )

    def delete_message(self, message_id: int) -> None:
        with self.transaction():
            self._write("DELETE FROM messages WHERE id = ?", (message_id,))

    # -- saved model states (pages in the KV store beside this file) ----------------

    @property
    def kv_path(self) -> Path:
        """``chats.db`` → ``chats.kv.db``: the disposable page store of this database."""
        return self.path.with_name(self.path.stem + ".kv" + (self.path.suffix or ".db"))

    @property
    def kv(self) -> KVStore:
        """The KV page store, opened (and created) on first use."""
        if self._kv is None:
            self._kv = KVStore(self.kv_path)
        return self._kv

    # -- per-turn metrics -----------------------------------------------------------

    def add_metrics(self, chat_id: int, message_id: int | None, data: dict[str, Any]) -> int:
        with self.transaction():
            cursor = self._write(
                "INSERT INTO turn_metrics (chat_id, message_id, created_at, data)"
                " VALUES (?, ?, ?, ?)",
                (chat_id, message_id, time.time(), json.dumps(data)),
            )
        return int(cursor.lastrowid)

    def update_metrics(self, metrics_id: int, data: dict[str, Any]) -> None:
        with self.transaction():
            self._write(
                "UPDATE turn_metrics SET data = ? WHERE id = ?", (json.dumps(data), metrics_id)
            )

    def metrics(self, chat_id: int) -> list[TurnMetricsRow]:
        rows = self._rows("SELECT * FROM turn_metrics WHERE chat_id = ? ORDER BY id", (chat_id,))
        return [
            TurnMetricsRow(
                id=row["id"],
                chat_id=row["chat_id"],
                message_id=row["message_id"],
                created_at=row["created_at"],
                data=json.loads(row["data"]),
            )
            for row in rows
        ]
