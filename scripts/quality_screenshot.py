"""Render docs/bench-window-quality.png: the Benchmark window's Answer quality tab after a
small real eval on the default model (offscreen).

    python scripts/quality_screenshot.py [--out docs] [--cases 8] [--turns 2] [--probes 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PySide6.QtCore import QSettings

from app.ui.app import create_application
from scripts.screenshots import settle, wait_for


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs"))
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--probes", type=int, default=2)
    args = parser.parse_args(argv)
    create_application([sys.argv[0]])
    from app.ui.main_window import MainWindow

    with tempfile.TemporaryDirectory(prefix="kvchat-shots-") as folder:
        settings = QSettings(str(Path(folder) / "settings.ini"), QSettings.Format.IniFormat)
        settings.setValue("first_run/storage_note_shown", True)
        window = MainWindow(Path(folder) / "chats.db", settings=settings, n_ctx=4096)
        window.show()
        try:
            models: list[object] = []
            window.model_ready.connect(models.append)
            wait_for(lambda: bool(models), "the model")
            bench = window.show_benchmark()
            bench.resize(1100, 820)
            bench.tabs.setCurrentWidget(bench.quality)
            tab = bench.quality
            tab.cases_spin.setValue(args.cases)
            tab.turns_spin.setValue(args.turns)
            tab.probes_spin.setValue(args.probes)
            finished: list[object] = []
            tab.run_finished.connect(finished.append)
            started = time.monotonic()
            tab.start()
            wait_for(lambda: bool(finished), "the eval", timeout_s=1800)
            print(f"eval in the window: {time.monotonic() - started:.0f} s")
            settle()
            path = Path(args.out) / "bench-window-quality.png"
            bench.grab().save(str(path))
            print(path)
        finally:
            window.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
