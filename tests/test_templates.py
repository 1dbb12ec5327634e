"""Chat templates: real templates probe into pieces that reproduce their own renders.

The corpus is the set of templates llama.cpp tests against, vendored in the
llama-cpp-python sdist; it is downloaded once with pip and cached outside the
checkout.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import tarfile
import types
from collections.abc import Callable
from pathlib import Path

import platformdirs
import pytest
from conftest import GREEDY

from app.core import chat_template
from app.core import prompt as prompt_module
from app.core.chat_template import (
    CONTENT_LISTS_NOTE,
    ChatMarkup,
    TemplateRenderer,
    fill_dates,
    markup_for,
    markup_renderer,
    probe_markup,
    suggest_format,
)
from app.core.llama_backend import BuiltinTemplateRenderer, builtin_template_names
from app.core.models import model_file_identity
from app.domain import FinishReason, TemplateChoice, TemplateKind
from app.session.chat_session import ChatSession, GenerationOptions, SessionError
from app.session.generation import ReplyText
from app.storage.store import Store

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


def test_templates_that_read_content_as_parts_or_always_list_tools_are_used() -> None:
    parts_only = (
        "{% for m in messages %}<|{{ m['role'] }}|>{% for part in m['content'] %}"
        "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}<|end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    markup = markup_for(parts_only, "<s>", "</s>")
    assert markup.template_origin == "gguf", markup.notes
    assert CONTENT_LISTS_NOTE in markup.notes
    assert markup.user == chat_template.Wrapper("<|user|>", "<|end|>\n")
    assert reproduction_errors(parts_only, markup) == []
    tools_always = (
        "<tools>{% for t in tools %}{{ t }}{% endfor %}</tools>\n" + parts_only.replace(
            "{% for part in m['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
            "{% endif %}{% endfor %}",
            "{{ m['content'] }}",
        )
    )
    markup = markup_for(tools_always, "<s>", "</s>")
    assert markup.template_origin == "gguf", markup.notes
    assert markup.preamble == "<tools></tools>\n"
    assert reproduction_errors(tools_always, markup) == []


def test_a_reply_stops_at_its_end_marker_written_as_text() -> None:
    shown: list[str] = []
    reply = ReplyText("<|im_end|>", shown.append)
    assert not reply.add("Hel")
    assert not reply.add("lo <|")  # may begin the marker: held back
    assert "".join(shown) == "Hello "
    assert not reply.add("im")
    assert reply.add("_end|>\n<|im_start|>")
    assert reply.text == "Hello " and "".join(shown) == "Hello "
    assert reply.tokens_before_end() is None  # the marker began inside a token
    aligned = ReplyText("<|im_end|>", None)
    for piece in ("Paris", ".", "<|im_", "end|>"):
        ended = aligned.add(piece)
    assert ended and aligned.text == "Paris." and aligned.tokens_before_end() == 2
    plain = ReplyText("<|im_end|>", shown.append)
    assert not plain.add("a <| b") and not plain.add(" c")
    plain.flush()
    assert plain.text == "a <| b c" and "".join(shown).endswith("a <| b c")


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
    assert len(templates) == 70, f"{len(templates)} templates in {folder}, not 70"
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
    renderer = markup_renderer(source, "<s>", "</s>", markup.notes, now=NOW)
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


# -- on the real models ---------------------------------------------------------------

GEMMA_CTX = 2048
GREEDY_40 = GenerationOptions(max_tokens=40, temperature=0.0, seed=0)
LLAMA3_CHOICE = TemplateChoice(TemplateKind.JINJA, LLAMA3_STYLE, "llama3-style.jinja")


def _content_text(session: ChatSession, token_ids: list[int]) -> str:
    """The text of a stored reply's tokens, without the template's own wrapper."""
    before, after = session.builder.wrapper_sizes(session.markup.assistant)
    return session.backend.detokenize(list(token_ids[before : len(token_ids) - after]))


@pytest.mark.slow
def test_chatml_markers_on_gemma_end_the_reply_and_never_show(
    store: Store, make_engine: Callable, gemma_model_path: Path
) -> None:
    """Gemma's vocabulary has no <|im_end|> token: the ChatML fallback's end marker is
    written as text, and generation must stop there without keeping it."""
    session = make_engine(store, model_path=gemma_model_path, n_ctx=GEMMA_CTX)
    assert session.markup.template_origin == "builtin-chatml"
    assert "choose one with --chat-template" in session.markup.notes[0]
    assert len(session.backend.tokenize("<|im_end|>", special=True)) > 1
    chat = store.create_chat("chatml on gemma")
    shown: list[str] = []
    result = session.send(chat.id, "Hello! Who are you?", GREEDY_40, on_token=shown.append)
    assert result.reply.strip()
    assert result.metrics.finish_reason == FinishReason.STOP
    for text in (result.reply, "".join(shown), store.message(result.reply_message_id).text):
        assert "<|im_end|>" not in text and "<|im_" not in text
    assert "".join(shown) == result.reply
    stored = store.message(result.reply_message_id).token_ids
    assert _content_text(session, stored) == result.reply
    # The next turn's prompt holds the reply as the template writes it: one end marker.
    prompt = session.rendered_prompt(chat.id, "Thanks.")
    assert prompt.count("<|im_end|>") == prompt.count("<|im_start|>") - 1


@pytest.mark.slow
def test_gemma_with_the_gemma_template_replies_cleanly_and_keeps_the_choice(
    store: Store, make_engine: Callable, gemma_model_path: Path, model_path: Path
) -> None:
    choice = TemplateChoice(TemplateKind.BUILTIN, "gemma", "gemma")
    session = make_engine(store, model_path=gemma_model_path, n_ctx=GEMMA_CTX, chat_template=choice)
    assert session.markup.template_origin == "builtin:gemma"
    assert session.markup.user.before == "<start_of_turn>user\n"
    # The turn markers are Gemma's own special tokens, not text.
    start = session.backend.tokenize("<start_of_turn>", special=True)
    assert len(start) == 1 and session.backend.is_control(start[0])
    for index, question in enumerate(["Hello! Who are you?", "Name three fruits."]):
        chat = store.create_chat(f"gemma {index}")
        result = session.send(chat.id, question, GREEDY_40)
        assert result.reply.strip()
        for marker in ("<start_of_turn>", "<end_of_turn>", "<|im_", "<eos>"):
            assert marker not in result.reply
        stored = store.message(result.reply_message_id).token_ids
        assert _content_text(session, stored) == result.reply
    # Token for token what llama.cpp's own gemma formatter writes (plus the BOS it adds).
    chat = store.create_chat("faithful")
    for role, text in (("user", "Hi there."), ("assistant", "Hello! How can I help?")):
        store.add_message(chat.id, role, text)
    written = BuiltinTemplateRenderer("gemma").render(
        [
            {"role": "user", "content": "Hi there."},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Thanks!"},
        ],
        add_generation_prompt=True,
    )
    expected = [session.backend.bos_token_id, *session.backend.tokenize(written, special=True)]
    assert session.prompt_plan(chat.id, "Thanks!").tokens == expected
    session.close()
    # Kept for this model file, and only for it.
    again = make_engine(store, model_path=gemma_model_path, n_ctx=GEMMA_CTX)
    assert again.markup.template_origin == "builtin:gemma"
    assert again.template_choice == choice
    smol = make_engine(store, model_path=model_path)
    assert smol.markup.template_origin == "gguf"


def test_every_built_in_format_of_llama_cpp_can_be_chosen(engine: ChatSession) -> None:
    names = builtin_template_names()
    assert {"chatml", "gemma", "llama3", "mistral-v7"} <= set(names)
    failed = {}
    for name in names:
        try:
            engine.use_template(TemplateChoice(TemplateKind.BUILTIN, name, name))
        except SessionError as error:
            failed[name] = str(error)
    assert failed == {}
    with pytest.raises(SessionError, match="unknown chat template 'no-such-format'"):
        engine.use_template(TemplateChoice(TemplateKind.BUILTIN, "no-such-format", "x"))
    assert engine.markup.template_origin == f"builtin:{names[-1]}"  # unchanged by the refusal


def test_a_model_without_a_template_is_offered_its_likely_format() -> None:
    names = builtin_template_names()
    assert suggest_format("gemma3", names) == "gemma"
    assert suggest_format("phi3", names) == "phi3"
    assert suggest_format("deepseek2", names) == "deepseek2"
    assert suggest_format("qwen3", names) == "chatml"
    assert suggest_format("llama", names) is None  # llama2, 3 or 4: no guess
    assert suggest_format("", names) is None


def _move_chat_to(store: Store, chat_id: int, when: datetime.datetime) -> None:
    with store.transaction():
        store.db.execute(
            "UPDATE messages SET created_at = ? WHERE chat_id = ?", (when.timestamp(), chat_id)
        )


def test_a_chat_keeps_the_date_of_its_first_turn(store: Store, make_engine: Callable) -> None:
    session = make_engine(store, chat_template=LLAMA3_CHOICE)
    today = datetime.datetime.now()
    yesterday = today - datetime.timedelta(days=1)
    old = store.create_chat("started yesterday")
    store.add_message(old.id, "user", "Hello!")
    store.add_message(old.id, "assistant", "Hi there. How can I help?")
    _move_chat_to(store, old.id, yesterday)
    prompt = session.rendered_prompt(old.id, "What day is it?")
    assert f"Today Date: {yesterday:%d %b %Y}\n" in prompt
    assert f"Today Date: {today:%d %b %Y}\n" not in prompt
    new = store.create_chat("started today")
    assert f"Today Date: {today:%d %b %Y}\n" in session.rendered_prompt(new.id, "Hi")
    # The pieces are the template's own render with that day as "today".
    messages = store.messages(old.id)
    renderer = TemplateRenderer(LLAMA3_STYLE, "<s>", "</s>", now=yesterday)
    conversation = [{"role": m.role, "content": m.text} for m in messages]
    conversation.append({"role": "user", "content": "What day is it?"})
    expected = renderer.render(conversation, add_generation_prompt=True)
    assert prompt == expected.replace("<s>", session.backend.info.bos_token, 1)


def test_a_new_day_does_not_invalidate_a_saved_state(
    store: Store, make_engine: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make_engine(store, chat_template=LLAMA3_CHOICE)
    chat = store.create_chat("over midnight")
    first.send(chat.id, "Hello!", GREEDY)
    first.after_reply(chat.id)
    history = len(first.history_plan(chat.id).tokens)
    first.close()
    tomorrow = datetime.datetime.now() + datetime.timedelta(days=1)
    _fake_today(monkeypatch, tomorrow)
    monkeypatch.setattr(prompt_module, "datetime", chat_template.datetime)
    second = make_engine(store)  # the template chosen for the model is kept
    assert second.markup.template_origin == "jinja:llama3-style.jinja"
    result = second.send(chat.id, "And now?", GREEDY)
    assert result.metrics.state_rejected is None, result.metrics.notes
    assert result.metrics.reused_tokens >= history
    assert f"Today Date: {tomorrow:%d %b %Y}" in second.rendered_prompt(
        store.create_chat("tomorrow").id, "Hi"
    )


# -- the command line -----------------------------------------------------------------


def _cli(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "app", "chat", "--db", str(db), "--chat", "demo",
        "--temperature", "0", "--max-tokens", "8", "--json", *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_the_chat_template_flag_chooses_keeps_and_forgets_a_template(
    tmp_path: Path, model_path: Path
) -> None:
    db = tmp_path / "cli.db"
    unknown = _cli(db, "--chat-template", "no-such-format", "Hello")
    assert unknown.returncode == 1
    assert unknown.stderr.count("\n") == 1
    assert "unknown chat template 'no-such-format'" in unknown.stderr
    assert "gemma" in unknown.stderr  # the names it could have been
    missing = _cli(db, "--chat-template", str(tmp_path / "nope.jinja"), "Hello")
    assert missing.returncode == 2 and "chat template file not found" in missing.stderr
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }}", encoding="utf-8")
    refused = _cli(db, "--chat-template", str(broken), "Hello")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "the chat template broken.jinja (Jinja) cannot be used" in refused.stderr
    with Store(db) as store:
        assert store.chats() == []  # refused before anything was written

    template = tmp_path / "llama3-style.jinja"
    template.write_text(LLAMA3_STYLE, encoding="utf-8")
    first = _cli(db, "--chat-template", str(template), "Hello")
    assert first.returncode == 0, first.stderr
    with Store(db) as store:
        chosen = store.model_template(model_file_identity(model_path))
        assert chosen == TemplateChoice(TemplateKind.JINJA, LLAMA3_STYLE, "llama3-style.jinja")
    # Without the flag the choice holds: the saved state (made with it) is reused.
    second = _cli(db, "And then?")
    assert second.returncode == 0, second.stderr
    metrics = json.loads(second.stdout)["metrics"]
    assert metrics["state_rejected"] is None
    assert metrics["reused_tokens"] > 0
    back = _cli(db, "--chat-template", "gguf", "Once more")
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["metrics"]["state_rejected"]  # another template's state
    with Store(db) as store:
        assert store.model_template(model_file_identity(model_path)) is None


@pytest.mark.slow
def test_the_command_line_says_when_it_falls_back_and_gemma_replies_cleanly_with_its_format(
    tmp_path: Path, gemma_model_path: Path
) -> None:
    db = tmp_path / "gemma.db"
    model = ("--model", str(gemma_model_path), "--n-ctx", "2048")
    fallback = _cli(db, *model, "Hello! Who are you?")
    assert fallback.returncode == 0, fallback.stderr
    assert "the model has no chat template; using ChatML" in fallback.stderr
    assert "this model's format is likely --chat-template gemma" in fallback.stderr
    payload = json.loads(fallback.stdout)
    assert any("using ChatML" in note for note in payload["metrics"]["notes"])
    assert "<|im_" not in payload["reply"]

    chosen = _cli(db, *model, "--chat-template", "gemma", "Name three fruits.")
    assert chosen.returncode == 0, chosen.stderr
    assert "ChatML" not in chosen.stderr
    reply = json.loads(chosen.stdout)["reply"]
    assert reply.strip()
    for marker in ("<start_of_turn>", "<end_of_turn>", "<|im_", "<eos>"):
        assert marker not in reply
