"""The cache inspector: what the cache holds now, what each turn reused or recomputed.

Everything here is display: the numbers come from the worker's signals (TurnMetrics as
dicts, CacheView, TrimPreview) and from the metrics rows in the store. The trim slider
only emits requests; the window forwards them to the worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyqtgraph as pg
from PySide6.QtCore import QRectF, Qt, QTimer, Signal
from PySide6.QtGui import QBrush, QColor, QPainter, QPen
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSizePolicy,
    QSlider,
    QStackedWidget,
    QStyledItemDelegate,
    QStyleOptionViewItem,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app.core.metrics import PHASES
from app.ui import export as exporting
from app.ui import theme
from app.ui.composer import ElidedLabel
from app.ui.theme import Palette, palette

if TYPE_CHECKING:  # the worker sends these; only it imports the engine
    from app.session.engine import CacheView, TrimPreview

pg.setConfigOptions(antialias=True)

COLOURS = {
    "reused": "#2da44e",
    "typed_ahead": "#1b9aaa",
    "prefill": "#cf222e",
    "background": "#8c959f",
    "ttft": "#8250df",
    "prefill_speed": "#bc4c00",
    "decode_speed": "#0969da",
    "preamble": "#6e7781",
    "history": "#2da44e",
    "instruction block": "#bf8700",
    "document": "#a475f9",
    "new message + reply": "#0969da",
    "cache_tokens": "#0969da",
    "state_bytes": "#bf8700",
}
TRIM_PREVIEW_DEBOUNCE_MS = 120
TRIM_APPLY_DEBOUNCE_MS = 500
CSV_FIELDS = (
    "turn",
    "reused_tokens",
    "typed_ahead_tokens",
    "prefill_tokens",
    "background_tokens",
    "commit_tokens",
    "warmup_tokens",
    "decode_tokens",
    "prompt_tokens",
    "cache_tokens",
    "state_bytes",
    "ttft_ms",
    "prefill_ms",
    "decode_ms",
    "commit_ms",
    "warmup_ms",
    "state_load_ms",
    "state_save_ms",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "trimmed_turns",
    "layout",
    "trim_mode",
    "finish_reason",
)


def format_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


BYTES_AXIS_HEADROOM = 2.0


def _axis_top(values: list[float]) -> float:
    """Upper y bound: the data's maximum plus headroom, never below 1 (axes start at 0)."""
    return max(max(values, default=0.0) * 1.15, 1.0)


CHARTS = {
    "tokens": (
        "Tokens per turn",
        "tokens",
        (
            ("reused", "reused"),
            ("typed_ahead", "typed ahead"),
            ("prefill", "recomputed"),
            ("background", "background"),
        ),
    ),
    "ttft": ("Time to first token", "ms", (("ttft", "TTFT"),)),
    "speed": ("Speed", "tok/s", (("prefill_speed", "prefill"), ("decode_speed", "decode"))),
    "cache": (
        "Cache size",
        "tokens",
        (("cache_tokens", "tokens in cache"), ("state_bytes", "saved state (MB, right)")),
    ),
}


def _chart_key(chart: str) -> str:
    """The colour key of a chart, beside the picker (a legend inside would cover data).
    Lines break only between entries, so a narrow window wraps the key, never a label."""
    muted = palette().muted
    return " &nbsp;".join(
        f"<span style='color:{COLOURS[key]}'>&#9632;</span>"
        f"<span style='color:{muted}'>&nbsp;{label.replace(' ', '&nbsp;')}</span>"
        for key, label in CHARTS[chart][2]
    )


