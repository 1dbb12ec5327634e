"""How long the GUI event loop is blocked while the worker prefills, generates and saves.

The 50 ms goal is measured on a quiet machine by ``python -m app bench --gui-stall``
(figures in the README). Here the same measurement keeps a loose bound: a call that
blocks the GUI thread on the model (a prefill of 1,500 tokens, a 36 MB save) shows as
seconds, while a loaded 2-core machine stretches honest stalls to a few hundred ms.
Run with ``-s`` to see the figures.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gui_helpers import temp_settings

from app.ui.app import create_application
from app.ui.stall import measure_gui_stall

pytestmark = [pytest.mark.gui, pytest.mark.slow]

STALL_BOUND_MS = 1000  # catches a blocking call; the goal (50 ms) is for a quiet machine


def test_event_loop_stays_responsive(db_path: Path, tmp_path: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    settings = temp_settings(tmp_path)
    create_application(settings=settings)
    figures = measure_gui_stall(db_path, settings)
    report = figures.describe()
    print("\n" + report)
    record_property("event_loop_stall", report)
    assert figures.prefill_tokens > 1000 and figures.saved_bytes > 0
    assert figures.streamed_tokens > 1
    for stall in (figures.prefill_ms, figures.save_ms, figures.streaming_ms):
        assert stall < STALL_BOUND_MS, report
