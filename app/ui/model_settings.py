"""Model → Model settings…: context size and KV cache type; the model reloads to apply them.

Both settings change the shape of the KV cache, so saved states made with other values
are not reused (the next turn of each chat recomputes once and says why). The dialog
says so before the user applies.
"""

from __future__ import annotations

from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QFormLayout,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from app import limits
from app.domain import KVType
from app.ui.dialogs import accept_buttons, hint_label

KV_TYPE_LABELS = {
    KVType.F16: "f16 (exact, 2 bytes per value)",
    KVType.Q8_0: "q8_0 (about half the memory, near exact)",
}


class ModelSettingsDialog(QDialog):
    """Edits (n_ctx, kv_type); accepted means: reload the model with them."""

    def __init__(
        self, n_ctx: int, kv_type: str, model_name: str, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("Model settings")
        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.n_ctx_spin = QSpinBox()
        self.n_ctx_spin.setRange(limits.MIN_N_CTX, limits.MAX_N_CTX)
        self.n_ctx_spin.setSingleStep(1024)
        self.n_ctx_spin.setSuffix(" tokens")
        self.n_ctx_spin.setValue(n_ctx)
        self.n_ctx_spin.setToolTip(
            "The longest prompt (history + instructions + message + reply) the model sees."
            " Memory grows with it."
        )
        form.addRow("Context size", self.n_ctx_spin)
        self.kv_combo = QComboBox()
        for choice in KVType:
            self.kv_combo.addItem(KV_TYPE_LABELS.get(choice, str(choice)), str(choice))
        self.kv_combo.setCurrentIndex(max(self.kv_combo.findData(kv_type), 0))
        form.addRow("KV cache type", self.kv_combo)
        layout.addLayout(form)
        layout.addWidget(
            hint_label(
                f"Applying reloads {model_name}. Saved caches made with another context size"
                " or KV type are not reused: each chat's next turn recomputes its history once."
            )
        )
        layout.addWidget(accept_buttons(self, "Reload model"))

    def n_ctx(self) -> int:
        return self.n_ctx_spin.value()

    def kv_type(self) -> str:
        return str(self.kv_combo.currentData())