def _points(xs: list[int], turns: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(turn, value) where the turn has that figure (older turns may lack newer fields)."""
    return [(x, float(t[key])) for x, t in zip(xs, turns, strict=True) if t.get(key)]


class SegmentBar(QWidget):
    """The cache as one horizontal bar: plan segments, solid where held, pale where not."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(26)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.parts: list[tuple[str, int, bool]] = []  # label, tokens, held in cache

    def set_view(self, view: CacheView | None) -> None:
        self.parts = []
        if view is not None:
            position = 0
            plan_parts = [s for s in view.segments if s[0] != "new message + reply"]
            for label, tokens in plan_parts:
                held = max(0, min(tokens, view.matching_tokens - position))
                if held:
                    self.parts.append((label, held, True))
                if tokens - held:
                    self.parts.append((label, tokens - held, False))
                position += tokens
            for label, tokens in view.segments:
                if label == "new message + reply":
                    self.parts.append((label, tokens, True))
        self.update()

    def paintEvent(self, _event: object) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        rect = QRectF(self.rect()).adjusted(0.5, 0.5, -0.5, -0.5)
        colours = palette()
        painter.setPen(QPen(QColor(colours.border)))
        painter.setBrush(QBrush(QColor(colours.panel)))
        painter.drawRoundedRect(rect, 4, 4)
        total = sum(tokens for _, tokens, _ in self.parts)
        if not total:
            painter.setPen(QColor(colours.muted))
            painter.drawText(rect, Qt.AlignmentFlag.AlignCenter, "cache empty")
            return
        x = rect.left()
        for label, tokens, held in self.parts:
            width = rect.width() * tokens / total
            colour = QColor(COLOURS.get(label, colours.faint))
            segment = QRectF(x, rect.top() + 1, width, rect.height() - 2)
            if held:
                painter.setPen(Qt.PenStyle.NoPen)
                painter.setBrush(colour)
            else:  # pale, with its own colour as a dashed outline: visible on dark too
                outline = QPen(colour, 1, Qt.PenStyle.DashLine)
                colour.setAlpha(110 if colours.name == "dark" else 70)
                painter.setPen(outline)
                painter.setBrush(colour)
                segment = segment.adjusted(0.5, 0.5, -0.5, -0.5)
            painter.drawRect(segment)
            if width > 46:
                painter.setPen(QColor("white") if held else QColor(colours.text))
                painter.drawText(
                    QRectF(x, rect.top(), width, rect.height()),
                    Qt.AlignmentFlag.AlignCenter,
                    str(tokens),
                )
            x += width


class ShareDelegate(QStyledItemDelegate):
    """Draws a phase's share of the turn as a bar, like a profiler."""

    def paint(self, painter: QPainter, option: QStyleOptionViewItem, index: Any) -> None:
        share = index.data(Qt.ItemDataRole.UserRole)
        if share is None:
            super().paint(painter, option, index)
            return
        rect = QRectF(option.rect).adjusted(4, 5, -4, -5)
        painter.save()
        painter.setPen(Qt.PenStyle.NoPen)
        colours = palette()
        # The figure has its own room right of the bar: drawn over the bar it was unreadable.
        label_width = option.fontMetrics.horizontalAdvance("100%") + 6
        bar = rect.adjusted(0, 0, -label_width, 0)
        painter.setBrush(QColor(colours.hover))
        painter.drawRect(bar)
        painter.setBrush(QColor(colours.accent))
        painter.drawRect(QRectF(bar.left(), bar.top(), bar.width() * float(share), bar.height()))
        painter.setPen(QColor(colours.text))
        painter.drawText(
            QRectF(bar.right(), rect.top(), label_width, rect.height()),
            Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter,
            f"{float(share) * 100:.0f}%",
        )
        painter.restore()


def phase_rows(turn: dict[str, Any]) -> list[tuple[str, float | None, str, str]]:
    """(phase, ms, tokens, rate) for the profiler table, in the order phases happen."""
    tokens = {
        "document eval": turn.get("document_eval_tokens"),
        "prefill": turn.get("prefill_tokens"),
        "decode": turn.get("decode_tokens"),
        "commit": turn.get("commit_tokens"),
        "warm-up": turn.get("warmup_tokens"),
    }
    rates = {
        "prefill": turn.get("prefill_tokens_per_s"),
        "decode": turn.get("decode_tokens_per_s"),
    }
    rows = []
    for name, key in PHASES:
        ms = turn.get(key)
        if name == "document eval" and not turn.get("document_tokens"):
            ms = None  # no document in this turn's prompt
        count = tokens.get(name)
        if name == "save state" and turn.get("state_bytes"):
            size = format_bytes(float(turn["state_bytes"]))
        else:
            size = "" if count is None else str(count)
        if name == "load state" and ms is not None:
            size = "restored" if not turn.get("state_rejected") else "rejected"
        rate = rates.get(name)
        rows.append((name, None if ms is None else float(ms), size, f"{rate:.0f}" if rate else ""))
    return rows


class CacheInspector(QWidget):
    """Live charts of the chat's turns, the cache's segments, the trim control, the phases."""

    trim_preview_requested = Signal(object, str)  # limit (None = no limit), mode
    trim_apply_requested = Signal(object, str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("inspector")
        self.turns: list[dict[str, Any]] = []
        self.turn_ids: list[int] = []
        self.view: CacheView | None = None
        self._history_tokens = 0
        self._loading = False
        layout = QVBoxLayout(self)
        layout.setContentsMargins(8, 8, 8, 8)
        layout.setSpacing(6)

        self._build_header(layout)
        self._build_trim_row(layout)
        self.tabs = QTabWidget()
        layout.addWidget(self.tabs, 1)
        self._empty_reason = ""
        self.tabs.addTab(self._build_charts(), "Charts")
        self.tabs.addTab(self._build_phases(), "Phases")
        self._build_export_row(layout)
        self._build_trim_timers()
        self.trim_slider.valueChanged.connect(self._on_slider_moved)
        self.trim_slider.sliderReleased.connect(self.apply_trim_now)
        self.mode_combo.currentIndexChanged.connect(self._on_mode_changed)
        self.turn_combo.currentIndexChanged.connect(self._show_phases)
        self.export_png_button.clicked.connect(self.ask_export_png)
        self.export_csv_button.clicked.connect(self.ask_export_csv)
        self.set_trim(None, "exact", 0)
        self.set_cache_view(None)
        theme.notifier.changed.connect(self.apply_theme)
        self.apply_theme(palette())

    def _build_header(self, layout: QVBoxLayout) -> None:
        """Title and cache size, then the segment bar and its legend."""
        header = QHBoxLayout()
        title = QLabel("Cache inspector")
        title.setObjectName("panelTitle")
        header.addWidget(title)
        header.addStretch(1)
        self.size_label = QLabel("")
        self.size_label.setObjectName("cacheSize")
        self.size_label.setWordWrap(True)  # a narrow window wraps the figures, not the panel
        self.size_label.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        header.addWidget(self.size_label, 1)
        layout.addLayout(header)

        self.segment_bar = SegmentBar()
        layout.addWidget(self.segment_bar)
        self.legend_label = QLabel("")
        self.legend_label.setObjectName("legend")
        self.legend_label.setTextFormat(Qt.TextFormat.RichText)
        self.legend_label.setWordWrap(True)
        layout.addWidget(self.legend_label)

    def _build_trim_row(self, layout: QVBoxLayout) -> None:
        """The history limit: slider, value, mode, and what a preview would drop."""
        trim_row = QHBoxLayout()
        trim_row.addWidget(QLabel("Cached history"))
        self.trim_slider = QSlider(Qt.Orientation.Horizontal)
        self.trim_slider.setObjectName("trimSlider")
        self.trim_slider.setToolTip(
            "Limit of history tokens kept in the cache. Drag to preview which turns would"
            " leave it; release to apply."
        )
        trim_row.addWidget(self.trim_slider, 1)
        self.trim_value = QLabel("no limit")
        self.trim_value.setMinimumWidth(84)
        trim_row.addWidget(self.trim_value)
        self.mode_combo = QComboBox()
        self.mode_combo.addItem("exact", "exact")
        self.mode_combo.addItem("shift", "shift")
        self.mode_combo.setToolTip(
            "exact: turns that leave the cache make the rest recompute (same result as a"
            " fresh prompt). shift: KV cells slide down instead (no recompute, approximate)."
        )
        trim_row.addWidget(self.mode_combo)
        layout.addLayout(trim_row)
        self.trim_preview_label = QLabel("")
        self.trim_preview_label.setObjectName("trimPreview")
        self.trim_preview_label.setWordWrap(True)
        self.trim_preview_label.hide()  # shown with a preview: no empty row on small screens
        layout.addWidget(self.trim_preview_label)

    def _build_phases(self) -> QWidget:
        """The Phases tab: one turn's phases, picked from a list."""
        phases = QWidget()
        phases_layout = QVBoxLayout(phases)
        phases_layout.setContentsMargins(4, 4, 4, 4)
        phases_layout.setSpacing(4)
        turn_row = QHBoxLayout()
        turn_row.addWidget(QLabel("Turn"))
        self.turn_combo = QComboBox()
        self.turn_combo.setMinimumWidth(110)
        turn_row.addWidget(self.turn_combo)
        self.turn_summary = ElidedLabel("")  # one line (whole in its tooltip): rows get room
        turn_row.addWidget(self.turn_summary, 1)
        phases_layout.addLayout(turn_row)
        self.phase_table = QTableWidget(0, 5)
        self.phase_table.setObjectName("phaseTable")
        self.phase_table.setHorizontalHeaderLabels(
            ["Phase", "Time (ms)", "Tokens", "tok/s", "Share"]
        )
        self.phase_table.verticalHeader().setVisible(False)
        # Compact rows: all seven phases show at 1280x720 (2.5 of them did at 30 px a row).
        self.phase_table.verticalHeader().setDefaultSectionSize(
            self.phase_table.fontMetrics().height() + 6
        )
        self.phase_table.verticalHeader().setMinimumSectionSize(1)
        self.phase_table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.phase_table.setSelectionMode(QTableWidget.SelectionMode.NoSelection)
        header_view = self.phase_table.horizontalHeader()
        header_view.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header_view.setSectionResizeMode(4, QHeaderView.ResizeMode.Stretch)
        self.phase_table.setItemDelegateForColumn(4, ShareDelegate(self.phase_table))
        phases_layout.addWidget(self.phase_table, 1)
        return phases

    def _build_export_row(self, layout: QVBoxLayout) -> None:
        export_row = QHBoxLayout()
        self.turn_count_label = QLabel("")
        export_row.addWidget(self.turn_count_label, 1)
        self.export_png_button = QPushButton("Export PNG…")
        self.export_csv_button = QPushButton("Export CSV…")
        export_row.addWidget(self.export_png_button)
        export_row.addWidget(self.export_csv_button)
        layout.addLayout(export_row)

    def _build_trim_timers(self) -> None:
        """A slider drag previews (debounced) and applies once it rests."""
        self._preview_timer = QTimer(self)
        self._preview_timer.setSingleShot(True)
        self._preview_timer.setInterval(TRIM_PREVIEW_DEBOUNCE_MS)
        self._preview_timer.timeout.connect(self._emit_preview)
        self._apply_timer = QTimer(self)
        self._apply_timer.setSingleShot(True)
        self._apply_timer.setInterval(TRIM_APPLY_DEBOUNCE_MS)
        self._apply_timer.timeout.connect(self.apply_trim_now)

    # -- charts ---------------------------------------------------------------------

    def _build_charts(self) -> QWidget:
        """One chart at a time, picked from a list: readable from a 1024x640 window up."""
        page = QWidget()
        page_layout = QVBoxLayout(page)
        page_layout.setContentsMargins(4, 4, 4, 4)
        page_layout.setSpacing(4)
        picker_row = QHBoxLayout()
        self.chart_picker = QComboBox()
        self.chart_picker.setObjectName("chartPicker")
        picker_row.addWidget(self.chart_picker)
        self.chart_key = QLabel("")
        self.chart_key.setObjectName("legend")
        self.chart_key.setTextFormat(Qt.TextFormat.RichText)
        self.chart_key.setWordWrap(True)
        picker_row.addWidget(self.chart_key, 1)
        page_layout.addLayout(picker_row)
        self.chart_stack = QStackedWidget()
        page_layout.addWidget(self.chart_stack, 1)
        self.empty_chart = QLabel(
            "No turns yet. Each reply adds a point: what it reused from the cache,"
            " what it recomputed, how fast, and how big the cache grew."
        )
        self.empty_chart.setObjectName("emptyChart")
        self.empty_chart.setWordWrap(True)
        self.empty_chart.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.chart_stack.addWidget(self.empty_chart)
        self._build_chart_plots()
        self._build_token_bars()
        self.ttft_curve = self._curve("ttft", "ttft", "o")
        self.prefill_speed_curve = self._curve("speed", "prefill_speed", "o")
        self.decode_speed_curve = self._curve("speed", "decode_speed", "s")
        self.cache_tokens_curve = self._curve("cache", "cache_tokens", "o")
        self._build_bytes_axis()
        self.chart_picker.currentIndexChanged.connect(self._show_chart)
        return page

    def _build_chart_plots(self) -> None:
        """One plot per chart, stacked: the picker shows one."""
        self.plots: dict[str, pg.PlotItem] = {}
        self.plot_widgets: dict[str, pg.PlotWidget] = {}
        for key, (title, unit, _keys) in CHARTS.items():
            widget = pg.PlotWidget()
            widget.setObjectName(f"chart-{key}")
            widget.setMinimumHeight(96)
            plot = widget.getPlotItem()
            plot.setLabel("left", unit)
            plot.setLabel("bottom", "turn")
            plot.showGrid(y=True, alpha=0.2)
            plot.setMouseEnabled(x=False, y=False)
            plot.hideButtons()
            plot.getAxis("left").setWidth(56)
            self.plots[key] = plot
            self.plot_widgets[key] = widget
            self.chart_stack.addWidget(widget)
            self.chart_picker.addItem(title, key)

    def _build_token_bars(self) -> None:
        """Stacked bars per turn: reused, recomputed on the critical path, background."""
        self.bars = {}
        for key, label in (
            ("reused", "reused"),
            ("typed_ahead", "typed ahead (prefilled while the message was typed)"),
            ("prefill", "recomputed (critical path)"),
            ("background", "background"),
        ):
            item = pg.BarGraphItem(
                x=[],
                height=[],
                y0=[],
                width=0.6,
                brush=COLOURS[key],
                pen=pg.mkPen(COLOURS[key]),
                name=label,
            )
            self.plots["tokens"].addItem(item)
            self.bars[key] = item

    def _build_bytes_axis(self) -> None:
        """Bytes on a second axis (right) of the cache chart: the saved state's size in MB."""
        cache_plot = self.plots["cache"]
        cache_plot.showAxis("right")
        cache_plot.setLabel("right", "saved MB")
        self.bytes_view = pg.ViewBox()
        self.bytes_view.setMouseEnabled(x=False, y=False)
        cache_plot.scene().addItem(self.bytes_view)
        cache_plot.getAxis("right").linkToView(self.bytes_view)
        self.bytes_view.setXLink(cache_plot)
        self.state_mb_curve = pg.PlotDataItem(
            [],
            [],
            pen=pg.mkPen(COLOURS["state_bytes"], width=2, style=Qt.PenStyle.DashLine),
            symbol="t",
            symbolSize=7,
            symbolBrush=COLOURS["state_bytes"],
        )
        self.bytes_view.addItem(self.state_mb_curve)
        cache_plot.vb.sigResized.connect(self._align_bytes_view)

    def _curve(self, chart: str, colour: str, symbol: str) -> pg.PlotDataItem:
        return self.plots[chart].plot(
            [],
            [],
            pen=pg.mkPen(COLOURS[colour], width=2),
            symbol=symbol,
            symbolSize=6,
            symbolBrush=COLOURS[colour],
        )

    def _align_bytes_view(self) -> None:
        plot = self.plots["cache"]
        self.bytes_view.setGeometry(plot.vb.sceneBoundingRect())
        self.bytes_view.linkedViewChanged(plot.vb, self.bytes_view.XAxis)

    def current_chart(self) -> str:
        return str(self.chart_picker.currentData())

    def _show_chart(self, *_: object) -> None:
        key = self.current_chart()
        self.chart_key.setText(_chart_key(key))
        if self.turns:
            self.chart_stack.setCurrentWidget(self.plot_widgets[key])
        else:
            self.chart_stack.setCurrentWidget(self.empty_chart)

    def apply_theme(self, colours: Palette) -> None:
        """Charts, the cache bar and the keys in the new colours."""
        for widget in self.plot_widgets.values():
            widget.setBackground(colours.chart_background)
            plot = widget.getPlotItem()
            for side in ("left", "bottom", "right"):
                axis = plot.getAxis(side)
                axis.setPen(pg.mkPen(colours.border))
                axis.setTextPen(pg.mkPen(colours.chart_foreground))
            plot.showGrid(y=True, alpha=0.25 if colours.name == "dark" else 0.2)
        self.segment_bar.update()
        self._show_chart()
        self.set_cache_view(self.view, self._empty_reason)

    def _refresh_charts(self) -> None:
        turns = self.turns
        xs = list(range(1, len(turns) + 1))
        reused = [float(t.get("reused_tokens") or 0) for t in turns]
        # Typed ahead is part of reused: drawn in its own colour on top of the rest.
        typed = [float(t.get("typed_ahead_tokens") or 0) for t in turns]
        prefill = [float(t.get("prefill_tokens") or 0) for t in turns]
        background = [float(t.get("background_tokens") or 0) for t in turns]
        earlier = [a - b for a, b in zip(reused, typed, strict=True)]
        self.bars["reused"].setOpts(x=xs, height=earlier, y0=[0.0] * len(xs))
        self.bars["typed_ahead"].setOpts(x=xs, height=typed, y0=earlier)
        self.bars["prefill"].setOpts(x=xs, height=prefill, y0=reused)
        self.bars["background"].setOpts(
            x=xs, height=background, y0=[a + b for a, b in zip(reused, prefill, strict=True)]
        )
        self.ttft_curve.setData(xs, [float(t.get("ttft_ms") or 0) for t in turns])
        prefill_points = _points(xs, turns, "prefill_tokens_per_s")
        decode_points = _points(xs, turns, "decode_tokens_per_s")
        cache_points = _points(xs, turns, "cache_tokens")
        state_points = [(x, y / 1e6) for x, y in _points(xs, turns, "state_bytes")]
        for curve, points in (
            (self.prefill_speed_curve, prefill_points),
            (self.decode_speed_curve, decode_points),
            (self.cache_tokens_curve, cache_points),
            (self.state_mb_curve, state_points),
        ):
            curve.setData([p[0] for p in points], [p[1] for p in points])
        ticks = [[(x, str(x)) for x in xs]] if len(xs) <= 20 else None
        tops = {
            "tokens": _axis_top(
                [a + b + c for a, b, c in zip(reused, prefill, background, strict=True)]
            ),
            "ttft": _axis_top([float(t.get("ttft_ms") or 0) for t in turns]),
            "speed": _axis_top([p[1] for p in prefill_points + decode_points]),
            "cache": _axis_top([p[1] for p in cache_points]),
        }
        for key, top in tops.items():
            plot = self.plots[key]
            plot.getAxis("bottom").setTicks(ticks)
            plot.setXRange(0.4, max(len(xs), 1) + 0.6, padding=0)
            plot.setYRange(0, top, padding=0)
        # The saved size grows with the tokens: on the same scale its line lay exactly under
        # the tokens line. Its own axis (right) tops at twice the data: it runs lower.
        self.bytes_view.setYRange(
            0, BYTES_AXIS_HEADROOM * _axis_top([p[1] for p in state_points]), padding=0
        )
        self._align_bytes_view()
        self._show_chart()
        count = len(turns)
        self.turn_count_label.setText(
            f"{count} turn{'s' if count != 1 else ''}" if turns else "No turns yet"
        )

    # -- data in --------------------------------------------------------------------

    def set_turns(self, rows: list[tuple[int, dict[str, Any]]]) -> None:
        """All turns of a chat: (metrics row id, metrics dict), oldest first."""
        self.turn_ids = [row_id for row_id, _ in rows]
        self.turns = [dict(data) for _, data in rows]
        self._refresh_charts()
        self._refresh_turn_combo()

    def upsert_turn(self, metrics_id: int, data: dict[str, Any]) -> None:
        """A live update: a new turn, or the same turn completed by its background steps."""
        if metrics_id in self.turn_ids:
            self.turns[self.turn_ids.index(metrics_id)] = dict(data)
        else:
            self.turn_ids.append(metrics_id)
            self.turns.append(dict(data))
        self._refresh_charts()
        self._refresh_turn_combo()

    def chart_series(self) -> dict[str, list[float]]:
        """What the charts currently plot (tests compare it with the store's rows)."""

        def heights(item: pg.BarGraphItem) -> list[float]:
            return [float(v) for v in item.opts.get("height", [])]

        return {
            "reused": heights(self.bars["reused"]),
            "typed_ahead": heights(self.bars["typed_ahead"]),
            "prefill": heights(self.bars["prefill"]),
            "background": heights(self.bars["background"]),
            "ttft_ms": [
                float(v)
                for v in (self.ttft_curve.yData if self.ttft_curve.yData is not None else [])
            ],
        }

    def set_cache_view(self, view: CacheView | None, empty_reason: str = "") -> None:
        """What the cache holds for the chat on screen; with no view, ``empty_reason`` says why."""
        self.view = view
        self._empty_reason = empty_reason
        self.segment_bar.set_view(view)
        if view is None:
            self.size_label.setText(empty_reason)
            self.legend_label.setText("")
            return
        size = view.cache_tokens * view.bytes_per_token
        text = f"{view.cache_tokens}/{view.n_ctx}\u00a0tokens"  # wraps between figures only
        tip = (
            f"Tokens held in the KV cache / context size; {format_bytes(size)} of cache in"
            " memory"
        )
        if view.saved_bytes:
            saved = format_bytes(view.saved_bytes).replace(" ", "\u00a0")
            text += f" · {saved}\u00a0saved"
            tip += (
                f"\nThis chat's saved state on disk: {format_bytes(view.saved_bytes)}"
                f" ({format_bytes(view.saved_shared_bytes)} of it shared with other chats)"
            )
        if view.budget_bytes:
            tip += (
                f"\nAll chats' saved states: {format_bytes(view.store_bytes)} of a"
                f" {format_bytes(view.budget_bytes)} budget (least recently used pages go"
                " first)"
            )
        self.size_label.setText(text)
        self.size_label.setToolTip(tip)
        parts = []
        for label, tokens in view.segments:
            colour = COLOURS.get(label, palette().faint)
            parts.append(f"<span style='color:{colour}'>■</span> {label} {tokens}")
        pending = (
            sum(t for _, t in view.segments if _ != "new message + reply") - view.matching_tokens
        )
        if view.cache_tokens == 0:
            parts.append("<i>(nothing of this chat is in the cache yet)</i>")
        elif pending > 0:
            parts.append(f"<i>(pale: {pending} not cached yet)</i>")
        self.legend_label.setText("&nbsp;&nbsp;".join(parts))

    # -- trim -----------------------------------------------------------------------

    def set_trim(self, limit: int | None, mode: str, history_tokens: int) -> None:
        """Show a chat's limit without emitting requests."""
        self._loading = True
        try:
            self._history_tokens = history_tokens
            maximum = max(history_tokens, 1)
            self.trim_slider.setRange(0, maximum)
            self.trim_slider.setSingleStep(max(1, maximum // 50))
            self.trim_slider.setPageStep(max(1, maximum // 10))
            self.trim_slider.setValue(maximum if limit is None else min(limit, maximum))
            index = self.mode_combo.findData(mode)
            self.mode_combo.setCurrentIndex(max(index, 0))
            self._show_limit()
            self.trim_preview_label.setText("")
            self.trim_preview_label.hide()
        finally:
            self._loading = False

    def trim_limit(self) -> int | None:
        """The slider's limit; the far right end means no limit."""
        value = self.trim_slider.value()
        return None if value >= self.trim_slider.maximum() else value

    def trim_mode(self) -> str:
        return str(self.mode_combo.currentData())

    def _show_limit(self) -> None:
        limit = self.trim_limit()
        self.trim_value.setText("no limit" if limit is None else f"{limit} tokens")

    def _on_slider_moved(self, _value: int) -> None:
        self._show_limit()
        if self._loading:
            return
        self._preview_timer.start()
        if not self.trim_slider.isSliderDown():
            self._apply_timer.start()  # keyboard or programmatic change: apply after a pause

    def _on_mode_changed(self, _index: int) -> None:
        if not self._loading:
            self._emit_preview()
            self.apply_trim_now()

    def _emit_preview(self) -> None:
        self.trim_preview_requested.emit(self.trim_limit(), self.trim_mode())

    def apply_trim_now(self) -> None:
        self._apply_timer.stop()
        if not self._loading:
            self.trim_apply_requested.emit(self.trim_limit(), self.trim_mode())

    def show_trim_preview(self, preview: TrimPreview) -> None:
        if preview.turns_change > 0:
            change = f"{preview.turns_change} turn(s) leave the cache"
        elif preview.turns_change < 0:
            change = f"{-preview.turns_change} turn(s) come back into the cache"
        else:
            change = "no turn changes"
        cost = f"recompute {preview.recompute_tokens} tokens"
        if preview.recompute_seconds is not None and preview.recompute_tokens:
            cost += f" (about {preview.recompute_seconds:.2f} s)"
        self.trim_preview_label.setText(
            f"{change}; {preview.kept_history_tokens} history tokens kept; {cost}"
            f" · mode {preview.mode}"
        )
        self.trim_preview_label.show()

    # -- phases ---------------------------------------------------------------------

    def _refresh_turn_combo(self) -> None:
        self.turn_combo.blockSignals(True)
        self.turn_combo.clear()
        for index in range(len(self.turns)):
            self.turn_combo.addItem(f"Turn {index + 1}", index)
        self.turn_combo.setCurrentIndex(len(self.turns) - 1)
        self.turn_combo.blockSignals(False)
        self._show_phases()

    def _show_phases(self, *_: object) -> None:
        index = self.turn_combo.currentData()
        self.phase_table.setRowCount(0)
        if index is None or not self.turns:
            self.turn_summary.setText("")
            return
        turn = self.turns[int(index)]
        rows = phase_rows(turn)
        # First token includes prefill, so shares are of the wall-clock sum without it.
        total = sum(ms for name, ms, _, _ in rows if ms and name != "first token") or 1.0
        self.phase_table.setRowCount(len(rows))
        for row, (name, ms, tokens, rate) in enumerate(rows):
            cells = [name, "—" if ms is None else f"{ms:.1f}", tokens, rate]
            for column, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if column:
                    item.setTextAlignment(
                        Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
                    )
                self.phase_table.setItem(row, column, item)
            share_item = QTableWidgetItem()
            if ms is not None and name != "first token":
                share_item.setData(Qt.ItemDataRole.UserRole, min(1.0, ms / total))
            self.phase_table.setItem(row, 4, share_item)
        self.turn_summary.setText(
            f"{turn.get('layout', '')} · reused {turn.get('reused_tokens', 0)},"
            f" recomputed {turn.get('prefill_tokens', 0)} · {turn.get('finish_reason', '')}"
        )

    # -- export ---------------------------------------------------------------------

    def export_png(self, path: str | Path) -> Path:
        """The chart on show, at least 800 px wide."""
        widget = self.plot_widgets[self.current_chart()]
        return exporting.export_png(widget.getPlotItem(), path, widget.width() * 2)

    def export_csv(self, path: str | Path) -> Path:
        rows = ({**turn, "turn": index} for index, turn in enumerate(self.turns, start=1))
        return exporting.export_csv(path, CSV_FIELDS, rows)

    def ask_export_png(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Export chart", f"kvchat-{self.current_chart()}.png", "PNG (*.png)"
        )
        if path:
            self.export_png(path)

    def ask_export_csv(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Export turn data", "kvchat-turns.csv", "CSV (*.csv)"
        )
        if path:
            self.export_csv(path)
