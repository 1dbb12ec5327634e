"""Before the window opens on X11: are the system libraries Qt's xcb plugin needs there?

When one is missing Qt aborts with a message that names at most one of them (often
only libxcb-cursor0), so a fresh Debian/Ubuntu install fails several times in a row.
This check names every missing library and the packages that provide them.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

#: soname → Debian/Ubuntu package, for Qt 6's xcb platform plugin and its GUI module.
XCB_LIBRARIES = {
    "libxcb.so.1": "libxcb1",
    "libX11.so.6": "libx11-6",
    "libX11-xcb.so.1": "libx11-xcb1",
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-util.so.1": "libxcb-util1",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-render.so.0": "libxcb-render0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libEGL.so.1": "libegl1",
    "libfontconfig.so.1": "libfontconfig1",
    "libdbus-1.so.3": "libdbus-1-3",
}
APT_COMMAND = "sudo apt install " + " ".join(dict.fromkeys(XCB_LIBRARIES.values()))


def _loadable(soname: str) -> bool:
    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


def uses_xcb(environ: dict[str, str] | None = None, platform: str = sys.platform) -> bool:
    """Will Qt pick its X11 plugin? (An explicit QT_QPA_PLATFORM, else X11 without Wayland.)"""
    env = os.environ if environ is None else environ
    if not platform.startswith("linux"):
        return False
    chosen = env.get("QT_QPA_PLATFORM", "")
    if chosen:
        return chosen.split(";")[0].split(":")[0] == "xcb"
    return bool(env.get("DISPLAY")) and not env.get("WAYLAND_DISPLAY")


def missing_libraries(loadable: Callable[[str], bool] = _loadable) -> list[str]:
    return [soname for soname in XCB_LIBRARIES if not loadable(soname)]


def missing_message(missing: list[str]) -> str:
    packages = " ".join(dict.fromkeys(XCB_LIBRARIES[soname] for soname in missing))
    return (
        "KV Chat cannot open its window: Qt's X11 (xcb) plugin needs system libraries"
        f" that are missing: {', '.join(missing)}.\n"
        f"On Debian or Ubuntu install them with:\n\n    sudo apt install {packages}\n\n"
        f"Everything the window needs:\n\n    {APT_COMMAND}\n"
    )
