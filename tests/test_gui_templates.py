"""Model → Chat template… on a GGUF without a template (Gemma 3 270M), through the worker."""

from __future__ import annotations

from pathlib import Path

import pytest
from gui_helpers import (
    TURN_TIMEOUT_MS,
    close_window,
    open_new_chat,
    open_window,
    send_turn,
    temp_settings,
)

from app.domain import TemplateChoice, TemplateKind
from app.ui.app import build_parser
from app.ui.main_window import MainWindow
from app.ui.template_dialog import ChatTemplateDialog


def _open_dialog(qtbot, window: MainWindow) -> ChatTemplateDialog:  # type: ignore[no-untyped-def]
    with qtbot.waitSignal(window.template_dialog_shown, timeout=TURN_TIMEOUT_MS) as shown:
        window.ask_chat_template()
    dialog = shown.args[0]
    assert isinstance(dialog, ChatTemplateDialog)
    return dialog


@pytest.mark.slow
def test_a_model_without_a_template_gets_one_chosen_in_the_app(
    qtbot, db_path: Path, tmp_path: Path, gemma_model_path: Path  # type: ignore[no-untyped-def]
) -> None:
    settings = temp_settings(tmp_path)
    window = open_window(qtbot, db_path, settings, model_path=str(gemma_model_path))
    try:
        assert window.model is not None and window.model.template == "builtin-chatml"
        assert "Chat template… chooses one (likely gemma)" in window.statusBar().currentMessage()
        window.model_menu.aboutToShow.emit()  # the menu is filled when it opens
        actions = [a.text() for a in window.model_menu.actions()]
        assert "Chat template…" in actions

        dialog = _open_dialog(qtbot, window)
        assert dialog.combo.itemText(0) == "None in the model file: ChatML"
        # Gemma 3's likely format is offered first.
        assert dialog.combo.currentText() == "gemma (llama.cpp, likely for this model)"
        dialog.select("own")
        assert dialog.choice() is None
        dialog.select("gemma")
        assert dialog.choice() == TemplateChoice(TemplateKind.BUILTIN, "gemma", "gemma")
        with qtbot.waitSignal(window.template_applied, timeout=TURN_TIMEOUT_MS) as applied:
            dialog.accept()
        assert applied.args[0].in_use == "builtin:gemma"
        assert "llama.cpp's gemma" in window.statusBar().currentMessage()

        open_new_chat(qtbot, window)
        outcome, _ = send_turn(qtbot, window, "Hello! Who are you?")
        assert outcome.reply.strip()
        for marker in ("<start_of_turn>", "<end_of_turn>", "<|im_", "<eos>"):
            assert marker not in outcome.reply

        again = _open_dialog(qtbot, window)  # the choice is shown as the current one
        assert again.choice() == TemplateChoice(TemplateKind.BUILTIN, "gemma", "gemma")
        assert "llama.cpp's gemma" in again.notes_label.text()
        again.reject()
    finally:
        close_window(window)

    # Kept for the model file: a new window on the same database starts with it.
    reopened = open_window(
        qtbot, db_path, temp_settings(tmp_path / "again"), model_path=str(gemma_model_path)
    )
    try:
        assert reopened.model is not None and reopened.model.template == "builtin:gemma"
    finally:
        close_window(reopened)


def test_a_jinja_file_can_be_chosen_in_the_dialog(qtbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from app.session.engine import TemplateInfo

    info = TemplateInfo("model.gguf", True, ("chatml", "gemma"), None, "gguf", ())
    dialog = ChatTemplateDialog(info)
    qtbot.addWidget(dialog)
    assert dialog.combo.itemText(0) == "The model's own template"
    template = tmp_path / "mine.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    assert dialog.use_file(template)
    assert dialog.choice() == TemplateChoice(
        TemplateKind.JINJA, template.read_text(encoding="utf-8"), "mine.jinja"
    )
    assert not dialog.use_file(tmp_path / "missing.jinja")
    assert "Cannot read missing.jinja" in dialog.notes_label.text()


def test_the_launcher_takes_a_chat_template(tmp_path: Path) -> None:
    parsed = build_parser().parse_args(["--chat-template", "gemma"])
    assert parsed.chat_template == TemplateChoice(TemplateKind.BUILTIN, "gemma", "gemma")
    template = tmp_path / "mine.jinja"
    template.write_text("{{ messages }}", encoding="utf-8")
    parsed = build_parser().parse_args(["--chat-template", str(template)])
    expected = TemplateChoice(TemplateKind.JINJA, "{{ messages }}", "mine.jinja")
    assert parsed.chat_template == expected
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--chat-template", str(tmp_path / "nope.jinja")])
