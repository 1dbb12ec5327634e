"""The window fits the screen it opens on: 1024x640 and 1280x720, under a real X server.

Each size runs tests/layout_probe.py in a child process (a QApplication's screens are
fixed at start): under Xvfb with the xcb platform where Xvfb exists (``.ci/run`` installs
it), otherwise on an offscreen screen of that size. The real model answers one turn so the
status line holds real figures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("layout_probe.py")
SIZES = ((1024, 640), (1280, 720))
PHASE_ROWS_SHOWN = {640: 4, 720: 8}  # Phases rows visible without scrolling (of 8)

pytestmark = [pytest.mark.gui, pytest.mark.slow]


def _start_xvfb(width: int, height: int) -> tuple[subprocess.Popen[bytes], str] | None:
    """Xvfb on a free display number (it writes the number to a pipe), or None."""
    if shutil.which("Xvfb") is None:
        return None
    read_end, write_end = os.pipe()
    server = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_end), "-screen", "0", f"{width}x{height}x24",
         "-nolisten", "tcp"],
        pass_fds=(write_end,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        number = pipe.readline().strip()
    if not number:
        server.kill()
        server.wait()
        return None
    return server, f":{number}"


def _xcb_works(env: dict[str, str]) -> bool:
    """The xcb plugin needs X libraries that a bare machine may lack: then offscreen."""
    check = subprocess.run(
        [sys.executable, "-c", "from PySide6.QtGui import QGuiApplication; QGuiApplication([])"],
        env=env, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    return check.returncode == 0


@pytest.fixture(params=SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def screen_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    width, height = request.param
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    xvfb = _start_xvfb(width, height)
    try:
        if xvfb is not None:
            env.update(DISPLAY=xvfb[1], QT_QPA_PLATFORM="xcb")
        if xvfb is None or not _xcb_works(env):
            config = tmp_path / "screen.json"
            screen = {"name": "small", "x": 0, "y": 0, "width": width, "height": height,
                      "logicalDpi": 96, "logicalBaseDpi": 96, "dpr": 1}  # fmt: skip
            config.write_text(json.dumps({"screens": [screen]}))
            env["QT_QPA_PLATFORM"] = f"offscreen:configfile={config}"
        env["KVCHAT_EXPECT"] = f"{width}x{height}"
        yield env
    finally:
        if xvfb is not None:
            xvfb[0].kill()
            xvfb[0].wait()


def test_window_benchmark_and_status_fit_a_small_screen(screen_env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, str(PROBE)], env=screen_env, cwd=ROOT, capture_output=True,
        text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    width, height = (int(n) for n in screen_env["KVCHAT_EXPECT"].split("x"))
    assert report["screen"] == [width, height], report
    assert report["window_fits"], f"the main window leaves the screen: {report}"
    assert report["input_on_screen"] and report["send_on_screen"], report
    assert report["status_bar_on_screen"], report
    assert report["status"].startswith("Reused") and not report["status_elided"], report
    shown, rows = report["phase_rows"]
    assert rows == 8 and shown >= PHASE_ROWS_SHOWN[height], report
    assert report["bench_fits"], f"the Benchmark window leaves the screen: {report}"
    assert report["bench_table_on_screen"] and report["bench_export_on_screen"], report
