"""PNG chart of a benchmark's TTFT per turn (pyqtgraph, offscreen).

The only Qt in ``app.bench``; Qt is imported only
when a chart is written, and works without a display (``QT_QPA_PLATFORM=offscreen``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from app.bench.report import BenchReport

#: One colour per strategy, readable on white.
COLOURS = {
    "naive": (200, 40, 40),
    "system-first-prefix": (230, 140, 20),
    "history-first": (120, 80, 190),
    "history-first-warm": (30, 140, 60),
    "reopen": (30, 100, 200),
    "history-first-live": (0, 160, 160),
    "limit": (110, 110, 110),
}
SYMBOLS = ("o", "s", "t", "d", "+", "x", "star")


def write_ttft_plot(
    report: BenchReport, path: str | os.PathLike[str], *, width: int = 1000
) -> Path:
    """Write TTFT per turn for every strategy (log y axis: the ratios span 100x)."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import pyqtgraph as pg
    import pyqtgraph.exporters
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    pg.setConfigOptions(antialias=True, background="w", foreground="k")
    widget = pg.PlotWidget()
    widget.resize(width, int(width * 0.6))
    plot = widget.getPlotItem()
    every = report.config["edit_every"]
    edits = {0: "never edited", 1: "edited every turn"}.get(every, f"edited every {every} turns")
    plot.setTitle(
        f"TTFT per turn: history {report.script['history_tokens']} tokens, "
        f"block {report.script['block_tokens']} tokens, {edits}"
    )
    plot.setLabel("bottom", "measured turn")
    plot.setLabel("left", "TTFT (ms, log scale)")
    plot.setLogMode(x=False, y=True)
    plot.showGrid(x=True, y=True, alpha=0.3)
    plot.addLegend(offset=(10, 10))
    turns = sorted({s.turn + 1 for s in report.samples})
    plot.getAxis("bottom").setTicks([[(t, str(t)) for t in turns]])
    for index, (name, summary) in enumerate(report.summaries.items()):
        points = [(s.turn + 1, s.ttft_ms) for s in report.samples if s.strategy == name]
        if not points:
            continue
        colour = COLOURS.get(name, (90, 90, 90))
        median = summary.median_ttft_ms or 0.0
        plot.plot(
            [x for x, _ in points],
            [max(y, 0.01) for _, y in points],
            pen=pg.mkPen(colour, width=2),
            symbol=SYMBOLS[index % len(SYMBOLS)],
            symbolBrush=colour,
            symbolPen=colour,
            symbolSize=8,
            name=f"{name} (median {median:.0f} ms)",
        )
    values = [s.ttft_ms for s in report.samples if s.ttft_ms > 0]
    if values:  # headroom at the top keeps the legend off the slowest curves
        plot.setYRange(math.log10(min(values) / 1.5), math.log10(max(values) * 8), padding=0)
    app.processEvents()
    exporter = pyqtgraph.exporters.ImageExporter(plot)
    exporter.parameters()["width"] = width
    target = Path(path)
    exporter.export(str(target))
    widget.close()
    widget.deleteLater()
    app.processEvents()
    return target
