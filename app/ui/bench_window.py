"""The Benchmark window: runs the benchmark live and plots TTFT per turn per strategy.

Why a window: the caching claims are easiest to believe when you watch the strategies
diverge turn by turn on your own machine. The run lives in its own QThread with its own
Engines (``run_benchmark`` builds them), so it never touches the chat worker's engine;
its callbacks come back as queued signals and Stop only sets the ``cancel`` event.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from pathlib import Path
from typing import Any, TypedDict

import pyqtgraph as pg
from PySide6.QtCore import QObject, Qt, QThread, Signal, Slot
from PySide6.QtGui import QCloseEvent, QColor
from PySide6.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QStackedWidget,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app.bench.config import NAIVE, STRATEGIES, BenchConfig, TurnSample
from app.bench.plot import COLOURS, SYMBOLS
from app.bench.report import BenchReport
from app.bench.strategies import run_benchmark
from app.ui import export as exporting
from app.ui import theme
from app.ui.dialogs import start_stop_column
from app.ui.quality_tab import EvalRunner, QualityTab, eta_text
from app.ui.worker import default_thread_count

#: Per-turn CSV columns: every TurnSample field but the reply text (noise in a sheet).
CSV_FIELDS = tuple(f.name for f in dataclasses.fields(TurnSample) if f.name != "reply")
TABLE_HEADERS = ("Strategy", "Median TTFT (ms)", "Prefill tokens", "vs naive")


class WindowSizes(TypedDict):
    """The BenchConfig sizes the window changes (typed, so unpacking them is checked)."""

    history_tokens: int
    instruction_tokens: int
    message_tokens: int
    max_tokens: int
    turns: int


#: The window's sizes: a run of 24 s on 2 cores with the chat worker's single thread
#: (measured; the CLI's defaults, 3,000 history tokens x 8 turns, take minutes). Five
#: strategies x 2 turns, each turn with its idle-time steps, is most of it.
WINDOW_SIZES: WindowSizes = {
    "history_tokens": 160,
    "instruction_tokens": 80,
    "message_tokens": 24,
    "max_tokens": 8,
    "turns": 2,
}


def window_config(model_path: str | Path | None = None) -> BenchConfig:
    """The window's default run: light sizes, the chat worker's thread count."""
    return BenchConfig(model_path=model_path, n_threads=default_thread_count(), **WINDOW_SIZES)


def log_ticks(low_ms: float, high_ms: float) -> list[tuple[float, str]]:
    """1-2-5 ticks between two times, as log10 positions with readable labels."""
    ticks = []
    for exponent in range(math.floor(math.log10(max(low_ms, 1e-3))), 8):
        for mantissa in (1, 2, 5):
            value = mantissa * 10.0**exponent
            if low_ms <= value <= high_ms:
                label = f"{value / 1000:g} s" if value >= 1000 else f"{value:g} ms"
                ticks.append((math.log10(value), label))
    return ticks


class BenchWorker(QObject):
    """Runs one benchmark in its thread; callbacks are re-emitted as signals (queued to the GUI)."""

    turn_done = Signal(object)  # TurnSample
    status = Signal(str)
    finished = Signal(object)  # BenchReport, or None when the run failed
    failed = Signal(str)

    def __init__(self, config: BenchConfig, cancel: threading.Event) -> None:
        super().__init__()
        self.config = config
        self.cancel = cancel

    @Slot()
    def run(self) -> None:
        """Whatever happens, ``finished`` is emitted once so the window can join the thread."""
        report: BenchReport | None = None
        try:
            report = run_benchmark(
                self.config,
                on_turn=self.turn_done.emit,
                on_status=self.status.emit,
                cancel=self.cancel,
            )
        except Exception as error:  # shown in the window, never a crash of the app
            self.failed.emit(f"{type(error).__name__}: {error}")
        self.finished.emit(report)


class BenchWindow(QWidget):
    """Non-modal window: sizes, Start/Stop, live TTFT plot, summary table, PNG/CSV export."""

    run_finished = Signal(object)  # BenchReport | None, after the table is filled

    def __init__(
        self,
        base_config: BenchConfig | None = None,
        *,
        model_path: str | Path | None = None,
        eval_runner: EvalRunner | None = None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent, Qt.WindowType.Window)
        self.quality = QualityTab(eval_runner)
        self.setWindowTitle("KV Chat – Benchmark")
        self.base_config = base_config or window_config(model_path)
        self.samples: list[TurnSample] = []
        self.report: BenchReport | None = None
        self.last_error: str | None = None
        self.curves: dict[str, pg.PlotDataItem] = {}
        self._points: dict[str, list[tuple[int, float]]] = {}
        self._thread: QThread | None = None
        self._worker: BenchWorker | None = None
        self._cancel = threading.Event()
        self._running_config: BenchConfig | None = None
        self._build()
        self.set_config(self.base_config)
        self.resize(900, 720)

    # -- layout -----------------------------------------------------------------------

    def _spin(self, maximum: int, minimum: int = 1) -> QSpinBox:
        spin = QSpinBox()
        spin.setRange(minimum, maximum)
        spin.setMinimumWidth(90)
        return spin

    def _build(self) -> None:
        controls = self._build_controls()
        self.status_label = QLabel("Ready. Each strategy loads its own copy of the model.")
        self.status_label.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.progress.setValue(0)

        self._build_plot()
        self._started_at = 0.0
        theme.notifier.changed.connect(self.apply_theme)
        self.apply_theme(theme.palette())
        self._build_table()
        export_row = self._build_export_row()

        speed = QWidget()
        layout = QVBoxLayout(speed)
        layout.addLayout(controls)
        layout.addWidget(self.status_label)
        layout.addWidget(self.progress)
        layout.addWidget(self.plot_stack, 1)
        layout.addWidget(self.table)
        layout.addLayout(export_row)
        self.tabs = QTabWidget()
        self.tabs.addTab(speed, "Speed")
        self.tabs.addTab(self.quality, "Answer quality")
        QVBoxLayout(self).addWidget(self.tabs)

        self.start_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.stop)
        for spin in (
            self.history_spin,
            self.instruction_spin,
            self.turns_spin,
            self.edit_every_spin,
        ):
            spin.valueChanged.connect(self._on_size_changed)
        self.export_png_button.clicked.connect(self.ask_export_png)
        self.export_csv_button.clicked.connect(self.ask_export_csv)

    def _build_controls(self) -> QHBoxLayout:
        """The run's sizes on the left, Start and Stop on the right."""
        self.history_spin = self._spin(100_000)
        self.history_spin.setSingleStep(500)
        self.instruction_spin = self._spin(20_000)
        self.instruction_spin.setSingleStep(100)
        self.turns_spin = self._spin(100)
        self.edit_every_spin = self._spin(100, minimum=0)
        self.edit_every_spin.setSpecialValueText("never")
        sizes = QFormLayout()
        sizes.addRow("History tokens", self.history_spin)
        sizes.addRow("Instruction tokens", self.instruction_spin)
        left = QFormLayout()
        left.addRow("Turns", self.turns_spin)
        left.addRow("Edit every K turns", self.edit_every_spin)

        self.start_button, self.stop_button, buttons = start_stop_column()
        controls = QHBoxLayout()
        controls.addLayout(sizes)
        controls.addSpacing(16)
        controls.addLayout(left)
        controls.addStretch(1)
        controls.addLayout(buttons)
        return controls

    def _build_plot(self) -> None:
        """The chart (log scale), behind a note while there is nothing to draw."""
        self.plot_widget = pg.PlotWidget()
        self.plot_widget.setMinimumHeight(200)
        plot = self.plot_widget.getPlotItem()
        plot.setLogMode(x=False, y=True)
        plot.showGrid(x=True, y=True, alpha=0.3)
        plot.setMouseEnabled(x=False, y=False)
        plot.hideButtons()
        self.legend = plot.addLegend(offset=(10, 10))
        self.empty_label = QLabel()
        self.empty_label.setObjectName("emptyChart")
        self.empty_label.setWordWrap(True)
        self.empty_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.plot_stack = QStackedWidget()
        self.plot_stack.addWidget(self.empty_label)
        self.plot_stack.addWidget(self.plot_widget)

    def _build_table(self) -> None:
        """One row per strategy, high enough for all of them and no more."""
        self.table = QTableWidget(0, len(TABLE_HEADERS))
        self.table.setHorizontalHeaderLabels(TABLE_HEADERS)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for column in range(1, len(TABLE_HEADERS)):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        rows = len(STRATEGIES)  # fits every strategy without scrolling or empty space
        self.table.verticalHeader().setDefaultSectionSize(self.fontMetrics().height() + 8)
        height = (
            self.table.horizontalHeader().sizeHint().height()
            + rows * self.table.verticalHeader().defaultSectionSize()
            + 2 * self.table.frameWidth()
            + 2
        )
        self.table.setFixedHeight(height)

    def _build_export_row(self) -> QHBoxLayout:
        self.export_png_button = QPushButton("Export PNG…")
        self.export_csv_button = QPushButton("Export CSV…")
        self.export_png_button.setEnabled(False)
        self.export_csv_button.setEnabled(False)
        export_row = QHBoxLayout()
        export_row.addStretch(1)
        export_row.addWidget(self.export_png_button)
        export_row.addWidget(self.export_csv_button)
        return export_row

    # -- configuration ----------------------------------------------------------------

    def set_config(self, config: BenchConfig) -> None:
        """Set every field in code (tests use tiny sizes); the spin boxes show the sizes."""
        self.base_config = config
        self.history_spin.setValue(config.history_tokens)
        self.instruction_spin.setValue(config.instruction_tokens)
        self.turns_spin.setValue(config.turns)
        self.edit_every_spin.setValue(config.edit_every)
        self._show_empty_state()

    def _show_empty_state(self) -> None:
        """Before a run: what Start will do, instead of an empty plot."""
        config = self.config()
        self.empty_label.setText(
            f"Start replays one scripted chat ({config.history_tokens} history tokens, a"
            f" {config.instruction_tokens}-token instruction block, {config.turns} measured"
            f" turns) under {len(config.strategies)} caching strategies, each with its own copy"
            f" of the model on {_threads(config.n_threads)}, and plots the time to the"
            " first token of every turn."
        )
        self.plot_stack.setCurrentWidget(self.empty_label)

    def _on_size_changed(self, _value: int) -> None:
        if not self.samples and not self.is_running():
            self._show_empty_state()

    def apply_theme(self, colours: theme.Palette) -> None:
        self.plot_widget.setBackground(colours.chart_background)
        plot = self.plot_widget.getPlotItem()
        plot.setTitle("TTFT per measured turn", color=colours.chart_foreground)
        labels = (("bottom", "measured turn"), ("left", "time to first token (log scale)"))
        for side, label in labels:
            axis = plot.getAxis(side)
            axis.setPen(pg.mkPen(colours.border))
            axis.setTextPen(pg.mkPen(colours.chart_foreground))
            plot.setLabel(side, label, color=colours.chart_foreground)
        self.legend.setLabelTextColor(colours.chart_foreground)
        for _sample, label in self.legend.items:
            label.setText(label.text, color=colours.chart_foreground)
        self.legend.setBrush(pg.mkBrush(QColor(colours.window)))
        self.legend.setPen(pg.mkPen(colours.border))

    def config(self) -> BenchConfig:
        """The base config with the sizes the user chose."""
        return dataclasses.replace(
            self.base_config,
            history_tokens=self.history_spin.value(),
            instruction_tokens=self.instruction_spin.value(),
            turns=self.turns_spin.value(),
            edit_every=self.edit_every_spin.value(),
        )

    # -- run --------------------------------------------------------------------------

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.isRunning()

    def start(self) -> None:
        """Reset the plot and table, then run in a new QThread with a fresh cancel event."""
        if self._thread is not None:
            return
        config = self.config()
        try:
            config.validate()
        except ValueError as error:
            self.status_label.setText(str(error))
            return
        self._running_config = config
        self.samples = []
        self.report = None
        self.last_error = None
        self._reset_plot(config.strategies)
        self.table.setRowCount(0)
        self.progress.setRange(0, config.turns * len(config.strategies))
        self.progress.setValue(0)
        self.status_label.setText("Starting…")
        self.plot_stack.setCurrentWidget(self.plot_widget)
        self._fit_axes(config.turns)
        self._started_at = time.monotonic()
        self._set_running(True)

        self._cancel = threading.Event()
        self._worker = BenchWorker(config, self._cancel)
        self._thread = QThread()
        self._thread.setObjectName("kvchat-bench")
        self._worker.moveToThread(self._thread)
        queued = Qt.ConnectionType.QueuedConnection
        self._worker.turn_done.connect(self._on_turn, queued)
        self._worker.status.connect(self._on_status, queued)
        self._worker.failed.connect(self._on_failed, queued)
        self._worker.finished.connect(self._on_finished, queued)
        self._thread.started.connect(self._worker.run)
        self._thread.start()

    def stop(self) -> None:
        """Stop at the run's next step; ``finished`` still arrives, with a partial report."""
        if self._thread is not None:
            self._cancel.set()
            self.stop_button.setEnabled(False)
            self.status_label.setText("Stopping after the current step…")

    def _join(self) -> None:
        """Quit and join the thread; it ends right after ``finished``, so the wait is short."""
        if self._thread is None:
            return
        self._thread.quit()
        self._thread.wait()
        self._thread = None
        if self._worker is not None:
            self._worker.deleteLater()
            self._worker = None

    def _set_running(self, running: bool) -> None:
        self.start_button.setEnabled(not running)
        self.stop_button.setEnabled(running)
        for spin in (
            self.history_spin,
            self.instruction_spin,
            self.turns_spin,
            self.edit_every_spin,
        ):
            spin.setEnabled(not running)
        done = not running and bool(self.samples)
        self.export_png_button.setEnabled(done)
        self.export_csv_button.setEnabled(done)

    @Slot(str)
    def _on_status(self, text: str) -> None:
        self.status_label.setText(text)

    @Slot(str)
    def _on_failed(self, text: str) -> None:
        self.last_error = text
        self.status_label.setText(f"Benchmark failed: {text}")

    @Slot(object)
    def _on_turn(self, sample: TurnSample) -> None:
        self.samples.append(sample)
        turns = self._running_config.turns if self._running_config else sample.turn + 1
        total = self.progress.maximum()
        eta = eta_text(len(self.samples), total, time.monotonic() - self._started_at)
        self.status_label.setText(
            f"turn {sample.turn + 1}/{turns}: {sample.strategy} — TTFT {sample.ttft_ms:.0f} ms,"
            f" {sample.prefill_tokens} tokens prefilled" + (f" · {eta}" if eta else "")
        )
        self.progress.setValue(len(self.samples))
        self.progress.setFormat(f"%v/%m turns · {eta}" if eta else "%v/%m turns")
        points = self._points.setdefault(sample.strategy, [])
        points.append((sample.turn + 1, max(sample.ttft_ms, 0.01)))
        curve = self.curves.get(sample.strategy)
        if curve is not None:
            curve.setData([x for x, _ in points], [y for _, y in points])
        self._fit_axes(turns)

    def _fit_axes(self, turns: int) -> None:
        """Integer turn ticks, and headroom at the top so the legend stays off the curves."""
        plot = self.plot_widget.getPlotItem()
        plot.getAxis("bottom").setTicks([[(t, str(t)) for t in range(1, turns + 1)]])
        plot.setXRange(0.7, turns + 0.3, padding=0)
        values = [y for points in self._points.values() for _, y in points]
        # Before the first turn: whole turns and a 10 ms - 10 s span, not 0.1-0.9 and 1-10.
        low, high = (min(values) / 1.5, max(values) * 8) if values else (10.0, 10_000.0)
        plot.setYRange(math.log10(low), math.log10(high), padding=0)
        plot.getAxis("left").setTicks([log_ticks(low, high)])

    @Slot(object)
    def _on_finished(self, report: BenchReport | None) -> None:
        self._join()
        self.report = report
        if report is not None:
            self._fill_table(report)
            seconds = f"{report.elapsed_s:.1f} s"
            if report.cancelled:
                self.status_label.setText(
                    f"Stopped after {len(report.samples)} measured turns ({seconds})."
                )
            else:
                self.status_label.setText(
                    f"Done: {len(report.samples)} measured turns in {seconds}."
                )
        self._set_running(False)
        self.run_finished.emit(report)

    # -- plot and table ---------------------------------------------------------------

    def _reset_plot(self, strategies: tuple[str, ...]) -> None:
        plot = self.plot_widget.getPlotItem()
        for curve in self.curves.values():
            plot.removeItem(curve)
        self.legend.clear()
        self.curves = {}
        self._points = {}
        for index, name in enumerate(strategies):
            colour = COLOURS.get(name, (90, 90, 90))
            self.curves[name] = plot.plot(
                [],
                [],
                pen=pg.mkPen(colour, width=2),
                symbol=SYMBOLS[index % len(SYMBOLS)],
                symbolBrush=colour,
                symbolPen=colour,
                symbolSize=8,
                name=name,
            )
        self.apply_theme(theme.palette())  # the new legend entries in the theme's ink

    def _fill_table(self, report: BenchReport) -> None:
        vs_naive: dict[str, Any] = report.ratios.get(f"vs_{NAIVE}", {})
        self.table.setRowCount(len(report.summaries))
        for row, (name, summary) in enumerate(report.summaries.items()):
            ratio = vs_naive.get(name)
            cells = (
                name,
                _number(summary.median_ttft_ms),
                _number(summary.prefill_tokens),
                "—" if ratio is None else f"{ratio:.1f}×",
            )
            for column, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if column:
                    item.setTextAlignment(
                        Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
                    )
                item.setToolTip(summary.description)
                self.table.setItem(row, column, item)

    def table_strategies(self) -> list[str]:
        """Strategy names as shown in the table (tests read this)."""
        rows = range(self.table.rowCount())
        return [item.text() for row in rows if (item := self.table.item(row, 0)) is not None]

    # -- export -----------------------------------------------------------------------

    def export_png(self, path: str | Path) -> Path:
        plot = self.plot_widget
        return exporting.export_png(plot.getPlotItem(), path, plot.width() * 2)

    def export_csv(self, path: str | Path) -> Path:
        return exporting.export_csv(path, CSV_FIELDS, (dataclasses.asdict(s) for s in self.samples))

    def ask_export_png(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Export plot", "kvchat-bench.png", "PNG (*.png)"
        )
        if path:
            self.export_png(path)

    def ask_export_csv(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Export samples", "kvchat-bench.csv", "CSV (*.csv)"
        )
        if path:
            self.export_csv(path)

    # -- close ------------------------------------------------------------------------

    def closeEvent(self, event: QCloseEvent) -> None:
        """Cancel the run and join its thread: no QThread outlives the window."""
        self.quality.stop()  # the eval stops at its next token on the chat worker
        if self._thread is not None:
            self._cancel.set()
            self._join()
            self._set_running(False)
        event.accept()


def _threads(count: int | None) -> str:
    if count is None:
        return "all cores"
    return "1 thread" if count == 1 else f"{count} threads"


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"
