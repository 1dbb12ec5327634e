"""One helper for token lists and text alike: how long two sequences agree from the start."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

_T = TypeVar("_T")


def common_prefix_length(a: Sequence[_T], b: Sequence[_T]) -> int:
    """How many leading items ``a`` and ``b`` share (the cache's reusable prefix)."""
    limit = min(len(a), len(b))
    index = 0
    while index < limit and a[index] == b[index]:
        index += 1
    return index
