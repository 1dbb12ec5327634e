"""Every ``python -m app …`` command the README shows is routed and runs as written.

The commands are read from the README's code blocks, so a command documented there can
never be left unrouted again. They run as real processes against a database in a temporary
folder: chat, history, fork, storage and export exactly as written; the first bench line
with small sizes and the other bench lines with ``--help`` (each bench run takes 30-90 s on
a loaded 2-core machine even when small); the server lines with ``--help`` (they need a
running server, which ``tests/test_remote.py`` covers).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from app.__main__ import CLI_COMMANDS
from app.arguments import COMMANDS
from app.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PREFIX = ["python", "-m", "app"]
#: Small bench sizes: the same code paths in seconds instead of minutes.
SMALL_BENCH = {
    "--history-tokens": "40",
    "--instruction-tokens": "20",
    "--message-tokens": "8",
    "--turns": "1",
    "--max-tokens": "2",
}


def readme_commands() -> list[list[str]]:
    """The arguments of each ``python -m app`` line in the README's code blocks, in order
    (a line ending in a backslash continues on the next; ``#`` starts a comment)."""
    commands: list[list[str]] = []
    in_block, pending = False, ""
    for raw in README.read_text(encoding="utf-8").splitlines():
        if raw.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        words = shlex.split(line, comments=True)
        if words[:3] == PREFIX:
            commands.append(words[3:])
    return commands


def _set(args: list[str], option: str, value: str) -> list[str]:
    if option in args:
        index = args.index(option)
        return [*args[: index + 1], value, *args[index + 2 :]]
    return [*args, option, value]


def runnable(args: list[str], *, first_bench: bool) -> list[str]:
    """The command as the test runs it: files in the working folder; the first bench line
    with small sizes, the other bench lines, the eval lines (minutes each; a small eval
    runs in test_eval.py) and what needs a server with ``--help``."""
    args = [word.removeprefix("docs/") for word in args]  # plots land in the temp folder
    slow = args and (args[0] == "eval" or (args[0] == "bench" and not first_bench))
    if "--server" in args or slow:
        return [*args, "--help"]
    if args and args[0] == "bench":
        for option, value in SMALL_BENCH.items():
            args = _set(args, option, value)
    return args


def test_the_readme_shows_every_command_and_each_is_routed() -> None:
    commands = readme_commands()
    assert len(commands) >= 10, commands
    shown = {args[0] for args in commands if args and not args[0].startswith("-")}
    assert shown == set(COMMANDS) == set(CLI_COMMANDS), shown
    assert ["--help"] in commands
    parser = build_parser()
    for args in commands:
        if args[0] in COMMANDS:
            parser.parse_args(args)  # exits (fails the test) on an option it does not know


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QT_QPA_PLATFORM": "offscreen"}
    outputs: dict[str, list[str]] = {}
    report = "# Report\n\nThe harbour council wrote this report on the ferry timetable.\n"
    (tmp_path / "report.md").write_text(report, encoding="utf-8")  # the --document lines
    for args in readme_commands():
        command = runnable(args, first_bench="bench" not in outputs)
        done = subprocess.run(
            [sys.executable, "-m", "app", *command],
            capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path, env=env,
        )  # fmt: skip
        assert done.returncode == 0, (command, done.stderr[-2000:])
        assert "Traceback" not in done.stderr, (command, done.stderr[-2000:])
        outputs.setdefault(command[0], []).append(done.stdout)
    history = json.loads(outputs["history"][0])
    assert [m["role"] for m in history["messages"]] == ["user", "assistant"] * 2
    fork = json.loads(outputs["fork"][0])
    assert (fork["chat"], fork["messages"]) == ("demo-b", 2)
    assert json.loads(outputs["storage"][0])["chats"]
    assert (tmp_path / "demo.md").read_text(encoding="utf-8").startswith("# demo")
    assert "export" in outputs["--help"][0] and "history" in outputs["--help"][0]
    assert (tmp_path / "bench-edit-every-turn.png").stat().st_size > 1000
