"""``{{name}}`` placeholders of an instruction block (no model needed: the GUI uses it)."""

from __future__ import annotations

import datetime
import re

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def placeholder_names(text: str) -> list[str]:
    """The placeholders of a block, in order of first use."""
    return list(dict.fromkeys(match.group(1) for match in PLACEHOLDER.finditer(text)))


#: Placeholders every preset can use without a value of its own, filled when it is used.
BUILTIN_VARIABLES = ("date", "weekday")


class MissingValue(ValueError):
    """A placeholder of a preset that has no value (one line for the user)."""


def fill_values(
    text: str,
    defaults: dict[str, str],
    given: dict[str, str] | None = None,
    today: datetime.date | None = None,
) -> dict[str, str]:
    """The value of each placeholder of ``text`` when a preset is used: what the user gave,
    else the preset's default, else a built-in ({{date}}: today as YYYY-MM-DD,
    {{weekday}}: its English name). Raises MissingValue naming the first one with none."""
    given = given or {}
    today = today or datetime.date.today()
    builtins = {"date": today.isoformat(), "weekday": today.strftime("%A")}
    values: dict[str, str] = {}
    for name in placeholder_names(text):
        value = given.get(name) or defaults.get(name) or builtins.get(name, "")
        if not value.strip():
            raise MissingValue(f"the preset needs a value for {{{{{name}}}}}")
        values[name] = value
    return values
