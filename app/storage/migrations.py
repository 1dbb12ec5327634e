"""The chats database's ordered schema migrations.

``MIGRATIONS[i]`` moves the database from version ``i`` to ``i + 1``;
:func:`app.storage.connection.migrate` runs each in one transaction with the version bump.
"""

from __future__ import annotations

import secrets
import sqlite3

from app.storage.connection import Migration


def _v1_initial(db: sqlite3.Connection) -> None:
    db.execute(
        """
        CREATE TABLE chats (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            layout TEXT NOT NULL DEFAULT 'history-first'
                CHECK (layout IN ('history-first', 'system-first')),
            trim_tokens INTEGER CHECK (trim_tokens IS NULL OR trim_tokens > 0),
            trim_mode TEXT NOT NULL DEFAULT 'exact' CHECK (trim_mode IN ('exact', 'shift')),
            cache_start_seq INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )
        """
    )
    db.execute(
        """
        CREATE TABLE instruction_versions (
            id INTEGER PRIMARY KEY,
            chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
            version INTEGER NOT NULL,
            text TEXT NOT NULL,
            variables TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            UNIQUE (chat_id, version)
        )
        """
    )
    db.execute(
        """
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            text TEXT NOT NULL,
            token_ids BLOB,
            token_format TEXT,
            status TEXT NOT NULL DEFAULT 'complete'
                CHECK (status IN ('complete', 'cancelled', 'error')),
            instruction_version INTEGER,
            created_at REAL NOT NULL,
            finished_at REAL,
            UNIQUE (chat_id, seq)
        )
        """
    )
    db.execute(
        """
        CREATE TABLE saved_states (
            chat_id INTEGER PRIMARY KEY REFERENCES chats(id) ON DELETE CASCADE,
            format_version INTEGER NOT NULL,
            fingerprint TEXT NOT NULL,
            token_ids BLOB NOT NULL,
            history_tokens INTEGER NOT NULL,
            state BLOB NOT NULL,
            checksum INTEGER NOT NULL,
            saved_at REAL NOT NULL
        )
        """
    )
    db.execute(
        """
        CREATE TABLE turn_metrics (
            id INTEGER PRIMARY KEY,
            chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
            message_id INTEGER REFERENCES messages(id) ON DELETE SET NULL,
            created_at REAL NOT NULL,
            data TEXT NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX messages_by_chat ON messages(chat_id, seq)")
    db.execute("CREATE INDEX metrics_by_chat ON turn_metrics(chat_id, id)")


def _v2_drop_history_tokens(db: sqlite3.Connection) -> None:
    """The saved state's history length was never read: the token ids say it all."""
    db.execute("ALTER TABLE saved_states DROP COLUMN history_tokens")


def _v3_states_move_to_the_kv_store(db: sqlite3.Connection) -> None:
    """Saved states now live as pages in their own file; old whole blobs are recomputed."""
    db.execute("DROP TABLE saved_states")


#: PRAGMA application_id of a KV Chat database ("KVCT"): tells our files from others'.
APPLICATION_ID = 0x4B564354
#: PRAGMA auto_vacuum value for INCREMENTAL.
AUTO_VACUUM_INCREMENTAL = 2


def _v4_mark_as_ours(db: sqlite3.Connection) -> None:
    """Mark the file as ours, so another application's file is never taken for one.

    The switch to incremental auto-vacuum needs a VACUUM outside any transaction: the
    store runs it right after the migrations (and again at the next open if it was
    interrupted).
    """
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")


def _v5_branches(db: sqlite3.Connection) -> None:
    """Chats form trees: an edited message starts a branch, a chat of the same family
    that holds the messages before the edit (their token ids too, so the branch's prompt
    begins with exactly the original's tokens and restores from the same KV pages)."""
    db.execute(
        "ALTER TABLE chats ADD COLUMN root_chat_id INTEGER"
        " REFERENCES chats(id) ON DELETE CASCADE"
    )
    db.execute("ALTER TABLE chats ADD COLUMN branch_seq INTEGER")
    db.execute("CREATE INDEX chats_by_root ON chats (root_chat_id)")


def _v6_model_templates(db: sqlite3.Connection) -> None:
    """A chat template chosen per model (by its file identity), used instead of the
    GGUF's own template or ChatML: a llama.cpp built-in name or a Jinja source."""
    db.execute(
        """
        CREATE TABLE model_templates (
            model TEXT PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN ('builtin', 'jinja')),
            value TEXT NOT NULL,
            label TEXT NOT NULL,
            chosen_at REAL NOT NULL
        )
        """
    )


def _v7_eval_rates(db: sqlite3.Connection) -> None:
    """The last instruction-following rates measured per model (by its file identity) and
    eval layout, shown next to each layout in the chat's layout menu."""
    db.execute(
        """
        CREATE TABLE eval_rates (
            model TEXT NOT NULL,
            layout TEXT NOT NULL,
            cases INTEGER NOT NULL CHECK (cases >= 0),
            followed INTEGER NOT NULL CHECK (followed BETWEEN 0 AND cases),
            ci_low REAL NOT NULL,
            ci_high REAL NOT NULL,
            recall REAL,
            turns INTEGER NOT NULL,
            measured_at REAL NOT NULL,
            PRIMARY KEY (model, layout)
        )
        """
    )


def _v8_kv_signing_key(db: sqlite3.Connection) -> None:
    """A random 32-byte secret that keys the MACs of the saved states and pages in the KV
    file. It lives here, never in the KV file: whoever edits that file cannot sign what
    they put in it. States saved before it are rejected once and recomputed."""
    db.execute(
        "CREATE TABLE kv_signing_key (id INTEGER PRIMARY KEY CHECK (id = 1),"
        " key BLOB NOT NULL CHECK (length(key) = 32))"
    )
    db.execute("INSERT INTO kv_signing_key (id, key) VALUES (1, ?)", [secrets.token_bytes(32)])


def _v9_instruction_presets(db: sqlite3.Connection) -> None:
    """A library of instruction blocks any chat can start from (see app/storage/presets.py):
    the text with its {{placeholders}} and the values they default to (JSON)."""
    db.execute(
        """
        CREATE TABLE instruction_presets (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE CHECK (length(trim(name)) > 0),
            text TEXT NOT NULL,
            variables TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )
        """
    )
def _v10_documents(db: sqlite3.Connection) -> None:
    """Documents attached to a chat: their text sits in the prompt's fixed region (after
    the preamble, before the history), in ``seq`` order, so a chat with the same document
    at the same place restores the same KV pages. ``no_history``: every question is
    answered from preamble, documents and block only (replies are kept, not prompted)."""
    db.execute(
        """
        CREATE TABLE documents (
            id INTEGER PRIMARY KEY,
            chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            name TEXT NOT NULL,
            text TEXT NOT NULL,
            added_at REAL NOT NULL,
            UNIQUE (chat_id, seq)
        )
        """
    )
    db.execute(
        "ALTER TABLE chats ADD COLUMN no_history INTEGER NOT NULL DEFAULT 0"
        " CHECK (no_history IN (0, 1))"
    )


#: MIGRATIONS[i] upgrades a database at version i to version i + 1.
MIGRATIONS: list[Migration] = [
    _v1_initial,
    _v2_drop_history_tokens,
    _v3_states_move_to_the_kv_store,
    _v4_mark_as_ours,
    _v5_branches,
    _v6_model_templates,
    _v7_eval_rates,
    _v8_kv_signing_key,
    _v9_instruction_presets,
    _v10_documents,
]

SCHEMA_VERSION = len(MIGRATIONS)
