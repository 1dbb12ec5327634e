"""What every part of the main window shares: the window it belongs to, and the rule
that a worker answer arriving after the window closed is dropped.

The window is split into parts with one job each (chats, turns, models, instructions,
cache and trim, menus). Each part is a small QObject owned by the window; it reaches
the window's widgets, its read-only store and its worker host through ``window``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from PySide6.QtCore import QObject

if TYPE_CHECKING:
    from app.ui.window_base import WindowBase

_Slot = TypeVar("_Slot", bound=Callable[..., None])


class WindowPart(QObject):
    """One job of the main window; the window owns it (Qt parent) and outlives it."""

    def __init__(self, window: WindowBase) -> None:
        super().__init__(window)
        self.window = window

    @property
    def closed(self) -> bool:
        """The window closed: its store is closed and queued answers must not touch it."""
        return self.window.closed


def unless_closed(slot: _Slot) -> _Slot:
    """Worker answers still queued when the window closed must not touch the closed store."""

    @functools.wraps(slot)
    def guarded(self: WindowPart, *args: Any, **kwargs: Any) -> None:
        if not self.closed:
            slot(self, *args, **kwargs)

    return guarded  # type: ignore[return-value]
