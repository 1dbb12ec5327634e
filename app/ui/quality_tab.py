"""The Benchmark window's "Answer quality" tab: the instruction-following eval per layout.

Why on the loaded model: the question is whether the layout changes what *this* model
answers, with its template and settings. The eval runs on the chat worker's thread
(:class:`EvalRunner` lives there), borrowing the loaded llama.cpp context with a scratch
database; chats typed meanwhile wait for it. The worker writes the finished run's rates
to the chats database, and the chat's layout menu shows them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QObject, Qt, Signal, Slot
from PySide6.QtWidgets import (
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QProgressBar,
    QSpinBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from app.eval.cases import load_cases, load_recall_probes
from app.eval.report import CaseResult, EvalReport, LayoutSummary
from app.eval.runner import DEFAULT_MAX_TOKENS, LAYOUTS, EvalConfig, Progress, run_eval
from app.session.engine import SessionError
from app.storage.records import EvalRate
from app.ui import theme
from app.ui.dialogs import start_stop_column

if TYPE_CHECKING:
    from app.session.engine import ChatEngine
    from app.ui.worker import EngineHost

#: Bar colours per eval layout (history-first as in the speed tab's chart).
BAR_COLOURS = {
    "system-first": (230, 140, 20),
    "history-first": (120, 80, 190),
    "history-first-no-commit": (30, 140, 160),
}
#: The tab's default run: one case per instruction id, 3 turns, 3 recall probes.
TAB_DEFAULTS = {"cases": 13, "turns": 3, "probes": 3}


def eta_text(done: int, total: int, elapsed_s: float) -> str:
    """Remaining time from the pace so far (turns of one run take similar times)."""
    if done <= 0 or total <= done:
        return ""
    remaining = elapsed_s / done * (total - done)
    if remaining < 60:
        return f"about {max(1, round(remaining))} s left"
    return f"about {remaining / 60:.0f} min left"


class EvalRunner(QObject):
    """Runs evals and reads the stored rates on the chat worker's thread, in its queue."""

    progress = Signal(object)  # Progress
    status = Signal(str)
    finished = Signal(object)  # EvalReport, or None when the run failed
    failed = Signal(str)
    rates_ready = Signal(object)  # dict[str, EvalRate] for the loaded model
    _run = Signal(object, object)

    def __init__(self, host: EngineHost) -> None:
        super().__init__()
        self.host = host
        self.cancel = threading.Event()
        self.moveToThread(host.engine_thread)
        self._run.connect(self._run_in_worker, Qt.ConnectionType.QueuedConnection)
        # Same thread: a newly loaded model's rates follow its load at once.
        host.worker.model_loaded.connect(self.send_rates)

    def start(self, config: EvalConfig) -> None:
        """Queue a run (GUI thread); Stop sets ``cancel``, which llama.cpp polls per token."""
        self.cancel.set()
        self.cancel = threading.Event()
        self._run.emit(config, self.cancel)

    def stop(self) -> None:
        self.cancel.set()

    def _local_session(self) -> ChatEngine:
        session = self.host.worker.session
        if session is None or session.local_backend is None:
            raise SessionError("load a local model first: the eval runs on its llama.cpp context")
        return session

    @Slot()
    def send_rates(self, *_: object) -> None:
        """The loaded model's last measured rates (worker thread)."""
        session = self.host.worker.session
        rates: dict[str, EvalRate] = {}
        if session is not None and session.local_backend is not None:
            rates = self.host.worker.store.eval_rates(session.model_identity)
        self.rates_ready.emit(rates)

    @Slot(object, object)
    def _run_in_worker(self, config: EvalConfig, cancel: threading.Event) -> None:
        """Whatever happens, ``finished`` is emitted once."""
        report: EvalReport | None = None
        try:
            session = self._local_session()
            session.save_if_changed()  # the open chat's cache, before the eval overwrites it
            try:
                report = run_eval(
                    config,
                    backend=session.local_backend,
                    template=session.template_info().choice,
                    on_result=self.progress.emit,
                    on_status=self.status.emit,
                    cancel=cancel,
                )
            finally:
                # The eval emptied the model's cells: the open chat's next turn restores it.
                if session.cache_chat_id is not None:
                    session.forget_chat(session.cache_chat_id)
                session.drop_cache()
            if not report.cancelled:
                self.host.worker.store.set_eval_rates(session.model_identity, report.rates())
                self.send_rates()
        except Exception as error:  # shown in the tab, never a crash of the app
            self.failed.emit(f"{type(error).__name__}: {error}")
        self.finished.emit(report)


