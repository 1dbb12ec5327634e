"""Chat templates: real templates probe into pieces that reproduce their own renders.

The corpus is the set of templates llama.cpp tests against, vendored in the
llama-cpp-python sdist; it is downloaded once with pip and cached outside the
checkout.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import platformdirs
import pytest

from app.core import chat_template
from app.core.chat_template import (
    EMPTY_TOOLS_NOTE,
    ChatMarkup,
    TemplateRenderer,
    fill_dates,
    markup_for,
    probe_markup,
)

SDIST_VERSION = "0.3.36"
TEMPLATES_IN_SDIST = "vendor/llama.cpp/models/templates/"

#: A Llama 3.2-style template: the date is strftime_now's when it exists.
LLAMA3_STYLE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    '{%- set date_string = strftime_now("%d %b %Y") %}'
    '{%- else %}{%- set date_string = "26 Jul 2024" %}{%- endif %}{%- endif %}'
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set messages = messages[1:] %}"
    '{%- else %}{%- set system_message = "" %}{%- endif %}'
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}'
    '{{- "Today Date: " + date_string + "\\n\\n" }}'
    '{{- system_message }}{{- "<|eot_id|>" }}'
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def _fake_today(monkeypatch: pytest.MonkeyPatch, day: datetime.datetime) -> None:
    """Make "now" ``day`` for the template module, whichever way it asks the clock."""

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> Clock:  # type: ignore[override]
            return cls.fromtimestamp(day.timestamp(), tz)

        @classmethod
        def today(cls) -> Clock:  # type: ignore[override]
            return cls.now()

    fake = types.SimpleNamespace(**{**vars(datetime), "datetime": Clock})
    monkeypatch.setattr(chat_template, "datetime", fake)


def test_the_markup_hash_does_not_depend_on_today(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_today(monkeypatch, datetime.datetime(2025, 1, 1, 12, 0))
    new_year = probe_markup(LLAMA3_STYLE, "<s>", "</s>")
    _fake_today(monkeypatch, datetime.datetime(2025, 6, 30, 23, 59))
    summer = probe_markup(LLAMA3_STYLE, "<s>", "</s>")
    assert new_year.markup_hash == summer.markup_hash
    assert "Today Date:" in new_year.preamble
    assert "2025" not in new_year.preamble + summer.preamble
    # Filled in, the preamble shows the day the dates are filled with, in the template's format.
    march = fill_dates(new_year.preamble, datetime.datetime(2024, 3, 9))
    assert "Today Date: 09 Mar 2024\n" in march


def test_loop_controls_and_generation_tags_render() -> None:
    template = (
        "{% for m in messages %}{% if loop.index0 > 100 %}{% break %}{% endif %}"
        "{% if m['role'] == 'tool' %}{% continue %}{% endif %}"
        "<|{{ m['role'] }}|>{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}<|end|>"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    markup = markup_for(template, "<s>", "</s>")
    assert markup.template_origin == "gguf", markup.notes
    assert markup.assistant.before == "<|assistant|>" and markup.assistant.after == "<|end|>"


def test_a_template_that_writes_the_last_reply_differently_is_cut_as_history() -> None:
    """Qwen3-style: the reply after the last question carries a think block, older ones not."""
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    markup = markup_for(template, "<s>", "</s>")
    assert markup.template_origin == "gguf", markup.notes
    assert markup.assistant.before == "<|im_start|>assistant\n"
    assert markup.assistant.after == "<|im_end|>\n"
    assert markup.user.before == "<|im_start|>user\n"


# -- the corpus -----------------------------------------------------------------------


def _cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("kvchat"))


@pytest.fixture(scope="session")
def template_corpus() -> list[Path]:
    """The *.jinja templates of the llama.cpp vendored in llama-cpp-python's sdist."""
    folder = _cache_dir() / f"templates-{SDIST_VERSION}"
    if not any(folder.glob("*.jinja")):
        sdists = _cache_dir() / "sdist"
        archive = sdists / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
        if not archive.is_file():
            command = [
                sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                f"llama-cpp-python=={SDIST_VERSION}", "-d", str(sdists),
            ]
            done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0 or not archive.is_file():
                pytest.fail(
                    f"could not download the llama-cpp-python {SDIST_VERSION} sdist with pip "
                    f"(exit {done.returncode}): {done.stderr.strip()[-800:]}"
                )
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as sdist:
            for member in sdist.getmembers():
                name = member.name.partition("/")[2]
                if member.isfile() and name.startswith(TEMPLATES_IN_SDIST):
                    relative = name[len(TEMPLATES_IN_SDIST) :]
                    if "/" not in relative and relative.endswith(".jinja"):
                        extracted = sdist.extractfile(member)
                        assert extracted is not None
                        partial = folder / (relative + ".partial")
                        partial.write_bytes(extracted.read())
                        partial.replace(folder / relative)
    templates = sorted(folder.glob("*.jinja"))
    assert len(templates) >= 60, f"only {len(templates)} templates in {folder}"
    return templates


