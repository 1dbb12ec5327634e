"""The headless CLI contract, run as real processes on the real model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CHAT = [sys.executable, "-m", "app", "chat", "--temperature", "0", "--max-tokens", "12", "--json"]


def run_app(*args: str, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        capture_output=True,
        text=True,
        input=input_text,
        timeout=300,
        check=False,
    )


def chat_turn(db: Path, name: str, message: str, *extra: str) -> dict:
    done = subprocess.run(
        [*CHAT, "--db", str(db), "--chat", name, *extra, message],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def history(db: Path, name: str) -> dict:
    done = run_app("history", "--db", str(db), "--chat", name, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_second_process_restores_the_state_and_prefills_only_the_message(
    tmp_path: Path, generation_prompt_tokens: int
) -> None:
    db = tmp_path / "cli.db"
    first = chat_turn(db, "demo", "What is the capital of France?", "--instructions", "Be brief.")
    assert first["metrics"]["state_load_ms"] is None
    assert first["metrics"]["background_tokens"] > 0
    second = chat_turn(db, "demo", "And of Spain?")
    metrics = second["metrics"]
    committed = metrics["history_tokens"]
    new_message = history(db, "demo")["messages"][-2]["tokens"]
    assert committed > 0
    assert metrics["reused_tokens"] >= committed
    assert metrics["state_load_ms"] is not None
    assert metrics["prefill_tokens"] == new_message + generation_prompt_tokens
    assert set(second) == {"reply", "metrics"}
    assert second["reply"] == history(db, "demo")["messages"][-1]["text"]


def _edited_turn(db: Path, layout: str) -> tuple[dict, int]:
    """Two turns, then a third with new instructions; its metrics and message size."""
    chat_turn(db, layout, "Name a fruit.", "--layout", layout, "--instructions", "Be brief.")
    chat_turn(db, layout, "Name a colour.")
    edited = chat_turn(db, layout, "Name a city.", "--instructions", "Answer like a pirate.")
    versions = history(db, layout)["instructions"]
    assert [v["text"] for v in versions] == ["Be brief.", "Answer like a pirate."]
    return edited["metrics"], history(db, layout)["messages"][-2]["tokens"]


def test_instruction_change_keeps_the_history_in_history_first(
    tmp_path: Path, generation_prompt_tokens: int
) -> None:
    metrics, message = _edited_turn(tmp_path / "edit.db", "history-first")
    assert metrics["reused_tokens"] >= metrics["history_tokens"]
    new_part = message + generation_prompt_tokens
    assert new_part <= metrics["prefill_tokens"] <= metrics["block_tokens"] + new_part


def test_instruction_change_recomputes_everything_in_system_first(tmp_path: Path) -> None:
    metrics, _ = _edited_turn(tmp_path / "edit.db", "system-first")
    assert metrics["reused_tokens"] < 8
    assert metrics["prefill_tokens"] >= metrics["history_tokens"]
    assert any("recomputed" in note for note in metrics["notes"])


def test_history_lists_messages_and_instruction_versions(tmp_path: Path) -> None:
    db = tmp_path / "hist.db"
    chat_turn(
        db, "h", "Hello there", "--instructions", "Reply in {{lang}}.", "--var", "lang=French"
    )
    payload = history(db, "h")
    assert [m["role"] for m in payload["messages"]] == ["user", "assistant"]
    assert payload["messages"][0]["text"] == "Hello there"
    assert payload["instructions"][0]["variables"] == {"lang": "French"}
    assert len(payload["metrics"]) == 1


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model", "/nonexistent/model.gguf"], "model file not found"),
        (["--model", "__NOT_GGUF__"], "not a GGUF model file"),
        (["--max-tokens", "-3"], "max tokens -3 is out of range"),
        (["--layout", "sideways"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_on_stderr(tmp_path: Path, args: list[str], expected: str) -> None:
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("just text")
    args = [str(not_gguf) if a == "__NOT_GGUF__" else a for a in args]
    done = run_app("chat", "--db", str(tmp_path / "x.db"), "--chat", "c", *args, "hello")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert expected in lines[0]
    assert done.stdout == ""


def test_empty_message_and_missing_chat_are_refused(tmp_path: Path) -> None:
    db = tmp_path / "e.db"
    empty = run_app("chat", "--db", str(db), "--chat", "c", "   ")
    assert empty.returncode == 1 and "empty" in empty.stderr
    missing = run_app("history", "--db", str(db), "--chat", "nope", "--json")
    assert missing.returncode == 1
    assert len(missing.stderr.strip().splitlines()) == 1


def test_message_from_stdin(tmp_path: Path) -> None:
    db = tmp_path / "stdin.db"
    done = subprocess.run(
        [*CHAT, "--db", str(db), "--chat", "s", "-"],
        input="Hi from a pipe",
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert history(db, "s")["messages"][0]["text"] == "Hi from a pipe"
