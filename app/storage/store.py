"""All SQL of the app: chats, messages, instruction versions, saved states, metrics.

Durability rules: WAL journal, foreign keys on, every write in one explicit
transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``), schema version checked at open.
SQLite errors are translated into :class:`StorageError` subclasses whose message
is fit to show a user (by SQLite's result code, not its wording).

Our files carry ``PRAGMA application_id`` = :data:`APPLICATION_ID`. A non-empty file
that is not ours is refused before anything is written to it (its header is read
as plain bytes, its schema through an ``immutable`` read-only connection). Read-only
commands open with ``mode=ro`` and write nothing. Growth is bounded: incremental
auto-vacuum returns the pages of deleted chats and states to the file system, and
the WAL is checkpointed and truncated after large writes and deletes.

The standard library's sqlite3 does the work: every write is hand-written SQL inside one
explicit transaction with its neighbours (:mod:`app.storage.connection` holds the
transaction helper and the migration runner this file shares with the KV store).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import sqlite3
import time
import unicodedata
from pathlib import Path
from typing import Any

from app.domain import Layout, MessageStatus, TemplateChoice, TemplateKind, TrimMode
from app.storage import connection
from app.storage.connection import Params
from app.storage.documents import ChatDocuments
from app.storage.errors import (
    ChatNotFound,
    DatabaseCorrupt,
    DatabaseInUse,
    NotOurDatabase,
    SchemaTooNew,
    StorageError,
    StorageWriteError,
    UniqueConflict,
    describe_error,
)
from app.storage.families import ChatFamilies
from app.storage.kv_store import KEY_SIZE, KVFileOfAnotherDatabase, KVStore
from app.storage.migrations import APPLICATION_ID, AUTO_VACUUM_INCREMENTAL, MIGRATIONS
from app.storage.presets import InstructionPresets
from app.storage.records import (
    Chat,
    EvalRate,
    InstructionVersion,
    Message,
    TurnMetricsRow,
    pack_tokens,
    storable_text,
    unanswered_ids,
)
from app.storage.sqlite_file import application_id, read_only_uri, truncation

__all__ = [
    "DatabaseCorrupt",
    "DatabaseInUse",
    "NotOurDatabase",
    "SchemaTooNew",
    "StorageError",
    "StorageWriteError",
    "Store",
    "check_ours",
    "set_aside",
    "valid_chat_name",
]


#: Bytes the WAL may keep on disk after a checkpoint resets it.
JOURNAL_SIZE_LIMIT = 4 * 1024 * 1024
OUR_TABLES = frozenset({"chats", "messages"})
_CHAT_FIELDS = {"name", "layout", "trim_tokens", "trim_mode", "cache_start_seq", "no_history"}


def valid_chat_name(name: str) -> str:
    """The one form of a chat name, used to create, find, rename and fork chats (so
    ``"demo "`` and ``"demo"`` are one chat): stripped, Unicode NFC; or ValueError saying
    what is wrong with it."""
    if isinstance(storable_text(name), bytes):
        # Bytes from argv that are not UTF-8 arrive as surrogate escapes (\udc80-\udcff).
        raise ValueError("the chat name is not valid UTF-8 text")
    name = unicodedata.normalize("NFC", name.strip())
    if not name:
        raise ValueError("a chat needs a name")
    if "\x00" in name:
        raise ValueError("a chat name cannot contain NUL characters")
    return name


def _check_file_header(path: Path) -> None:
    """Catch a foreign or truncated file before SQLite half-reads it."""
    try:
        cause = truncation(path)
    except FileNotFoundError:
        return
    except OSError as error:
        raise StorageWriteError(f"cannot open {path}: {error.strerror}") from error
    if cause is not None:
        raise DatabaseCorrupt(f"{path}: {cause}; it cannot be read safely")


def _kv_file_damage(path: Path) -> str | None:
    """Why the KV file cannot be read safely (it is then set aside), or None."""
    try:
        return truncation(path)
    except OSError:  # missing (a fresh one is made) or unreadable (its open says why)
        return None


def check_ours(path: Path) -> None:
    """Refuse a non-empty SQLite file of another application, without writing to it.

    Ours: our application_id in the header, or (a database from before it was set)
    no application_id and our tables. An empty file or one without tables is free.
    """
    if not path.exists() or path.stat().st_size == 0:
        return
    found_id = application_id(path)
    if found_id == APPLICATION_ID:
        return
    foreign = NotOurDatabase(
        f"{path} is not a KV Chat database (another application's SQLite file); "
        "it was left untouched: choose another file"
    )
    if found_id != 0:
        raise foreign
    # immutable: read the main file only, create no -wal/-shm beside someone else's file.
    try:
        conn = sqlite3.connect(read_only_uri(path, immutable=True), uri=True)
    except sqlite3.Error as error:
        raise describe_error(error, path) from error
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.Error as error:
        raise describe_error(error, path) from error
    finally:
        conn.close()
    if tables and not (tables >= OUR_TABLES and version > 0):
        raise foreign


def set_aside(path: str | os.PathLike[str], label: str = "unreadable") -> Path:
    """Rename an unreadable database (and its WAL/SHM files) out of the way, never delete it.

    Returns the new name of the old file (``NAME.<label>-<time>``); ``path`` is then free
    for a fresh database.
    """
    source = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = source.with_name(f"{source.name}.{label}-{stamp}")
    counter = 1
    while target.exists():
        counter += 1
        target = source.with_name(f"{source.name}.{label}-{stamp}-{counter}")
    for suffix in ("-wal", "-shm"):
        companion = source.with_name(source.name + suffix)
        if companion.exists():
            companion.rename(target.with_name(target.name + suffix))
    source.rename(target)
    return target


def _short(error: Exception) -> str:
    """SQLite's own words from a storage error, without the file's path."""
    text = str(error)
    return text[text.rfind("(") + 1 : -1] if text.endswith(")") and "(" in text else text


class Store(ChatFamilies, InstructionPresets, ChatDocuments):
    """One open database. Not shared between threads: the engine worker owns it."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        exclusive: bool = False,
        read_only: bool = False,
        live: bool = False,
    ) -> None:
        """Open (and create or upgrade) a database; ``read_only`` writes nothing at all.

        ``live`` (with ``read_only``): a reader beside the process's writer (the window
        beside its worker) that sees every write the writer commits.
        """
        self.path = Path(path)
        self.read_only = read_only
        self.live = live
        self._kv: KVStore | None = None
        #: Why the KV file was set aside when it was opened (taken by the next restore).
        self.kv_notice: str | None = None
        self._lock_file: int | None = None
        _check_file_header(self.path)
        check_ours(self.path)
        if exclusive and not read_only:
            self._take_process_lock()
        if read_only and not self.path.exists():
            raise StorageError(f"database not found: {self.path}")
        try:
            self.db = connection.connect(self.path, read_only=read_only, live=live)
        except sqlite3.Error as error:
            self._release_process_lock()
            raise describe_error(error, self.path) from error
        try:
            if read_only:
                self._check_readable()
            else:
                self._configure()
                self._migrate()
        except Exception as error:  # a failed migration too: close, release the lock
            self.close()
            if isinstance(error, sqlite3.Error):
                raise describe_error(error, self.path) from error
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

    def _check_readable(self) -> None:
        self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        connection.check_version(self.db, self.path, len(MIGRATIONS))
        if not connection.table_names(self.db) >= OUR_TABLES:
            raise StorageError(f"{self.path} holds no chats yet")

    def _configure(self) -> None:
        connection.configure_writer(self.db, self.path, journal_limit=JOURNAL_SIZE_LIMIT)

    def _migrate(self) -> None:
        version = connection.migrate(self.db, self.path, MIGRATIONS)
        if version > 0:
            # The tables must exist at the version the file claims.
            missing = OUR_TABLES - connection.table_names(self.db)
            if missing:
                raise DatabaseCorrupt(f"{self.path} lacks tables {sorted(missing)}")
        if self.db.execute("PRAGMA auto_vacuum").fetchone()[0] != AUTO_VACUUM_INCREMENTAL:
            # A database from before incremental vacuum: switching needs a VACUUM, which
            # cannot run inside the migration's transaction. Repeated until it succeeds.
            self.db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            self.db.execute("VACUUM")

    def schema_version(self) -> int:
        return connection.schema_version(self.db)

    def close(self) -> None:
        if self._kv is not None:
            self._kv.close()
            self._kv = None
        if not self.read_only:
            # Leave a closed database in rollback-journal mode: a read-only open of it
            # then needs no -wal/-shm files. Fails harmlessly if someone else has it open.
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("PRAGMA busy_timeout = 0")  # never wait for other readers
                self.db.execute("PRAGMA journal_mode = DELETE")
        with contextlib.suppress(sqlite3.Error):
            self.db.close()
        self._release_process_lock()

    def _reclaim_space(self, *, vacuum: bool) -> None:
        """After a large write or a delete: free pages back to the file system, WAL to 0.

        Only housekeeping: the data is already committed, so a failure here is ignored.
        """
        with contextlib.suppress(sqlite3.Error):
            if vacuum:
                # executescript steps the pragma to the end; execute() frees one page.
                self.db.executescript("PRAGMA incremental_vacuum")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """One atomic write: everything inside commits together or not at all."""
        return connection.transaction(self.db, self.path)

    def _write(self, sql: str, params: Params = ()) -> sqlite3.Cursor:
        return connection.execute(self.db, self.path, sql, params)

    def _rows(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        """The rows as dicts by column name (records are built from them by name)."""
        cursor = self._write(sql, params)
        names = [column[0] for column in cursor.description]
        try:
            return [dict(zip(names, row, strict=True)) for row in cursor]
        except sqlite3.Error as error:
            raise describe_error(error, self.path) from error

    # -- chats ----------------------------------------------------------------------

    def create_chat(self, name: str, layout: str = "history-first") -> Chat:
        with self.transaction():
            chat_id = self._insert_chat(name, layout)
        return self.chat(chat_id)

    def _insert_chat(self, name: str, layout: str) -> int:
        """A new chat row (inside the caller's transaction)."""
        name = valid_chat_name(name)
        if layout not in tuple(Layout):
            raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(Layout)}")
        now = time.time()
        try:
            cursor = self._write(
                "INSERT INTO chats (name, layout, created_at, updated_at) VALUES (?, ?, ?, ?)",
                (name, layout, now, now),
            )
        except UniqueConflict as error:
            raise ValueError(f"a chat named {name!r} already exists") from error
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def chat(self, chat_id: int) -> Chat:
        rows = self._rows("SELECT * FROM chats WHERE id = ?", (chat_id,))
        if not rows:
            raise ChatNotFound(f"no chat with id {chat_id}")
        return Chat(**rows[0])

    def chat_by_name(self, name: str) -> Chat | None:
        """The chat named ``name`` in its normal form (a name stored before names were
        NFC-normalised is found by its stripped form too)."""
        normal = valid_chat_name(name)
        rows = self._rows(
            "SELECT * FROM chats WHERE name IN (?, ?) ORDER BY name = ? DESC",
            (normal, name.strip(), normal),
        )
        return Chat(**rows[0]) if rows else None

    def chats(self, search: str = "") -> list[Chat]:
        """Chats, most recently used first; ``search`` matches names and message text."""
        # One entry per family (its first chat), ordered by the family's latest use.
        latest = (
            "(SELECT max(f.updated_at) FROM chats f WHERE f.id = c.id OR f.root_chat_id = c.id)"
        )
        if not search:
            rows = self._rows(
                f"SELECT c.* FROM chats c WHERE c.root_chat_id IS NULL"
                f" ORDER BY {latest} DESC, c.id DESC"
            )
        else:
            pattern = f"%{search}%"
            rows = self._rows(
                f"""
                SELECT c.* FROM chats c WHERE c.root_chat_id IS NULL AND (c.name LIKE ?1
                    OR c.id IN (
                        SELECT coalesce(m_chat.root_chat_id, m_chat.id)
                        FROM messages m JOIN chats m_chat ON m_chat.id = m.chat_id
                        WHERE m.text LIKE ?1
                    ))
                ORDER BY {latest} DESC, c.id DESC
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
        name = valid_chat_name(name)
        existing = self.chat_by_name(name)
        if existing is not None and existing.id != chat_id:
            raise ValueError(f"a chat named {name!r} already exists")
        return self.update_chat(chat_id, name=name)

    def touch_chat(self, chat_id: int) -> None:
        """Mark the chat as the one used last (its family opens on it)."""
        with self.transaction():
            self._write("UPDATE chats SET updated_at = ? WHERE id = ?", (time.time(), chat_id))

    def delete_chat(self, chat_id: int) -> None:
        """Delete a chat; deleting the first chat of a family deletes its branches too."""
        doomed = [chat_id]
        if self.chat(chat_id).root_chat_id is None:
            doomed = [chat.id for chat in self.family(chat_id)]
        with self.transaction():
            self._write("DELETE FROM chats WHERE id = ?", (chat_id,))
        self._reclaim_space(vacuum=True)
        if self._kv is not None or self.kv_path.exists():
            try:
                for doomed_id in doomed:
                    self.kv.delete_state(doomed_id)
            except DatabaseCorrupt as error:  # the KV file is disposable: never an obstacle
                self.kv_notice = self.set_kv_aside(error)

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
        with self.transaction():
            message_id = self._insert_message(
                chat_id, role, text, token_ids=token_ids, token_format=token_format,
                status=status, instruction_version=instruction_version, created_at=created_at,
            )  # fmt: skip
        return self.message(message_id)

    def _insert_message(
        self,
        chat_id: int,
        role: str,
        text: str,
        *,
        token_ids: list[int] | None,
        token_format: str | None,
        status: str,
        instruction_version: int | None,
        created_at: float | None = None,
    ) -> int:
        """A message after the chat's last (inside the caller's transaction)."""
        now = time.time()
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
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def message(self, message_id: int) -> Message:
        rows = self._rows("SELECT * FROM messages WHERE id = ?", (message_id,))
        if not rows:
            raise ChatNotFound(f"no message with id {message_id}")
        return Message.from_row(rows[0])

    def messages(self, chat_id: int) -> list[Message]:
        """The chat's messages in order; a user message with no reply is ``unanswered``."""
        rows = self._rows("SELECT * FROM messages WHERE chat_id = ? ORDER BY seq", (chat_id,))
        messages = [Message.from_row(row) for row in rows]
        unanswered = unanswered_ids(messages)
        return [
            dataclasses.replace(m, status=MessageStatus.UNANSWERED) if m.id in unanswered else m
            for m in messages
        ]

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
        """The disposable page store of this database, named from its resolved file name:
        ``chats.db`` → ``chats.kv.db``, any other name gets ``.kv`` (``chats`` →
        ``chats.kv``), so two databases never share one (``chats`` and ``chats.db`` did)."""
        real = self.path.resolve()
        if real.suffix == ".db":
            return real.with_name(real.stem + ".kv.db")
        return real.with_name(real.name + ".kv")

    @property
    def kv(self) -> KVStore:
        """The KV page store, opened (and created) on first use.

        The file is disposable: a truncated or unreadable one, or one that belongs to
        another chats database, is renamed aside and a fresh one started (``kv_notice``
        says so). Read-only, it is opened for figures only and nothing is written.
        """
        if self._kv is None:
            if self.read_only:
                self._kv = KVStore(self.kv_path, read_only=True)
                return self._kv
            cause = _kv_file_damage(self.kv_path)
            if cause is None:
                try:
                    self._kv = KVStore(self.kv_path, key=self.kv_key())
                    return self._kv
                except KVFileOfAnotherDatabase:
                    self.kv_notice = self._kv_aside("belongs to another chats database",
                                                    "other-database")
                except DatabaseCorrupt as error:
                    self.kv_notice = self._kv_aside(f"is unreadable ({_short(error)})")
            else:
                self.kv_notice = self._kv_aside(f"is unreadable: {cause}")
            self._kv = KVStore(self.kv_path, key=self.kv_key())
        return self._kv

    def set_kv_aside(self, error: StorageError) -> str:
        """A damaged KV file found in use: rename it aside, start a fresh one, say so."""
        if self._kv is not None:
            self._kv.close()
            self._kv = None
        note = self._kv_aside(f"is damaged ({_short(error)})")
        self._kv = KVStore(self.kv_path, key=self.kv_key())
        return note

    def _kv_aside(self, cause: str, label: str = "damaged") -> str:
        name = self.kv_path.name
        if not self.kv_path.exists():
            return f"{name} {cause}: saved states are recomputed"
        moved = set_aside(self.kv_path, label)
        return f"{name} {cause}: set aside as {moved.name}; saved states are recomputed"

    def kv_key(self) -> bytes | None:
        """The secret that keys the KV file's MACs (made anew if it is missing or not 32
        bytes: every saved state is then recomputed once). None read-only without one."""
        try:
            rows = self.db.execute("SELECT key FROM kv_signing_key WHERE id = 1").fetchall()
        except sqlite3.Error:
            rows = []
        if rows and isinstance(rows[0][0], bytes) and len(rows[0][0]) == KEY_SIZE:
            return rows[0][0]
        if self.read_only:
            return None
        key = secrets.token_bytes(KEY_SIZE)
        with self.transaction():
            self._write("INSERT OR REPLACE INTO kv_signing_key (id, key) VALUES (1, ?)", (key,))
        return key

    # -- chat templates chosen per model ---------------------------------------------

    def model_template(self, model: str) -> TemplateChoice | None:
        """The template chosen for a model (``model_file_identity``), if any."""
        query = "SELECT kind, value, label FROM model_templates WHERE model = ?"
        rows = self._rows(query, (model,))
        if not rows:
            return None
        row = rows[0]
        return TemplateChoice(TemplateKind(row["kind"]), row["value"], row["label"])

    def set_model_template(self, model: str, choice: TemplateChoice | None) -> None:
        """Use ``choice`` for the model from now on; None goes back to the GGUF's own."""
        with self.transaction():
            if choice is None:
                self._write("DELETE FROM model_templates WHERE model = ?", (model,))
                return
            self._write(
                "INSERT INTO model_templates (model, kind, value, label, chosen_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (model) DO UPDATE SET kind = excluded.kind,"
                " value = excluded.value, label = excluded.label, chosen_at = excluded.chosen_at",
                (model, str(choice.kind), choice.value, choice.label, time.time()),
            )

    # -- instruction-following rates per model ----------------------------------------

    def set_eval_rates(self, model: str, rates: list[EvalRate]) -> None:
        """Replace the model's last measured rates (one row per layout) in one transaction."""
        with self.transaction():
            self._write("DELETE FROM eval_rates WHERE model = ?", (model,))
            for rate in rates:
                self._write(
                    "INSERT INTO eval_rates (model, layout, cases, followed, ci_low, ci_high,"
                    " recall, turns, measured_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (model, rate.layout, rate.cases, rate.followed, rate.ci_low, rate.ci_high,
                     rate.recall, rate.turns, rate.measured_at or time.time()),
                )

    def eval_rates(self, model: str) -> dict[str, EvalRate]:
        """The model's last measured rates by layout (empty if never measured)."""
        rows = self._rows("SELECT * FROM eval_rates WHERE model = ? ORDER BY layout", (model,))
        fields = [f.name for f in dataclasses.fields(EvalRate)]
        return {row["layout"]: EvalRate(**{k: row[k] for k in fields}) for row in rows}

    # -- per-turn metrics -----------------------------------------------------------

    def add_metrics(self, chat_id: int, message_id: int | None, data: dict[str, Any]) -> int:
        with self.transaction():
            cursor = self._write(
                "INSERT INTO turn_metrics (chat_id, message_id, created_at, data)"
                " VALUES (?, ?, ?, ?)",
                (chat_id, message_id, time.time(), json.dumps(data)),
            )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

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
