"""Model → Connect to server…: a base URL, a model name and a connection test.

The test runs on the engine's worker thread (the GUI thread never waits on the network);
the API key is never typed here: it comes from KVCHAT_API_KEY or the OS keyring.
"""

from __future__ import annotations

from PySide6.QtCore import Slot
from PySide6.QtWidgets import (
    QDialog,
    QDoubleSpinBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app import limits
from app.ui.dialogs import accept_buttons
from app.ui.worker import EngineHost

DEFAULT_URL = "http://127.0.0.1:8080/v1"
MIN_WIDTH = 480


class ServerDialog(QDialog):
    """Asks for the server; ``accepted`` leaves ``url()``, ``model()`` and ``timeout_s()``."""

    def __init__(
        self,
        host: EngineHost,
        url: str = "",
        model: str = "",
        parent: QWidget | None = None,
        timeout_s: float = limits.DEFAULT_SERVER_TIMEOUT_S,
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("Connect to server")
        self.host = host
        self._request_id = 0
        self.url_edit = QLineEdit(url or DEFAULT_URL)
        self.url_edit.setPlaceholderText(DEFAULT_URL)
        self.model_edit = QLineEdit(model)
        self.model_edit.setPlaceholderText("the server's first model")
        form = QFormLayout()
        form.addRow("Base URL", self.url_edit)
        form.addRow("Model", self.model_edit)
        self.timeout_spin = QDoubleSpinBox()
        self.timeout_spin.setRange(limits.MIN_SERVER_TIMEOUT_S, limits.MAX_SERVER_TIMEOUT_S)
        self.timeout_spin.setDecimals(0)
        self.timeout_spin.setSuffix(" s")
        self.timeout_spin.setValue(timeout_s)
        self.timeout_spin.setToolTip(
            "A reply is abandoned after this long without data from the server "
            "(keep-alives do not count)."
        )
        form.addRow("Timeout", self.timeout_spin)
        self.test_button = QPushButton("Test connection")
        self.test_button.clicked.connect(self.test_connection)
        self.result_label = QLabel(
            "The API key, if the server needs one, comes from KVCHAT_API_KEY or the OS keyring."
        )
        self.result_label.setWordWrap(True)
        buttons = accept_buttons(self, "Connect")
        layout = QVBoxLayout(self)
        # Wide enough for a URL and a one-line answer; grows with a wrapped answer (it was
        # 259 px wide and the success text ran under the buttons).
        self.setMinimumWidth(MIN_WIDTH)
        layout.addLayout(form)
        layout.addWidget(self.test_button)
        layout.addWidget(self.result_label)
        layout.addWidget(buttons)
        host.worker.server_probed.connect(self._on_probed)

    def url(self) -> str:
        return self.url_edit.text().strip()

    def model(self) -> str:
        return self.model_edit.text().strip()

    def timeout_s(self) -> float:
        return self.timeout_spin.value()

    def test_connection(self) -> None:
        self.result_label.setText(f"Connecting to {self.url()}…")
        self.test_button.setEnabled(False)
        self._request_id = self.host.probe_server(self.url(), self.model())

    @Slot(int, bool, str)
    def _on_probed(self, request_id: int, reachable: bool, text: str) -> None:
        if request_id != self._request_id:
            return
        self.test_button.setEnabled(True)
        self.result_label.setText(("Connected. " if reachable else "Not connected. ") + text)
        layout = self.layout()  # set in __init__; typed Optional by Qt
        if layout is None:
            return
        needed = layout.totalHeightForWidth(self.width())
        if needed > self.height():
            self.resize(self.width(), needed)

    def done(self, result: int) -> None:
        self.host.worker.server_probed.disconnect(self._on_probed)
        super().done(result)
