"""The window's "Regenerate ×3": three new versions of the last reply from one prefill.

The button sits beside Regenerate and runs the window's Regenerate with the count set
for that one request (the engine samples the replies as sequences sharing the prompt's
cells); the first is shown and kept, ‹ › shows the others, as for any versions.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from PySide6.QtCore import QEvent, QObject
from PySide6.QtWidgets import QBoxLayout, QPushButton

from app.session.engine import GenerationOptions

if TYPE_CHECKING:
    from app.ui.main_window import MainWindow

COUNT = 3


class AlternativesControl(QObject):
    """The Regenerate ×3 button; enabled whenever Regenerate is."""

    def __init__(self, window: MainWindow) -> None:
        super().__init__(window)
        self.window = window
        self._count = 1  # the count of the request being made now
        self.button = QPushButton(f"Regenerate ×{COUNT}")
        self.button.setObjectName("regenerateAlternatives")
        self.button.setToolTip(
            f"{COUNT} new versions of the last reply, sampled together from one prefill; "
            "the first is kept, ‹ › shows the others"
        )
        regenerate = window.regenerate_button
        layout = _layout_holding(window.composer.layout(), regenerate)
        if layout is not None:
            layout.insertWidget(layout.indexOf(regenerate) + 1, self.button)
        self.button.setEnabled(regenerate.isEnabled())
        regenerate.installEventFilter(self)
        self.button.clicked.connect(self.regenerate)

    def regenerate(self) -> None:
        """The window's Regenerate, with COUNT replies for this one request."""
        self._count = COUNT
        try:
            self.window.regenerate()
        finally:
            self._count = 1

    def options(self, options: GenerationOptions) -> GenerationOptions:
        """The request's options: the window's, with the count of this request."""
        return replace(options, alternatives=self._count)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if event.type() == QEvent.Type.EnabledChange and watched is self.window.regenerate_button:
            self.button.setEnabled(self.window.regenerate_button.isEnabled())
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
