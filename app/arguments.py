"""argparse value types shared by every command (one wording for every bad number)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from app import domain, limits

#: The command-line commands and their one-line help: ``python -m app COMMAND`` routes
#: exactly these to the CLI (anything else opens the window), and ``--help`` lists them.
COMMANDS: dict[str, str] = {
    "chat": "append one turn to a chat",
    "history": "print a chat's messages and instructions",
    "fork": "start a new chat from a chat's first messages",
    "export": "write a chat as Markdown or JSON (with metrics)",
    "storage": "KV page storage per chat and in total",
    "bench": "compare caching strategies on one scripted chat",
    "eval": "instruction following per prompt layout (greedy, on the real model)",
}


def commands_epilog(prog: str) -> str:
    """The command list for ``--help`` of the window's parser (one per line)."""
    lines = [f"commands (`{prog} COMMAND --help` for each):"]
    lines += [f"  {name:<9} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from error


def positive_int(text: str) -> int:
    """A count that must be at least 1."""
    value = _whole(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
    return value


def whole_number(text: str) -> int:
    """A count where 0 is meaningful (e.g. "never")."""
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value

_T = TypeVar("_T")


def _checked(check: Callable[[_T], _T], value: _T) -> _T:
    try:
        return check(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def temperature(text: str) -> float:
    """0 (greedy) to MAX_TEMPERATURE; nan, inf and negatives are refused."""
    try:
        value = float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from error
    return _checked(limits.check_temperature, value)


def server_timeout(text: str) -> float:
    """Seconds without data from a server before a reply is abandoned."""
    try:
        value = float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from error
    return _checked(limits.check_server_timeout, value)


def seed(text: str) -> int:
    """A fixed seed (0 .. 2**32 - 2) or -1 for a random one; never silently truncated."""
    return _checked(limits.check_seed, _whole(text))


def max_tokens(text: str) -> int:
    return _checked(limits.check_max_tokens, _whole(text))


def alternatives(text: str) -> int:
    return _checked(limits.check_alternatives, _whole(text))


def trim_tokens(text: str) -> int:
    return _checked(limits.check_trim_tokens, _whole(text))


def n_ctx(text: str) -> int:
    return _checked(limits.check_n_ctx, _whole(text))


def chat_template(text: str) -> domain.TemplateChoice:
    """``--chat-template NAME|FILE``: a Jinja file, the name of a llama.cpp built-in format
    (checked against llama.cpp's list when the model loads), or ``gguf``: the GGUF's own."""
    path = Path(text).expanduser()
    if path.is_file():
        try:
            if path.stat().st_size > 4 * limits.MAX_TEMPLATE_CHARS:
                message = f"the chat template file {text} is too large for a chat template"
                raise argparse.ArgumentTypeError(message)
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            message = f"cannot read chat template {text}: {error}"
            raise argparse.ArgumentTypeError(message) from error
        if not source.strip():
            raise argparse.ArgumentTypeError(f"the chat template file {text} is empty")
        return domain.TemplateChoice(domain.TemplateKind.JINJA, source, path.name)
    if not text.strip() or "/" in text or text.endswith(".jinja") or path.exists():
        raise argparse.ArgumentTypeError(f"chat template file not found: {text}")
    name = text.strip()
    if name == domain.TemplateKind.GGUF:
        return domain.TemplateChoice(domain.TemplateKind.GGUF, "", "the model's own")
    return domain.TemplateChoice(domain.TemplateKind.BUILTIN, name, name)
