"""The Benchmark window's Answer quality tab: a real eval on the loaded model, through the
chat worker, its chart and failures, the stored rates in the layout menu, Stop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyqtgraph as pg
import pytest
from gui_helpers import TURN_TIMEOUT_MS, close_window, open_window, send_turn, temp_settings
from PySide6.QtCore import QSettings

from app.core.models import model_file_identity
from app.eval.cases import load_cases
from app.eval.runner import LAYOUTS
from app.storage.records import EvalRate
from app.storage.store import Store
from app.ui.main_window import MainWindow

pytestmark = [
    pytest.mark.gui,
    pytest.mark.slow,
    # show_benchmark raises the window, which the offscreen platform cannot do.
    pytest.mark.qt_log_ignore("This plugin does not support raise"),
]


@pytest.fixture
def settings(tmp_path: Path) -> QSettings:
    return temp_settings(tmp_path)


def _tab(qtbot: Any, window: MainWindow, **sizes: int) -> Any:
    bench = window.show_benchmark()
    bench.tabs.setCurrentWidget(bench.quality)
    tab = bench.quality
    tab.cases_spin.setValue(sizes.get("cases", 2))
    tab.turns_spin.setValue(sizes.get("turns", 2))
    tab.probes_spin.setValue(sizes.get("probes", 1))
    tab.max_tokens = sizes.get("max_tokens", 16)
    return tab


def _combo_texts(window: MainWindow) -> dict[str, str]:
    combo = window.instructions.layout_combo
    return {str(combo.itemData(i)): combo.itemText(i) for i in range(combo.count())}


def test_a_run_on_the_loaded_model_charts_stores_and_shows_rates(
    qtbot: Any, db_path: Path, settings: QSettings
) -> None:
    window = open_window(qtbot, db_path, settings)
    try:
        first, _ = send_turn(qtbot, window, "Name a colour.")
        tab = _tab(qtbot, window)
        with qtbot.waitSignal(tab.run_finished, timeout=TURN_TIMEOUT_MS) as blocker:
            tab.start_button.click()
            assert tab.is_running() and not tab.start_button.isEnabled()
        report = blocker.args[0]
        assert report is not None and not report.cancelled, tab.last_error
        assert not tab.is_running() and tab.start_button.isEnabled()
        assert tab.progress.maximum() == tab.progress.value() == len(LAYOUTS) * (2 * 2 + 3)
        assert len(tab.seen) == len(report.results)

        bars = [i for i in tab.chart.getPlotItem().items if isinstance(i, pg.BarGraphItem)]
        assert len(bars) == 2  # followed and recall, one bar per layout each
        heights = list(bars[0].opts["height"])
        assert heights == [100 * (report.summary(n).rate or 0) for n in LAYOUTS]

        failed = tab.failed_cases(report)
        # Greedy and deterministic: SmolLM2 writes neither all-lowercase nor all-caps replies.
        assert failed, "the run should have failures to browse"
        assert tab.failure_list.count() == len(failed)
        shown = tab.shown_replies()
        for name in LAYOUTS:
            (row,) = [r for r in report.scored(name) if r.case == failed[0]]
            assert shown[name].endswith(row.reply)
            assert shown[name].startswith("✓" if row.followed else "✗")
        (case,) = [c for c in load_cases() if c.id == failed[0]]
        assert case.instructions in tab.case_label.text()
        assert case.turns[1] in tab.case_label.text()

        identity = model_file_identity(Path(window.model.path))  # type: ignore[union-attr]
        stored = window.store.eval_rates(identity)
        assert set(stored) == set(LAYOUTS)
        for name in LAYOUTS:
            assert stored[name].rate == report.summary(name).rate
        expected = f"{stored['history-first'].rate:.0%} followed"
        qtbot.waitUntil(lambda: expected in _combo_texts(window)["history-first"])
        assert f"{stored['system-first'].rate:.0%} followed" in _combo_texts(window)["system-first"]

        # The chat goes on after the eval borrowed its context.
        again, _ = send_turn(qtbot, window, "Name another colour.")
        assert again.reply_message_id is not None and again.chat_id == first.chat_id
    finally:
        close_window(window)


def test_stop_ends_the_run_early_and_stores_nothing(
    qtbot: Any, db_path: Path, settings: QSettings
) -> None:
    window = open_window(qtbot, db_path, settings)
    try:
        tab = _tab(qtbot, window, cases=13, turns=3, probes=3, max_tokens=48)
        with qtbot.waitSignal(tab.run_finished, timeout=TURN_TIMEOUT_MS) as blocker:
            tab.start_button.click()
            qtbot.waitUntil(lambda: len(tab.seen) >= 1, timeout=TURN_TIMEOUT_MS)
            tab.stop_button.click()
        report = blocker.args[0]
        assert report is not None and report.cancelled
        assert len(report.results) < len(LAYOUTS) * 13 * 3
        assert "Stopped early" in tab.status_label.text()
        identity = model_file_identity(Path(window.model.path))  # type: ignore[union-attr]
        assert window.store.eval_rates(identity) == {}
        assert "followed" not in _combo_texts(window)["history-first"]
    finally:
        close_window(window)


def test_the_layout_menu_shows_the_models_last_rates_when_it_loads(
    qtbot: Any, db_path: Path, settings: QSettings, model_path: Path
) -> None:
    with Store(db_path) as store:
        store.set_eval_rates(
            model_file_identity(model_path),
            [
                EvalRate("history-first", 20, 7, 0.18, 0.57, 0.9, 3),
                EvalRate("system-first", 20, 9, 0.26, 0.66, 1.0, 3),
                EvalRate("history-first-no-commit", 20, 5, 0.11, 0.47, 0.8, 3),
            ],
        )
    window = open_window(qtbot, db_path, settings)
    try:
        qtbot.waitUntil(lambda: "35% followed" in _combo_texts(window)["history-first"])
        assert "45% followed" in _combo_texts(window)["system-first"]
        combo = window.instructions.layout_combo
        tip = combo.itemData(combo.findData("history-first"), 3)  # ToolTipRole
        assert "7/20" in tip and "without the commit step: 25%" in tip
    finally:
        close_window(window)
