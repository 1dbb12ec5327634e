"""GUI pieces that need no model: rendering, texts, settings, architecture rules."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gui_helpers import close_window, open_window, temp_settings
from PySide6.QtCore import QRect, Qt
from PySide6.QtGui import (
    QGuiApplication,
    QTextBlock,
    QTextCursor,
    QTextDocument,
    QTextListFormat,
    QTextTable,
)
from PySide6.QtTest import QTest

import app
from app.core.metrics import PHASES
from app.storage.records import Message
from app.ui import system_libraries
from app.ui.chat_view import ChatView, MessageBubble
from app.ui.composer import ElidedLabel, MessageInput
from app.ui.dialogs import about_html
from app.ui.inspector import phase_rows
from app.ui.instructions import describe_edit_cost
from app.ui.markdown import markdown_blocks, markdown_to_html, plain_to_html
from app.ui.model_settings import ModelSettingsDialog

UI_DIR = Path(app.__file__).parent / "ui"
MODEL_MODULES = (
    "llama_cpp",
    "app.core.llama_backend",
    "app.session.chat_session",
    "app.core.prompt",
)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_ui_never_imports_llama_cpp() -> None:
    for path in UI_DIR.glob("*.py"):
        assert not any(name.split(".")[0] == "llama_cpp" for name in _imports(path)), path


def test_only_the_worker_imports_the_engine() -> None:
    """The window talks to the model only through the worker thread's signals."""
    for path in UI_DIR.glob("*.py"):
        if path.name == "worker.py":
            continue
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        runtime_imports = set()
        for node in tree.body:  # module level, outside `if TYPE_CHECKING:`
            if isinstance(node, ast.ImportFrom) and node.module:
                runtime_imports.add(node.module)
            elif isinstance(node, ast.Import):
                runtime_imports.update(alias.name for alias in node.names)
        assert not runtime_imports & set(MODEL_MODULES), path


def _document(html: str) -> QTextDocument:
    """What Qt makes of the HTML: the test looks at Qt's structure, not at our strings."""
    document = QTextDocument()
    document.setHtml(html)
    return document


def _blocks(document: QTextDocument) -> list[QTextBlock]:
    block, blocks = document.begin(), []
    while block.isValid():
        blocks.append(block)
        block = block.next()
    return blocks


DECIMAL = QTextListFormat.Style.ListDecimal


def test_markdown_lists_number_correctly_even_when_loose(qapp) -> None:  # type: ignore[no-untyped-def]
    document = _document(markdown_to_html("1. first\n\n2. second\n\n3. third\n\n- a\n- b"))
    numbered = [
        block.textList().itemText(block)
        for block in _blocks(document)
        if block.textList() and block.textList().format().style() == DECIMAL
    ]
    assert numbered == ["1.", "2.", "3."]
    bullets = [b.text().strip() for b in _blocks(document) if b.textList()][3:]
    assert bullets == ["a", "b"]


def test_markdown_tables_links_quotes_and_emphasis(qapp) -> None:  # type: ignore[no-untyped-def]
    html = markdown_to_html(
        "Intro with **bold**, *italic*, ~~gone~~ and `a < b`.\n\n"
        "| Tool | Uses |\n|:--|--:|\n| hammer | 3 |\n| saw | 12 |\n\n"
        "> quoted line\n\nSee [the docs](https://example.org/docs).\n\n<b>raw</b>"
    )
    document = _document(html)
    tables = [f for f in document.rootFrame().childFrames() if isinstance(f, QTextTable)]
    assert len(tables) == 1 and (tables[0].rows(), tables[0].columns()) == (3, 2)
    assert tables[0].cellAt(2, 1).firstCursorPosition().block().text() == "12"
    texts = {b.text(): b for b in _blocks(document)}
    assert (
        texts["quoted line"].blockFormat().leftMargin() > 0
        or texts["quoted line"].blockFormat().indent() > 0
    )
    anchors = []
    for block in _blocks(document):
        iterator = block.begin()
        while not iterator.atEnd():
            fragment = iterator.fragment()
            if fragment.charFormat().isAnchor():
                anchors.append((fragment.text(), fragment.charFormat().anchorHref()))
            iterator += 1
    assert anchors == [("the docs", "https://example.org/docs")]
    assert "<b>raw</b>" in document.toPlainText(), "raw HTML in a reply is shown, not run"
    assert "a < b" in document.toPlainText()


