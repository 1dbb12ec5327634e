"""The main window's toolbar and status bar widgets, built apart from the window's logic."""

from __future__ import annotations

from PySide6.QtCore import QSettings
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QLabel,
    QMenu,
    QProgressBar,
    QSizePolicy,
    QSpinBox,
    QStatusBar,
    QToolBar,
    QToolButton,
    QWidgetAction,
)

from app.ui.composer import ElidedLabel
from app.ui.sampling import SamplingPanel


class GenerationToolbar(QToolBar):
    """Which model answers, and how long and how random its replies are."""

    def __init__(self, settings: QSettings) -> None:
        super().__init__("Main")
        self.setObjectName("mainToolbar")
        self.setMovable(False)
        self.addWidget(QLabel(" Model "))
        self.model_combo = QComboBox()
        self.model_combo.setObjectName("modelCombo")
        self.model_combo.setMinimumWidth(260)
        self.addWidget(self.model_combo)
        self.addSeparator()
        self.addWidget(QLabel(" Max tokens "))
        self.max_tokens_spin = QSpinBox()
        self.max_tokens_spin.setRange(1, 4096)
        self.max_tokens_spin.setValue(int(str(settings.value("generation/max_tokens", 256))))
        self.max_tokens_spin.setToolTip("Longest reply, in tokens")
        self.addWidget(self.max_tokens_spin)
        self.addWidget(QLabel(" Temperature "))
        self.temperature_spin = QDoubleSpinBox()
        self.temperature_spin.setRange(0.0, 2.0)
        self.temperature_spin.setSingleStep(0.1)
        self.temperature_spin.setDecimals(2)
        self.temperature_spin.setValue(float(str(settings.value("generation/temperature", 0.7))))
        self.temperature_spin.setToolTip("0 always picks the most likely token (repeatable)")
        self.addWidget(self.temperature_spin)
        self.sampling_panel = SamplingPanel()
        self.sampling_button = self._sampling_button(self.sampling_panel)
        self.addWidget(self.sampling_button)

    @staticmethod
    def _sampling_button(panel: SamplingPanel) -> QToolButton:
        """The rarer sampling settings live in a pop-up, out of the way."""
        button = QToolButton()
        button.setText("Sampling")
        button.setToolTip("Top-k, top-p, min-p, repeat penalty and seed (per chat)")
        button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        menu = QMenu(button)
        panel_action = QWidgetAction(menu)
        panel_action.setDefaultWidget(panel)
        menu.addAction(panel_action)
        button.setMenu(menu)
        return button

    def save(self, settings: QSettings) -> None:
        settings.setValue("generation/max_tokens", self.max_tokens_spin.value())
        settings.setValue("generation/temperature", self.temperature_spin.value())


class StatusBarWidgets:
    """The status bar's permanent widgets: model load progress, the model, context and KV."""

    def __init__(self, bar: QStatusBar) -> None:
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(220)
        self.progress.setTextVisible(True)
        self.progress.hide()
        self.cancel_load_button = QToolButton()
        self.cancel_load_button.setText("Cancel")
        self.cancel_load_button.setToolTip("Stop loading this model; the current one stays")
        self.cancel_load_button.hide()
        self.model_status_label = ElidedLabel("")
        self.model_status_label.setSizePolicy(
            QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Preferred
        )
        self.context_label = QLabel("")
        self.kv_label = QLabel("")
        bar.addPermanentWidget(self.progress)
        bar.addPermanentWidget(self.cancel_load_button)
        bar.addPermanentWidget(self.model_status_label)
        bar.addPermanentWidget(self.context_label)
        bar.addPermanentWidget(self.kv_label)