class QualityTab(QWidget):
    """Sizes, Start/Stop with an ETA, rates with intervals per layout, failures side by side."""

    run_finished = Signal(object)  # EvalReport | None

    def __init__(self, runner: EvalRunner | None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.runner = runner
        self.max_tokens = DEFAULT_MAX_TOKENS  # reply tokens per turn, as the CLI's default
        self.report: EvalReport | None = None
        self.last_error: str | None = None
        self.seen: list[CaseResult] = []
        self._running = False
        self._started_at = 0.0
        self._build()
        if runner is not None:
            runner.progress.connect(self._on_progress)
            runner.status.connect(self.status_label.setText)
            runner.failed.connect(self._on_failed)
            runner.finished.connect(self._on_finished)
        theme.notifier.changed.connect(self.apply_theme)
        self.apply_theme(theme.palette())

    # -- layout -----------------------------------------------------------------------

    def _spin(self, low: int, high: int, value: int) -> QSpinBox:
        spin = QSpinBox()
        spin.setRange(low, high)
        spin.setValue(value)
        spin.setMinimumWidth(80)
        return spin

    def _build(self) -> None:
        cases = load_cases()
        self.cases_spin = self._spin(1, len(cases), TAB_DEFAULTS["cases"])
        self.cases_spin.setToolTip("Every instruction id once before any twice")
        self.turns_spin = self._spin(1, min(len(c.turns) for c in cases), TAB_DEFAULTS["turns"])
        self.turns_spin.setToolTip("Turns per chat; the last one is scored")
        self.probes_spin = self._spin(0, len(load_recall_probes()), TAB_DEFAULTS["probes"])
        form = QFormLayout()
        form.addRow("Cases", self.cases_spin)
        form.addRow("Turns", self.turns_spin)
        form.addRow("Recall probes", self.probes_spin)
        self.start_button, self.stop_button, buttons = start_stop_column()
        about = QLabel(
            "Scripted chats whose instructions are verifiable (IFEval checks), replied"
            " greedily by the loaded model under each layout: system-first, history-first"
            " (the default), and history-first without the commit (replies cached with the"
            " block in front). Chats you send meanwhile wait for the run."
        )
        about.setWordWrap(True)
        controls = QHBoxLayout()
        controls.addLayout(form)
        controls.addSpacing(12)
        controls.addWidget(about, 1)
        controls.addLayout(buttons)

        self.status_label = QLabel("Ready." if self.runner else "Open from the main window.")
        self.status_label.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setValue(0)

        self.chart = pg.PlotWidget()
        self.chart.setMinimumHeight(220)
        plot = self.chart.getPlotItem()
        plot.setMouseEnabled(x=False, y=False)
        plot.hideButtons()
        plot.setYRange(0, 100, padding=0.02)

        self.failure_list = QListWidget()
        self.failure_list.setMaximumWidth(230)
        self.reply_views: dict[str, QPlainTextEdit] = {}
        replies = QWidget()
        replies_column = QVBoxLayout(replies)
        replies_column.setContentsMargins(0, 0, 0, 0)
        replies_row = QHBoxLayout()
        for name in LAYOUTS:
            column = QVBoxLayout()
            column.addWidget(QLabel(name))
            view = QPlainTextEdit()
            view.setReadOnly(True)
            self.reply_views[name] = view
            column.addWidget(view)
            replies_row.addLayout(column)
        self.case_label = QLabel()
        self.case_label.setWordWrap(True)
        self.case_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        failures = QSplitter(Qt.Orientation.Horizontal)
        replies_column.addWidget(self.case_label)
        replies_column.addLayout(replies_row, 1)
        failures.addWidget(self.failure_list)
        failures.addWidget(replies)
        failures.setStretchFactor(1, 1)

        layout = QVBoxLayout(self)
        layout.addLayout(controls)
        layout.addWidget(self.status_label)
        layout.addWidget(self.progress)
        layout.addWidget(self.chart, 3)
        layout.addWidget(QLabel("Failures at the scored turn (each layout's reply):"))
        layout.addWidget(failures, 2)

        self.start_button.setEnabled(self.runner is not None)
        self.start_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.stop)
        self.failure_list.currentItemChanged.connect(self._show_failure)

    def apply_theme(self, colours: theme.Palette) -> None:
        self.chart.setBackground(colours.chart_background)
        plot = self.chart.getPlotItem()
        plot.setTitle(
            "Solid: instructions followed at the scored turn · light: recall · 95% intervals",
            color=colours.chart_foreground,
        )
        for side in ("bottom", "left"):
            axis = plot.getAxis(side)
            axis.setPen(pg.mkPen(colours.border))
            axis.setTextPen(pg.mkPen(colours.chart_foreground))
        plot.setLabel("left", "% of cases", color=colours.chart_foreground)
        if self.report is not None:
            self._plot(self.report)  # labels in the new theme's ink

    # -- run --------------------------------------------------------------------------

    def config(self) -> EvalConfig:
        return EvalConfig(
            cases=self.cases_spin.value(),
            turns=self.turns_spin.value(),
            probes=self.probes_spin.value(),
            max_tokens=self.max_tokens,
        )

    def is_running(self) -> bool:
        return self._running

    def start(self) -> None:
        if self.runner is None or self._running:
            return
        config = self.config()
        self.report, self.last_error, self.seen = None, None, []
        self.failure_list.clear()
        for view in self.reply_views.values():
            view.clear()
        self.chart.getPlotItem().clear()
        self.progress.setRange(0, 0)  # busy until the first reply says the total
        self.status_label.setText("Waiting for the chat worker…")
        self._started_at = time.monotonic()
        self._set_running(True)
        self.runner.start(config)

    def stop(self) -> None:
        if self.runner is not None and self._running:
            self.runner.stop()
            self.stop_button.setEnabled(False)
            self.status_label.setText("Stopping after the current token…")

    def _set_running(self, running: bool) -> None:
        self._running = running
        self.start_button.setEnabled(not running and self.runner is not None)
        self.stop_button.setEnabled(running)
        for spin in (self.cases_spin, self.turns_spin, self.probes_spin):
            spin.setEnabled(not running)

    @Slot(object)
    def _on_progress(self, progress: Progress) -> None:
        if not self._running:
            return
        self.seen.append(progress.result)
        eta = eta_text(progress.done, progress.total, time.monotonic() - self._started_at)
        self.progress.setRange(0, progress.total)
        self.progress.setValue(progress.done)
        self.progress.setFormat(f"%v/%m replies · {eta}" if eta else "%v/%m replies")
        result = progress.result
        verdict = "followed" if result.followed else "not followed"
        self.status_label.setText(
            f"{result.case} ({result.layout}), turn {result.turn}: {verdict}"
            + (f" · {eta}" if eta else "")
        )

    @Slot(str)
    def _on_failed(self, text: str) -> None:
        self.last_error = text
        self.status_label.setText(f"Eval failed: {text}")

    @Slot(object)
    def _on_finished(self, report: EvalReport | None) -> None:
        if not self._running:
            return
        self._set_running(False)
        self.report = report
        if report is not None:
            self.show_report(report)
            state = "Stopped early" if report.cancelled else "Done"
            scored = len(report.scored(report.layouts[0]))
            self.status_label.setText(
                f"{state}: {scored} cases × {len(report.layouts)} layouts in"
                f" {report.elapsed_s:.0f} s" + ("" if report.cancelled else "; rates saved.")
            )
        self.run_finished.emit(report)

    # -- results ----------------------------------------------------------------------

    def show_report(self, report: EvalReport) -> None:
        self._plot(report)
        self.failure_list.clear()
        for case in self.failed_cases(report):
            failed_in = [n for n in report.layouts if case in {r.case for r in report.failures(n)}]
            item = QListWidgetItem(f"{case} — fails in {len(failed_in)}/{len(report.layouts)}")
            item.setData(Qt.ItemDataRole.UserRole, case)
            self.failure_list.addItem(item)
        if self.failure_list.count():
            self.failure_list.setCurrentRow(0)

    @staticmethod
    def failed_cases(report: EvalReport) -> list[str]:
        """Cases that failed in at least one layout, in the order they ran."""
        failed = {r.case for name in report.layouts for r in report.failures(name)}
        ordered = dict.fromkeys(r.case for r in report.results if r.case in failed)
        return list(ordered)

    def _plot(self, report: EvalReport) -> None:
        """Per layout, a solid bar (followed) and a light one (recall), each with its interval
        and its rate written above the interval."""
        plot = self.chart.getPlotItem()
        plot.clear()
        colours = theme.palette()
        series: list[tuple[str, float, Callable[[str], LayoutSummary]]]
        series = [("followed", 0.0, report.summary)]
        if any(r.probe for r in report.results):
            series = [("followed", -0.2, report.summary), ("recall", 0.2, report.recall)]
        width = 0.8 / len(series)
        for label, offset, summary_of in series:
            summaries = [summary_of(name) for name in report.layouts]
            xs = np.array([index + offset for index in range(len(report.layouts))])
            rates = np.array([100 * (s.rate or 0.0) for s in summaries])
            lows = np.array([100 * s.ci95[0] for s in summaries])
            highs = np.array([100 * s.ci95[1] for s in summaries])
            alpha = 255 if label == "followed" else 110
            brushes = [pg.mkBrush(*BAR_COLOURS.get(n, (90, 90, 90)), alpha) for n in report.layouts]
            plot.addItem(pg.BarGraphItem(x=xs, height=rates, width=width * 0.9, brushes=brushes))
            plot.addItem(
                pg.ErrorBarItem(
                    x=xs,
                    y=rates,
                    top=highs - rates,
                    bottom=rates - lows,
                    beam=width * 0.3,
                    pen=pg.mkPen(colours.chart_foreground),
                )
            )
            for x, summary, high in zip(xs, summaries, highs, strict=True):
                text = f"{label} {summary.followed}/{summary.cases}"
                item = pg.TextItem(text, color=colours.chart_foreground, anchor=(0.5, 1.0))
                item.setPos(float(x), float(high))
                plot.addItem(item)
        plot.getAxis("bottom").setTicks([list(enumerate(report.layouts))])
        plot.setXRange(-0.6, len(report.layouts) - 0.4, padding=0)
        plot.setYRange(0, 110, padding=0)

    def _show_failure(self, item: QListWidgetItem | None) -> None:
        report = self.report
        if report is None or item is None:
            return
        case = item.data(Qt.ItemDataRole.UserRole)
        script = {c.id: c for c in load_cases()}.get(case)
        if script is not None:
            question = script.turns[min(report.turns, len(script.turns)) - 1]
            self.case_label.setText(
                f"Instructions: {script.instructions}\nTurn {report.turns}: {question}"
            )
        for name, view in self.reply_views.items():
            rows = [r for r in report.scored(name) if r.case == case]
            if not rows:
                view.setPlainText("(not run)")
                continue
            row = rows[0]
            mark = "✓ followed" if row.followed else "✗ not followed"
            cut = " · cut at max tokens" if row.finish == "length" else ""
            view.setPlainText(f"{mark}{cut}\n\n{row.reply}")

    def shown_replies(self) -> dict[str, str]:
        """The side-by-side replies as shown (tests read this)."""
        return {name: view.toPlainText() for name, view in self.reply_views.items()}
