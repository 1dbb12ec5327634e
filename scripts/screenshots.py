"""Render the documentation screenshots offscreen, from real turns on the default model.

    python scripts/screenshots.py [--out docs] [--max-tokens 96]

Opens the main window on a temporary database and temporary settings, runs a few
turns with an instruction block (and one edit of it), waits for the background
commit/warm-up/save so the inspector is complete, then saves:

- docs/main-<w>x<h>-<light|dark>.png  the window at 1024x640, 1280x720 and 1920x1080
- docs/main-window.png      chat + instruction editor (with an edit-cost preview) + charts
- docs/inspector-phases.png the same window with the per-turn phase table
- docs/trim-preview.png     the trim slider dragged: turns that would leave the cache greyed
- docs/bench-window-*.png   the Benchmark window before and after a run with its defaults
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PySide6.QtCore import QEventLoop, QSettings
from PySide6.QtWidgets import QApplication

from app.ui.app import create_application

INSTRUCTIONS_V1 = "You are a concise assistant for a lighthouse keeper. Answer in two sentences."
INSTRUCTIONS_V2 = (
    "You are a concise assistant for a lighthouse keeper.\n"
    "Answer briefly. Use Markdown lists and code blocks when they help."
)
INSTRUCTIONS_DRAFT = INSTRUCTIONS_V2 + "\nMention the weather when it matters."
TURNS = (
    ("What does a lighthouse keeper do each evening?", None),
    ("Give me three safety tips for a stormy night, as a list.", INSTRUCTIONS_V2),
    ("Write a tiny Python function that converts nautical miles to kilometres.", None),
    ("Make a Markdown table of three lighthouse parts and what each does.", None),
    ("Thanks! In one sentence: why does the light rotate?", None),
)
TIMEOUT_S = 600.0
SIZES = ((1024, 640), (1280, 720), (1920, 1080))


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S) -> None:
    """Run the event loop until ``condition`` holds (the worker answers through signals)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        QApplication.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
        time.sleep(0.01)