def test_code_blocks_get_their_own_copy_button(qtbot) -> None:  # type: ignore[no-untyped-def]
    text = "Two snippets:\n\n```python\nprint('<hi>')\n```\n\nand\n\n```\nls -l\n```\nDone."
    bubble = MessageBubble("assistant", text)
    qtbot.addWidget(bubble)
    views = bubble.body.code_views()
    assert [(v.block.language, v.block.code) for v in views] == [
        ("python", "print('<hi>')"),
        ("", "ls -l"),
    ]
    assert views[0].language_label.text() == "python"
    assert "color" in views[0].block.html, "Pygments coloured the Python code"
    views[0].copy_button.click()
    assert QGuiApplication.clipboard().text() == "print('<hi>')"


def test_streaming_renders_each_stage_like_the_finished_text(qtbot) -> None:  # type: ignore[no-untyped-def]
    """Half-written Markdown (an open fence, a table being typed) renders at every step,
    and the end result is exactly what the complete text renders to."""
    text = (
        "Steps:\n\n1. open\n\n2. run:\n\n```sh\nmake test\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    )
    bubble = MessageBubble("assistant", "")
    qtbot.addWidget(bubble)
    for end in range(1, len(text) + 1):
        bubble.set_text(text[:end])
        if text[:end].endswith("```sh\nmake"):
            assert bubble.body.code_views()[-1].block.code == "make", "an open fence is code"
    assert bubble.body.blocks == markdown_blocks(text)


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_model_settings_open_on_the_current_kv_type(qtbot, kv_type: str) -> None:  # type: ignore[no-untyped-def]
    dialog = ModelSettingsDialog(4096, kv_type, "model.gguf")
    qtbot.addWidget(dialog)
    assert (dialog.n_ctx(), dialog.kv_type()) == (4096, kv_type)


def test_user_text_is_escaped_not_rendered() -> None:
    assert plain_to_html("**no** <b>") == "<p style='margin:0'>**no** &lt;b&gt;</p>"


def test_edit_cost_sentence() -> None:
    assert "recomputes nothing" in describe_edit_cost(0, 0.0, 400.0)
    assert "pays only for itself" in describe_edit_cost(0, 0.0, None, text_changed=False)
    applying = describe_edit_cost(300, 0.8, 375.0, text_changed=False, layout_changed=True)
    assert applying.startswith("Applying this layout recomputes 300 tokens")
    text = describe_edit_cost(120, 0.3, 400.0)
    plain = text.replace("\u00a0", " ").replace("\u2060", "")
    assert "120 tokens" in plain and "0.30 s" in plain and "400 tok/s" in plain
    assert "400\u00a0tok\u2060/\u2060s" in text, "a figure never wraps apart from its unit"
    assert describe_edit_cost(50, None, None) == "This change recomputes 50 tokens."


def test_phase_rows_follow_the_profiler_order() -> None:
    turn = {
        "state_load_ms": 12.5,
        "prefill_ms": 80.0,
        "ttft_ms": 90.0,
        "decode_ms": 100.0,
        "commit_ms": 20.0,
        "warmup_ms": 1.0,
        "state_save_ms": 30.0,
        "prefill_tokens": 31,
        "decode_tokens": 16,
        "commit_tokens": 3,
        "warmup_tokens": 0,
        "state_bytes": 2_000_000,
        "prefill_tokens_per_s": 387.5,
        "decode_tokens_per_s": 150.0,
    }
    rows = phase_rows(turn)
    assert [row[0] for row in rows] == [name for name, _ in PHASES]
    assert rows[[row[0] for row in rows].index("prefill")] == ("prefill", 80.0, "31", "388")
    assert rows[0][2] == "restored"
    assert rows[-1][2] == "1.9 MB"
    assert phase_rows({"prefill_ms": 1.0})[0][1] is None


def test_about_names_versions_and_the_model_licence() -> None:
    text = about_html(
        model_description="llama 256M Q4_1", model_path="/m.gguf", backend_version="0.3.36"
    )
    assert app.__version__ in text and "0.3.36" in text and "llama 256M Q4_1" in text
    assert "Apache-2.0" in text


def test_signal_emits_keep_reference_counts(qapp) -> None:  # type: ignore[no-untyped-def]
    """PySide6 6.12.0 dropped a reference to True per emit (and None per processEvents)
    until CPython aborted; pyproject excludes it, and this catches any release that does it."""
    import sys

    from PySide6.QtCore import QObject, Signal
    from PySide6.QtWidgets import QApplication

    class Emitter(QObject):
        fired = Signal(int)

    emitter = Emitter()
    true_before, none_before = sys.getrefcount(True), sys.getrefcount(None)
    for value in range(5000):
        emitter.fired.emit(value)
    for _ in range(2000):
        QApplication.processEvents()
    assert sys.getrefcount(True) > true_before - 1000
    assert sys.getrefcount(None) > none_before - 1000


@pytest.mark.gui
def test_chat_view_streams_greys_and_keeps_unchanged_bubbles(qtbot) -> None:  # type: ignore[no-untyped-def]
    from app.storage.records import Message

    def message(seq: int, role: str, text: str, status: str = "complete") -> Message:
        return Message(seq + 1, 1, seq, role, text, [1] * (seq + 3), None, status, None, 0.0, None)

    view = ChatView()
    qtbot.addWidget(view)
    history = [message(0, "user", "hi"), message(1, "assistant", "**hello**")]
    view.show_messages(history, cache_start_seq=1)
    assert [b.in_cache for b in view.bubbles] == [False, True]
    assert "not in cache" in view.bubbles[0].tag_label.text()
    first = view.bubbles[0]
    view.add_pending_user("more?")
    for piece in ("Sure", ", ", "here."):
        view.append_token(piece)
    assert view.streamed_text() == "Sure, here."
    qtbot.waitUntil(lambda: view.streaming is not None and view.streaming.text == "Sure, here.")
    reply = message(3, "assistant", "Sure, here.", "cancelled")
    done = [*history, message(2, "user", "more?"), reply]
    view.sync_messages(done, cache_start_seq=0)
    assert view.bubbles[0] is first  # unchanged messages keep their widgets
    assert all(b.in_cache for b in view.bubbles)
    assert "stopped" in view.bubbles[-1].tag_label.text()
    view.mark_leaving({done[0].id, done[1].id}, preview=True)
    assert "would leave the cache" in view.bubbles[0].tag_label.text()
    assert view.bubbles[2].in_cache


@pytest.mark.gui
@pytest.mark.slow
def test_settings_geometry_and_first_run_note(qtbot, db_path: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = temp_settings(tmp_path)
    first = open_window(qtbot, db_path, settings)
    try:
        assert first.first_run_banner is not None
        assert str(db_path) in first.first_run_banner.label.text()
        assert (first.width(), first.height()) == (1400, 900)
        first.resize(1200, 800)
        about = first.about_text()
        assert "Apache-2.0" in about and first.model.backend_version in about
        assert first.model.description in about
    finally:
        close_window(first)
    assert isinstance(settings.value("window/offscreen/rect"), QRect), "per screen"
    second = open_window(qtbot, db_path, settings)
    try:
        assert second.first_run_banner is None, "the storage note is shown once"
        assert (second.width(), second.height()) == (1200, 800)
    finally:
        close_window(second)


def test_default_database_lives_in_the_user_data_dir() -> None:
    import platformdirs

    from app.ui.app import default_db_path

    path = default_db_path()
    assert path.name == "chats.db"
    assert path.parent == Path(platformdirs.user_data_dir("kvchat", appauthor=False))


def test_second_app_on_the_same_database_says_so_and_exits(
    qtbot,
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    from PySide6.QtWidgets import QMessageBox

    from app.storage.store import Store
    from app.ui import app as gui_app

    shown: list[str] = []
    monkeypatch.setattr(
        QMessageBox, "critical", staticmethod(lambda _parent, title, text: shown.append(text))
    )
    monkeypatch.setattr(gui_app, "user_settings", lambda: temp_settings(db_path.parent))
    with Store(db_path, exclusive=True):
        assert gui_app.main(["--db", str(db_path)]) == 1
    assert shown and "already open" in shown[0]


def test_unreadable_database_is_offered_a_fresh_start_and_kept(
    qtbot,
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    import os

    from PySide6.QtWidgets import QMessageBox

    from app.ui import app as gui_app

    garbage = os.urandom(20_000)
    db_path.write_bytes(garbage)
    asked: list[str] = []

    def decline(_parent, _title, text, *_buttons):  # type: ignore[no-untyped-def]
        asked.append(text)
        return QMessageBox.StandardButton.Cancel

    monkeypatch.setattr(QMessageBox, "question", staticmethod(decline))
    monkeypatch.setattr(gui_app, "user_settings", lambda: temp_settings(db_path.parent))
    assert gui_app.main(["--db", str(db_path)]) == 1
    assert "not a SQLite database" in asked[0] and "nothing is deleted" in asked[0]
    assert db_path.read_bytes() == garbage  # declining changes nothing

    moved = gui_app.offer_fresh_database(db_path, "unreadable", lambda question: True)
    assert moved is not None and moved.read_bytes() == garbage
    assert not db_path.exists()


def _message(message_id: int, role: str, status: str) -> Message:
    return Message(message_id, 1, message_id, role, f"m{message_id}", [], None, status, None, 0, 0)


def test_only_the_last_unanswered_message_offers_retry(qtbot) -> None:
    view = ChatView()
    qtbot.addWidget(view)
    view.show()
    view.show_messages([_message(1, "user", "unanswered"), _message(2, "user", "unanswered")], 0)
    first, last = view.bubbles
    assert "unanswered" in first.tag_label.text() and "unanswered" in last.tag_label.text()
    assert first.retry_button.isHidden() and not last.retry_button.isHidden()
    with qtbot.waitSignal(view.retry_requested, timeout=1000):
        last.retry_button.click()
    view.add_pending_user("next")
    assert last.retry_button.isHidden()


def test_enter_sends_and_shift_enter_adds_a_line(qtbot) -> None:  # type: ignore[no-untyped-def]
    box = MessageInput(enter_sends=True)
    qtbot.addWidget(box)
    box.setPlainText("hello")
    box.moveCursor(QTextCursor.MoveOperation.End)
    with qtbot.waitSignal(box.send_requested, timeout=1000):
        QTest.keyClick(box, Qt.Key.Key_Return)
    assert box.toPlainText() == "hello", "Enter sends without adding a newline"
    QTest.keyClick(box, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)
    assert box.toPlainText() == "hello\n"
    with qtbot.waitSignal(box.send_requested, timeout=1000):
        QTest.keyClick(box, Qt.Key.Key_Enter, Qt.KeyboardModifier.KeypadModifier)

    box.set_enter_sends(False)  # the opposite setting: Enter = new line, Ctrl+Enter = send
    with qtbot.assertNotEmitted(box.send_requested):
        QTest.keyClick(box, Qt.Key.Key_Return)
    assert box.toPlainText() == "hello\n\n"
    with qtbot.waitSignal(box.send_requested, timeout=1000):
        QTest.keyClick(box, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    assert "Ctrl+Enter sends" in box.placeholderText()


def test_status_line_elides_instead_of_widening_the_window(qtbot) -> None:  # type: ignore[no-untyped-def]
    label = ElidedLabel()
    qtbot.addWidget(label)
    label.show()
    long_text = "Reused 12345, recomputed 678 tokens · first token 1234 ms · 56 tok/s " * 4
    label.setText(long_text)
    assert label.minimumSizeHint().width() == 0
    label.resize(200, 20)
    assert label.is_elided() and label.toolTip() == long_text
    assert label.displayed_text().endswith("…") and label.text() == long_text
    label.resize(4000, 20)
    assert not label.is_elided() and label.toolTip() == ""


def test_missing_x11_libraries_are_all_named_with_their_packages() -> None:
    absent = {"libxcb-icccm.so.4", "libxcb-keysyms.so.1"}
    missing = system_libraries.missing_libraries(lambda soname: soname not in absent)
    assert missing == ["libxcb-icccm.so.4", "libxcb-keysyms.so.1"]
    message = system_libraries.missing_message(missing)
    assert "sudo apt install libxcb-icccm4 libxcb-keysyms1\n" in message
    assert "libxcb-cursor0" in message  # the full list is offered too
    assert system_libraries.uses_xcb({"DISPLAY": ":0"}, "linux")
    assert not system_libraries.uses_xcb({"DISPLAY": ":0", "WAYLAND_DISPLAY": "w"}, "linux")
    assert not system_libraries.uses_xcb({"QT_QPA_PLATFORM": "offscreen"}, "linux")
    assert system_libraries.uses_xcb({"QT_QPA_PLATFORM": "xcb"}, "linux")
    assert not system_libraries.uses_xcb({"DISPLAY": ":0"}, "darwin")


def test_the_app_names_missing_x11_libraries_instead_of_aborting(tmp_path: Path) -> None:
    """A real start on X11 where this machine lacks some of them; skipped where all exist."""
    missing = system_libraries.missing_libraries()
    if not missing:
        pytest.skip("every X11 library is installed here")
    env = {**os.environ, "QT_QPA_PLATFORM": "xcb", "DISPLAY": ":99"}
    done = subprocess.run(
        [sys.executable, "-m", "app", "--db", str(tmp_path / "chats.db")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "sudo apt install" in done.stderr and missing[0] in done.stderr
    assert not (tmp_path / "chats.db").exists(), "nothing is written before the check"
