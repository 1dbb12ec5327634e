"""Layer boundaries: engine/storage are Qt-free, storage is model-free, ui never calls llama.cpp."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "app/core": {"PySide6", "pyqtgraph", "app.ui", "shiboken6", "app.storage", "app.session"},
    "app/session": {"PySide6", "pyqtgraph", "app.ui", "shiboken6"},
    "app/storage": {"PySide6", "pyqtgraph", "app.ui", "llama_cpp", "app.core", "shiboken6"},
    "app/ui": {"llama_cpp"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def violations(layer: str, forbidden: set[str]) -> list[str]:
    found = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for name in imported_modules(path):
            if any(name == banned or name.startswith(banned + ".") for banned in forbidden):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_stay_inside_the_boundary(layer: str) -> None:
    assert (ROOT / layer).is_dir()
    assert violations(layer, FORBIDDEN[layer]) == []


def test_boundary_check_catches_a_violation(tmp_path: Path) -> None:
    sample = tmp_path / "bad.py"
    sample.write_text("from PySide6.QtCore import QObject\nimport llama_cpp\n")
    assert {"PySide6.QtCore", "llama_cpp"} <= imported_modules(sample)


def test_engine_imports_without_qt() -> None:
    code = (
        "import sys, app.session.chat_session, app.bench.cli, app.storage.store, app.cli\n"
        "assert not any(m.startswith(('PySide6', 'pyqtgraph')) for m in sys.modules), "
        "sorted(m for m in sys.modules if m.startswith(('PySide6', 'pyqtgraph')))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_code_is_ruff_clean() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is part of the test extra"
    targets = [p for p in ("app", "tests", "scripts", "packaging") if (ROOT / p).exists()]
    done = subprocess.run([ruff, "check", *targets], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
