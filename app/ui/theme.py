"""Light and dark themes: one palette drives the style sheet, Qt's palette and the charts.

The theme follows the system's colour scheme (Qt 6.5+ ``styleHints().colorScheme()``)
unless the user picks one in View → Theme. Widgets that paint their own colours (charts,
the cache bar, rendered Markdown) read :func:`palette` and listen to
:data:`notifier` ``.changed``.
"""

from __future__ import annotations

import dataclasses
from enum import StrEnum

import pyqtgraph as pg
from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtGui import QColor, QGuiApplication, QPalette
from PySide6.QtWidgets import QApplication

from app.resources import resource_path


class ThemeMode(StrEnum):
    SYSTEM = "system"
    LIGHT = "light"
    DARK = "dark"


@dataclasses.dataclass(frozen=True)
class Palette:
    """Every colour the app uses; style.qss names them as ``@field@``."""

    name: str
    window: str  # main background
    panel: str  # side panels, toolbar, composer
    text: str
    muted: str  # secondary text
    faint: str  # tertiary text, placeholders
    border: str
    hover: str
    accent: str  # links, focus
    selection: str  # selected list item background
    user_bubble: str
    user_border: str
    code_background: str
    code_border: str
    banner: str
    banner_border: str
    primary: str  # the Send button
    primary_hover: str
    primary_disabled: str
    danger: str
    chart_background: str
    chart_foreground: str
    pygments_style: str


LIGHT = Palette(
    name="light",
    window="#ffffff",
    panel="#f6f8fa",
    text="#24292f",
    muted="#57606a",
    faint="#8c959f",
    border="#d0d7de",
    hover="#eaeef2",
    accent="#0969da",
    selection="#ddf4ff",
    user_bubble="#ddf4ff",
    user_border="#b6e3ff",
    code_background="#f6f8fa",
    code_border="#d0d7de",
    banner="#fff8c5",
    banner_border="#d4a72c",
    primary="#1f883d",
    primary_hover="#1a7f37",
    primary_disabled="#94d3a2",
    danger="#cf222e",
    chart_background="#ffffff",
    chart_foreground="#24292f",
    pygments_style="default",
)

DARK = Palette(
    name="dark",
    window="#0d1117",
    panel="#161b22",
    text="#e6edf3",
    muted="#9198a1",
    faint="#6e7681",
    border="#30363d",
    hover="#21262d",
    accent="#4493f8",
    selection="#1f3a5f",
    user_bubble="#132c4a",
    user_border="#1f4b7a",
    code_background="#161b22",
    code_border="#30363d",
    banner="#3b2e0a",
    banner_border="#9e6a03",
    primary="#238636",
    primary_hover="#2ea043",
    primary_disabled="#1b4721",
    danger="#f85149",
    chart_background="#0d1117",
    chart_foreground="#e6edf3",
    pygments_style="github-dark",
)


class ThemeNotifier(QObject):
    """Emits the new palette whenever the theme changes (system switch or user choice)."""

    changed = Signal(object)  # Palette


notifier = ThemeNotifier()
_state: dict[str, object] = {"mode": ThemeMode.SYSTEM, "palette": LIGHT, "watching": False}


def palette() -> Palette:
    """The palette in use now."""
    return _state["palette"]  # type: ignore[return-value]


def mode() -> ThemeMode:
    return _state["mode"]  # type: ignore[return-value]


def system_is_dark() -> bool:
    if QGuiApplication.instance() is None:
        return False
    scheme = QGuiApplication.styleHints().colorScheme()  # a static method of the application
    return scheme == Qt.ColorScheme.Dark


def resolve(theme_mode: ThemeMode) -> Palette:
    if theme_mode == ThemeMode.DARK:
        return DARK
    if theme_mode == ThemeMode.LIGHT:
        return LIGHT
    return DARK if system_is_dark() else LIGHT


def style_sheet(colours: Palette) -> str:
    """resources/style.qss with the palette's colours filled in."""
    path = resource_path("style.qss")
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    for field in dataclasses.fields(colours):
        text = text.replace(f"@{field.name}@", str(getattr(colours, field.name)))
    return text


def qt_palette(colours: Palette) -> QPalette:
    """Qt's palette for what the style sheet does not cover (menus, dialogs, scroll bars)."""
    qp = QPalette()
    roles = {
        QPalette.ColorRole.Window: colours.panel,
        QPalette.ColorRole.WindowText: colours.text,
        QPalette.ColorRole.Base: colours.window,
        QPalette.ColorRole.AlternateBase: colours.panel,
        QPalette.ColorRole.Text: colours.text,
        QPalette.ColorRole.Button: colours.panel,
        QPalette.ColorRole.ButtonText: colours.text,
        QPalette.ColorRole.ToolTipBase: colours.panel,
        QPalette.ColorRole.ToolTipText: colours.text,
        QPalette.ColorRole.Highlight: colours.accent,
        QPalette.ColorRole.HighlightedText: "#ffffff",
        QPalette.ColorRole.Link: colours.accent,
        QPalette.ColorRole.PlaceholderText: colours.faint,
        QPalette.ColorRole.Mid: colours.border,
        QPalette.ColorRole.Dark: colours.border,
    }
    for role, colour in roles.items():
        qp.setColor(role, QColor(colour))
    for role in (
        QPalette.ColorRole.Text,
        QPalette.ColorRole.ButtonText,
        QPalette.ColorRole.WindowText,
    ):
        qp.setColor(QPalette.ColorGroup.Disabled, role, QColor(colours.faint))
    return qp


def apply(theme_mode: ThemeMode | str = ThemeMode.SYSTEM) -> Palette:
    """Use ``theme_mode`` from now on; re-applied by itself when the system scheme changes."""
    application = QApplication.instance()
    chosen = ThemeMode(theme_mode)
    colours = resolve(chosen)
    _state["mode"] = chosen
    changed = colours != _state["palette"]
    _state["palette"] = colours
    pg.setConfigOptions(background=colours.chart_background, foreground=colours.chart_foreground)
    if isinstance(application, QApplication):
        application.setPalette(qt_palette(colours))
        application.setStyleSheet(style_sheet(colours))
        if not _state["watching"]:
            application.styleHints().colorSchemeChanged.connect(_on_system_scheme)
            _state["watching"] = True
    if changed:
        notifier.changed.emit(colours)
    return colours


def _on_system_scheme(_scheme: object) -> None:
    if mode() == ThemeMode.SYSTEM:
        apply(ThemeMode.SYSTEM)
