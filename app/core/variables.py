"""``{{name}}`` placeholders of an instruction block (no model needed: the GUI uses it)."""

from __future__ import annotations

import re

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def placeholder_names(text: str) -> list[str]:
    """The placeholders of a block, in order of first use."""
    return list(dict.fromkeys(match.group(1) for match in PLACEHOLDER.finditer(text)))