NOW = datetime.datetime(2025, 3, 14, 9, 26, 53)
TEXTS = {
    "u1": "What is the capital of France?",
    "a1": "Paris.",
    "u2": "And its population?",
    "block": "Answer briefly.",
}


def _wrap(wrapper: chat_template.Wrapper, text: str) -> str:
    return wrapper.before + text + wrapper.after


def _block(placement: chat_template.BlockPlacement) -> tuple[list[dict[str, str]], str]:
    """The block's messages for the template, and its text as the pieces write it."""
    body = placement.label_open + TEXTS["block"] + placement.label_close
    if placement.role == "system":
        return [{"role": "system", "content": body}], _wrap(placement.wrapper, body)
    messages = [{"role": "user", "content": body}]
    text = _wrap(placement.wrapper, body)
    if placement.ack is not None:
        messages.append({"role": "assistant", "content": chat_template.BLOCK_ACK})
        text += _wrap(placement.ack, chat_template.BLOCK_ACK)
    return messages, text


def reproduction_errors(source: str, markup: ChatMarkup) -> list[str]:
    """Where the pieces joined differ from the template's own render, for both layouts."""
    extra = {"tools": []} if EMPTY_TOOLS_NOTE in markup.notes else None
    renderer = TemplateRenderer(source, "<s>", "</s>", now=NOW, extra=extra)
    user1, reply1, user2 = (
        {"role": "user", "content": TEXTS["u1"]},
        {"role": "assistant", "content": TEXTS["a1"]},
        {"role": "user", "content": TEXTS["u2"]},
    )
    history = _wrap(markup.user, TEXTS["u1"]) + _wrap(markup.assistant, TEXTS["a1"])
    question = _wrap(markup.user, TEXTS["u2"]) + markup.generation_prompt
    later_messages, later_text = _block(markup.block_later)
    first_messages, first_text = _block(markup.block_first)
    cases = {
        "no block": ([user1, reply1, user2], markup.preamble + history + question),
        "history-first": (
            [user1, reply1, *later_messages, user2],
            markup.preamble + history + later_text + question,
        ),
        "system-first": ([*first_messages, user1, reply1, user2], first_text + history + question),
    }
    errors = []
    for name, (messages, pieces) in cases.items():
        expected = renderer.render(messages, add_generation_prompt=True)
        joined = fill_dates(pieces, NOW)
        if joined != expected:
            at = next(
                (i for i, (a, b) in enumerate(zip(joined, expected, strict=False)) if a != b),
                min(len(joined), len(expected)),
            )
            errors.append(
                f"{name}: at {at} the pieces give {joined[at - 40 : at + 40]!r}, "
                f"the template {expected[at - 40 : at + 40]!r}"
            )
    return errors


def test_every_template_of_the_llama_cpp_corpus_is_used_as_written(
    template_corpus: list[Path],
) -> None:
    fallbacks: dict[str, str] = {}
    wrong: dict[str, list[str]] = {}
    for path in template_corpus:
        source = path.read_text(encoding="utf-8")
        markup = markup_for(source, "<s>", "</s>")
        if markup.template_origin != "gguf":
            fallbacks[path.name] = markup.notes[0]
            continue
        errors = reproduction_errors(source, markup)
        if errors:
            wrong[path.name] = errors
    print(
        f"\n{len(template_corpus)} templates: {len(template_corpus) - len(fallbacks)} probed, "
        f"{len(fallbacks)} fall back to ChatML"
    )
    assert fallbacks == {}
    assert wrong == {}


def test_the_reproduction_check_catches_a_wrong_piece() -> None:
    """The corpus check compares with the real render: a piece off by one character fails."""
    markup = markup_for(LLAMA3_STYLE, "<s>", "</s>")
    assert reproduction_errors(LLAMA3_STYLE, markup) == []
    broken = ChatMarkup(
        **{
            **chat_template.asdict_shallow(markup),
            "user": chat_template.Wrapper(markup.user.before, markup.user.after + " "),
        }
    )
    assert len(reproduction_errors(LLAMA3_STYLE, broken)) == 3