def settle(seconds: float = 0.4) -> None:
    """Let layouts, repaints and debounce timers finish before a grab."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 20)
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs"))
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    create_application([sys.argv[0]])
    from app.ui import theme
    from app.ui.main_window import MainWindow

    with tempfile.TemporaryDirectory(prefix="kvchat-shots-") as folder:
        settings = QSettings(str(Path(folder) / "settings.ini"), QSettings.Format.IniFormat)
        settings.setValue("first_run/storage_note_shown", True)
        window = MainWindow(Path(folder) / "chats.db", settings=settings, n_ctx=4096)
        window.resize(1400, 900)
        window.show()
        try:
            models: list[object] = []
            window.model_ready.connect(models.append)
            wait_for(lambda: bool(models), "the model")
            replies: list[object] = []
            backgrounds: list[object] = []
            window.reply_received.connect(replies.append)
            window.background_done.connect(backgrounds.append)
            window.max_tokens_spin.setValue(args.max_tokens)
            window.temperature_spin.setValue(0.0)
            made: list[int] = []
            window.new_chat(made.append)  # the worker creates it; the window then opens it
            wait_for(lambda: bool(made), "the new chat")
            chat_id = made[0]
            window.rename_chat(chat_id, "Lighthouse notes")
            wait_for(lambda: window.host.changes_in_flight == 0, "the rename")

            def save_and_warm_up(text: str) -> None:
                """Save a version and let the idle-time warm-up finish, as a user pausing would."""
                seen = len(backgrounds)
                window.instructions.editor.setPlainText(text)
                window.save_instructions(text)
                wait_for(lambda: len(backgrounds) > seen, "the warm-up of the new instructions")

            save_and_warm_up(INSTRUCTIONS_V1)
            for index, (message, instructions) in enumerate(TURNS, start=1):
                if instructions is not None:
                    save_and_warm_up(instructions)
                window.input.setPlainText(message)
                window.send()
                wait_for(lambda n=index: len(replies) >= n, f"reply {index}")
                metrics_id = replies[-1].metrics_id  # type: ignore[attr-defined]
                wait_for(
                    lambda m=metrics_id: any(b.metrics_id == m for b in backgrounds),  # type: ignore[attr-defined]
                    f"background work of turn {index}",
                )
                print(
                    f"turn {index}: {replies[-1].metrics.reused_tokens} reused, "  # type: ignore[attr-defined]
                    f"{replies[-1].metrics.prefill_tokens} recomputed"
                )  # type: ignore[attr-defined]

            # Edit the last question: a second version of it, behind the ‹ 2/2 › arrows.
            last_question = window.store.messages(chat_id)[-2]
            window.start_edit(last_question.seq)
            window.input.setPlainText("Thanks! In one sentence: why does the lamp flash?")
            edits = len(replies)
            window.send()
            wait_for(lambda: len(replies) > edits, "the edited question's reply")
            metrics_id = replies[-1].metrics_id  # type: ignore[attr-defined]
            wait_for(
                lambda m=metrics_id: any(b.metrics_id == m for b in backgrounds),  # type: ignore[attr-defined]
                "background work of the edited turn",
            )
            chat_id = window.current_chat_id

            costs: list[object] = []
            window.edit_cost_shown.connect(lambda tokens, _seconds: costs.append(tokens))
            window.instructions.editor.setPlainText(INSTRUCTIONS_DRAFT)
            wait_for(lambda: bool(costs), "the edit-cost preview")
            window.input.setPlainText("What should I check before a storm?")
            window.inspector.tabs.setCurrentIndex(0)
            for mode in (theme.ThemeMode.LIGHT, theme.ThemeMode.DARK):
                theme.apply(mode)
                for width, height in SIZES:
                    window.resize(width, height)
                    settle()
                    window.chat_view.scroll_to_end()
                    settle(0.2)
                    name = f"main-{width}x{height}-{mode}.png"
                    got = window.size()
                    if (got.width(), got.height()) != (width, height):
                        print(f"warning: {name}: the window is {got.width()}x{got.height()}")
                    window.grab().save(str(out / name))
                    written.append(out / name)
            theme.apply(theme.ThemeMode.LIGHT)
            window.resize(1280, 720)
            window.inspector.chart_picker.setCurrentIndex(
                window.inspector.chart_picker.findData("cache")
            )
            settle()
            window.grab().save(str(out / "main-window.png"))
            written.append(out / "main-window.png")
            window.inspector.chart_picker.setCurrentIndex(0)

            window.inspector.tabs.setCurrentIndex(1)
            settle()
            window.grab().save(str(out / "inspector-phases.png"))
            written.append(out / "inspector-phases.png")

            window.inspector.tabs.setCurrentIndex(0)
            previews: list[object] = []
            window.trim_preview_shown.connect(previews.append)
            messages = window.store.messages(chat_id)
            keep = sum(len(m.token_ids) for m in messages[-4:]) + 1
            slider = window.inspector.trim_slider
            slider.setSliderDown(True)
            slider.setValue(keep)
            wait_for(lambda: bool(previews), "the trim preview")
            settle()
            window.chat_view.scroll_to_top()  # the greyed, leaving turns are the oldest
            settle(0.2)
            window.grab().save(str(out / "trim-preview.png"))
            written.append(out / "trim-preview.png")
            slider.blockSignals(True)  # leave without applying the previewed limit
            slider.setSliderDown(False)
            bench = window.show_benchmark()
            bench.resize(1024, 640)
            settle()
            bench.grab().save(str(out / "bench-window-empty.png"))
            written.append(out / "bench-window-empty.png")
            finished: list[object] = []
            bench.run_finished.connect(finished.append)
            started = time.monotonic()
            bench.start()
            wait_for(lambda: bool(finished), "the benchmark window's run")
            print(f"benchmark window run with its defaults: {time.monotonic() - started:.1f} s")
            for mode in (theme.ThemeMode.LIGHT, theme.ThemeMode.DARK):
                theme.apply(mode)
                settle()
                bench.grab().save(str(out / f"bench-window-{mode}.png"))
                written.append(out / f"bench-window-{mode}.png")
            theme.apply(theme.ThemeMode.LIGHT)
        finally:
            window.close()
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
