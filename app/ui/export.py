"""PNG and CSV export shared by the inspector and the benchmark window."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pyqtgraph.exporters import ImageExporter


def export_png(item: Any, path: str | Path, width: int) -> Path:
    """Render a pyqtgraph item (plot or layout) at least 800 px wide."""
    exporter = ImageExporter(item)
    exporter.parameters()["width"] = max(800, width)
    exporter.export(str(path))
    return Path(path)


def export_csv(path: str | Path, fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return Path(path)
