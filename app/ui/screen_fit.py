"""Windows open within the screen they appear on, and remember their place per screen.

A fixed default size (1400x900) put the message box and Send off a 1024x640 screen.
Here a window's rectangle is stored per screen (name and available size) and clamped into
that screen's available geometry on the way back, so a screen that shrank, or a laptop
without its monitor, still shows the whole window.
"""

from __future__ import annotations

from PySide6.QtCore import QPoint, QRect, QSettings, QSize, Qt
from PySide6.QtGui import QGuiApplication, QScreen
from PySide6.QtWidgets import QWidget

#: Room left for the window frame and title bar a window manager adds around the client area.
FRAME_ALLOWANCE = QSize(16, 40)


def screen_of(widget: QWidget) -> QScreen:
    """The screen the widget is (or will be) on; the primary one before it is placed."""
    screen = widget.screen() if widget.isVisible() else None
    if screen is None:
        screen = QGuiApplication.screenAt(widget.geometry().center())
    return screen or QGuiApplication.primaryScreen()


def screen_key(screen: QScreen) -> str:
    """Settings key part for one screen: its name (one monitor, one remembered place)."""
    return "".join(c if c.isalnum() else "_" for c in screen.name()) or "screen"


def fit_rect(wanted: QRect, available: QRect) -> QRect:
    """``wanted`` shrunk to fit ``available`` (minus the frame) and moved inside it."""
    width = min(wanted.width(), available.width() - FRAME_ALLOWANCE.width())
    height = min(wanted.height(), available.height() - FRAME_ALLOWANCE.height())
    left = min(max(wanted.left(), available.left()), available.right() + 1 - width)
    top = min(max(wanted.top(), available.top()), available.bottom() + 1 - height)
    return QRect(QPoint(left, top), QSize(max(width, 1), max(height, 1)))


def default_rect(preferred: QSize, available: QRect) -> QRect:
    """The preferred size where it fits, centred on the screen's available area."""
    rect = fit_rect(QRect(QPoint(0, 0), preferred), available)
    rect.moveCenter(available.center())
    return fit_rect(rect, available)


def restore_window(widget: QWidget, settings: QSettings, prefix: str, preferred: QSize) -> None:
    """Place ``widget`` as it was last on this screen, clamped to it (or at a default)."""
    screen = screen_of(widget)
    available = screen.availableGeometry()
    saved = settings.value(f"{prefix}/{screen_key(screen)}/rect")
    if isinstance(saved, QRect) and saved.isValid():
        rect = fit_rect(saved, available)
    else:
        rect = default_rect(preferred, available)
    # The layout's minimum wins over the screen (Qt enforces it): keep its top-left on screen.
    minimum = widget.minimumSizeHint().expandedTo(widget.minimumSize())
    rect.setSize(rect.size().expandedTo(minimum))
    rect.moveTopLeft(
        QPoint(
            max(available.left(), min(rect.left(), available.right() + 1 - rect.width())),
            max(available.top(), min(rect.top(), available.bottom() + 1 - rect.height())),
        )
    )
    widget.setGeometry(rect)
    if settings.value(f"{prefix}/{screen_key(screen)}/maximized", False, type=bool):
        widget.setWindowState(widget.windowState() | Qt.WindowState.WindowMaximized)


def save_window(widget: QWidget, settings: QSettings, prefix: str) -> None:
    """Remember the widget's normal rectangle and maximized state for its current screen."""
    screen = screen_of(widget)
    key = f"{prefix}/{screen_key(screen)}"
    maximized = widget.isMaximized()
    settings.setValue(f"{key}/maximized", maximized)
    rect = widget.normalGeometry() if maximized else widget.geometry()
    if rect.isValid():
        settings.setValue(f"{key}/rect", rect)


def fit_window(widget: QWidget, preferred: QSize, screen: QScreen | None = None) -> None:
    """Open ``widget`` at ``preferred`` size where it fits, centred on ``screen``'s free area."""
    available = (screen or QGuiApplication.primaryScreen()).availableGeometry()
    rect = default_rect(preferred.expandedTo(widget.minimumSizeHint()), available)
    widget.setGeometry(rect)
