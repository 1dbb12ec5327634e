"""Instruction presets: a library of instruction blocks any chat can start from.

A preset is a block's text with ``{{placeholders}}`` and the values they default to. Using
one gives a chat a new instruction version: the preset's text as written, with the values
of its placeholders as the chat's variables, so every chat that uses a preset with the
same values renders the same block, hence the same tokens. A mixin of :class:`Store`
(all SQL stays in the store's package); the GUI reads, the worker writes.
"""

from __future__ import annotations

import json
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.storage.records import InstructionVersion, loaded_text, storable_text

if TYPE_CHECKING:
    import sqlite3

MAX_PRESET_NAME = 200


@dataclass(frozen=True)
class Preset:
    id: int
    name: str
    text: str
    variables: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Preset:
        variables = json.loads(row["variables"] or "{}")
        return cls(
            row["id"],
            row["name"],
            loaded_text(row["text"]),
            {str(k): str(v) for k, v in variables.items()},
            row["created_at"],
            row["updated_at"],
        )


def valid_preset_name(name: str) -> str:
    name = " ".join(name.split())
    if not name:
        raise ValueError("a preset needs a name")
    if len(name) > MAX_PRESET_NAME:
        raise ValueError(f"a preset name is at most {MAX_PRESET_NAME} characters")
    return name


class InstructionPresets:
    """Preset methods; :class:`Store` supplies the primitives below."""

    if TYPE_CHECKING:

        def transaction(self) -> AbstractContextManager[None]: ...
        def _write(
            self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()
        ) -> sqlite3.Cursor: ...
        def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]: ...
        def add_instruction_version(
            self, chat_id: int, text: str, variables: dict[str, str] | None = None
        ) -> InstructionVersion: ...

    def presets(self) -> list[Preset]:
        """Every preset, by name."""
        rows = self._rows("SELECT * FROM instruction_presets ORDER BY name COLLATE NOCASE, id")
        return [Preset.from_row(row) for row in rows]

    def preset(self, preset_id: int) -> Preset:
        rows = self._rows("SELECT * FROM instruction_presets WHERE id = ?", (preset_id,))
        if not rows:
            raise ValueError(f"no preset with id {preset_id}")
        return Preset.from_row(rows[0])

    def save_preset(self, name: str, text: str, variables: dict[str, str] | None = None) -> Preset:
        """Keep ``text`` under ``name`` (a preset of that name is replaced: same id)."""
        name = valid_preset_name(name)
        if not text.strip():
            raise ValueError("a preset needs some instruction text")
        now = time.time()
        with self.transaction():
            self._write(
                "INSERT INTO instruction_presets (name, text, variables, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET text = excluded.text,"
                " variables = excluded.variables, updated_at = excluded.updated_at",
                (name, storable_text(text), json.dumps(variables or {}), now, now),
            )
        rows = self._rows("SELECT id FROM instruction_presets WHERE name = ?", (name,))
        return self.preset(rows[0]["id"])

    def delete_preset(self, preset_id: int) -> None:
        """Chats that used it keep their instruction versions: they hold their own copy."""
        with self.transaction():
            self._write("DELETE FROM instruction_presets WHERE id = ?", (preset_id,))

    def use_preset(
        self, chat_id: int, preset_id: int, values: dict[str, str]
    ) -> InstructionVersion:
        """Start ``chat_id``'s instructions from a preset: a new version holding its text and
        the values of its placeholders, filled by the caller when it is used
        (:func:`app.core.variables.fill_values`)."""
        preset = self.preset(preset_id)
        return self.add_instruction_version(chat_id, preset.text, dict(values))
