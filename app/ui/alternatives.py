"""The window's "Regenerate ×3": three new versions of the last reply from one prefill.

The button sits beside Regenerate and runs the window's Regenerate asking for three
replies (the engine samples them as sequences sharing the prompt's cells); the first is
shown and kept, ‹ › shows the others, as for any versions.
"""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import QEvent, QObject
from PySide6.QtWidgets import QBoxLayout, QPushButton

COUNT = 3


class AlternativesControl(QObject):
    """The Regenerate ×3 button; enabled whenever Regenerate is."""

    def __init__(
        self, parent: QObject, regenerate_button: QPushButton, regenerate: Callable[[int], None]
    ) -> None:
        """``regenerate``: the window's Regenerate, asking for this many replies."""
        super().__init__(parent)
        self._regenerate = regenerate
        self._regenerate_button = regenerate_button
        self.button = QPushButton(f"Regenerate ×{COUNT}")
        self.button.setObjectName("regenerateAlternatives")
        self.button.setToolTip(
            f"{COUNT} new versions of the last reply, sampled together from one prefill; "
            "the first is kept, ‹ › shows the others"
        )
        holder = regenerate_button.parentWidget()
        layout = _layout_holding(holder.layout() if holder else None, regenerate_button)
        if layout is not None:
            layout.insertWidget(layout.indexOf(regenerate_button) + 1, self.button)
        self.button.setEnabled(regenerate_button.isEnabled())
        regenerate_button.installEventFilter(self)
        self.button.clicked.connect(lambda: self._regenerate(COUNT))

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if event.type() == QEvent.Type.EnabledChange and watched is self._regenerate_button:
            self.button.setEnabled(self._regenerate_button.isEnabled())
        return False


def _layout_holding(layout: object, button: QPushButton) -> QBoxLayout | None:
    """The box layout (nested anywhere in ``layout``) that holds ``button``."""
    if not isinstance(layout, QBoxLayout):
        return None
    if layout.indexOf(button) >= 0:
        return layout
    for index in range(layout.count()):
        item = layout.itemAt(index)
        child = item.layout() if item is not None else None
        found = _layout_holding(child, button) if child is not None else None
        if found is not None:
            return found
    return None
