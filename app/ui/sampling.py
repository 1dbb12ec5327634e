"""The toolbar's Sampling panel: top-k, top-p, min-p, repeat penalty and seed, per chat.

Each chat keeps its own values (in the settings, keyed by chat id); every turn's metrics
record the values it was sampled with.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from PySide6.QtCore import QSettings, Signal
from PySide6.QtWidgets import QDoubleSpinBox, QFormLayout, QSpinBox, QWidget

from app import limits
from app.domain import Sampling

#: The GUI's seed box holds an int32; -1 (shown as "random") draws a new seed each reply.
MAX_GUI_SEED = 2**31 - 1
DEFAULT_SEED = 0


def _decimal(minimum: float, maximum: float, step: float, tip: str) -> QDoubleSpinBox:
    spin = QDoubleSpinBox()
    spin.setRange(minimum, maximum)
    spin.setSingleStep(step)
    spin.setDecimals(2)
    spin.setToolTip(tip)
    return spin


class SamplingPanel(QWidget):
    """Five fields; ``changed`` fires on every edit (the window stores them per chat)."""

    changed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("samplingPanel")
        self.top_k = QSpinBox()
        self.top_k.setRange(0, limits.MAX_TOP_K)
        self.top_k.setSpecialValueText("off")
        self.top_k.setToolTip("Pick among the k most likely tokens (0: off)")
        self.top_p = _decimal(0.0, 1.0, 0.05, "Pick among the most likely tokens up to this mass")
        self.min_p = _decimal(0.0, 1.0, 0.01, "Drop tokens below this share of the best one's")
        self.repeat_penalty = _decimal(
            1.0, limits.MAX_REPEAT_PENALTY, 0.05, "Penalise tokens the reply already used (1: off)"
        )
        self.seed = QSpinBox()
        self.seed.setRange(limits.RANDOM_SEED, MAX_GUI_SEED)
        self.seed.setSpecialValueText("random")
        self.seed.setToolTip("The same seed, prompt and settings give the same reply")
        form = QFormLayout(self)
        form.addRow("Top-k", self.top_k)
        form.addRow("Top-p", self.top_p)
        form.addRow("Min-p", self.min_p)
        form.addRow("Repeat penalty", self.repeat_penalty)
        form.addRow("Seed", self.seed)
        self.set_values(Sampling(), DEFAULT_SEED)
        for spin in (self.top_k, self.top_p, self.min_p, self.repeat_penalty, self.seed):
            spin.valueChanged.connect(self.changed)

    def sampling(self) -> Sampling:
        return Sampling(
            top_k=self.top_k.value(),
            top_p=round(self.top_p.value(), 2),
            min_p=round(self.min_p.value(), 2),
            repeat_penalty=round(self.repeat_penalty.value(), 2),
        )

    def seed_value(self) -> int:
        return self.seed.value()

    def set_values(self, sampling: Sampling, seed: int) -> None:
        """Show a chat's values without emitting ``changed``."""
        self.blockSignals(True)
        try:
            for spin, whole in ((self.top_k, sampling.top_k), (self.seed, seed)):
                spin.blockSignals(True)
                spin.setValue(whole)
                spin.blockSignals(False)
            for decimal_spin, value in (
                (self.top_p, sampling.top_p),
                (self.min_p, sampling.min_p),
                (self.repeat_penalty, sampling.repeat_penalty),
            ):
                decimal_spin.blockSignals(True)
                decimal_spin.setValue(value)
                decimal_spin.blockSignals(False)
        finally:
            self.blockSignals(False)


def _key(chat_id: int) -> str:
    return f"sampling/chat-{chat_id}"


def load_chat_sampling(settings: QSettings, chat_id: int) -> tuple[Sampling, int]:
    """A chat's stored values; the defaults when none (or unreadable ones) are stored."""
    raw = settings.value(_key(chat_id))
    if not raw:
        return Sampling(), DEFAULT_SEED
    try:
        data = json.loads(str(raw))
        sampling = Sampling(
            top_k=int(data["top_k"]),
            top_p=float(data["top_p"]),
            min_p=float(data["min_p"]),
            repeat_penalty=float(data["repeat_penalty"]),
        )
        seed = int(data["seed"])
        limits.check_sampling(
            sampling.top_k, sampling.top_p, sampling.min_p, sampling.repeat_penalty
        )
        limits.check_seed(seed)
    except (ValueError, KeyError, TypeError):
        return Sampling(), DEFAULT_SEED
    return sampling, min(seed, MAX_GUI_SEED)


def store_chat_sampling(settings: QSettings, chat_id: int, sampling: Sampling, seed: int) -> None:
    settings.setValue(_key(chat_id), json.dumps({**asdict(sampling), "seed": seed}))
