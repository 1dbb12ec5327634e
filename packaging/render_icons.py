"""Render resources/icons/kvchat-<size>.png from the SVG sources.

The PNGs are committed (the app and the bundle must not need an SVG renderer at
build time), so this runs only when the drawing changes. 16 px comes from its own
pixel-grid drawing (kvchat-16.svg): the full drawing's rows blur together there.
Uses rsvg-convert (Debian: librsvg2-bin) when present, else Qt's QSvgRenderer.

    python packaging/render_icons.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ICONS = Path(__file__).resolve().parents[1] / "resources" / "icons"
SIZES = (16, 24, 32, 48, 64, 128, 256, 512)


def source_for(size: int) -> Path:
    """The drawing meant for this size (a hand-tuned one if it exists)."""
    tuned = ICONS / f"kvchat-{size}.svg"
    return tuned if tuned.is_file() else ICONS / "kvchat.svg"


def render_rsvg(svg: Path, png: Path, size: int) -> None:
    subprocess.run(
        ["rsvg-convert", "-w", str(size), "-h", str(size), str(svg), "-o", str(png)], check=True
    )


def render_qt(svg: Path, png: Path, size: int) -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QGuiApplication, QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    _app = QGuiApplication.instance() or QGuiApplication([])
    image = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    QSvgRenderer(str(svg)).render(painter)
    painter.end()
    if not image.save(str(png)):
        raise OSError(f"could not write {png}")


def main() -> int:
    render = render_rsvg if shutil.which("rsvg-convert") else render_qt
    for size in SIZES:
        png = ICONS / f"kvchat-{size}.png"
        render(source_for(size), png, size)
        print(f"{png.relative_to(ICONS.parents[1])}  {size}x{size}  ({render.__name__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
