"""The GGUF chat template, probed once into append-only text pieces.

A Jinja chat template renders a whole conversation at once; re-rendering after
every turn and re-tokenizing the result would let earlier tokens change (and
would re-tokenize replies). Instead the template is rendered a few times with
sentinel contents, and the output is cut into pieces: a preamble (text the
template puts before the first message, e.g. a default system prompt), a
wrapper (text before/after the content) for each role, the generation prompt and
the instruction block's wrapper at the two positions the layouts need. A prompt
is then a concatenation of per-message token segments, so adding a turn can
never change the tokens of earlier turns.

Every conversation probed ends with a user message, as every prompt sent does, so
a template that writes the last reply differently (a think block, no end marker)
is cut the way it writes replies in the history. Dates the template writes are
placeholders here; the prompt builder fills them with the chat's first-turn date,
so the pieces and the markup hash are the same whatever the day.

Markup is tokenized with special tokens parsed; contents never are, so text that
looks like ``<|im_start|>`` in a message stays text.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from dataclasses import asdict, dataclass, replace
from typing import Protocol

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import markupsafe

from app.core.sequences import common_prefix_length
from app.core.template_sandbox import (
    MAX_SOURCE_CHARS,
    Budget,
    LimitedEnvironment,
    TemplateLimitError,
    TemplateProbeError,
    check_json_indent,
    render_limited,
)
from app.domain import TemplateChoice, TemplateKind

__all__ = ["TemplateLimitError", "TemplateProbeError"]

# Private-use code points: no real message contains them and templates leave them alone.
_SENTINELS = {name: f"\ue000{name}\ue001" for name in ("A", "B", "C", "D", "E", "S")}

#: The instruction block's fallback when the template refuses a system message in
#: the middle of a chat: a clearly marked user turn (and, for templates that
#: demand alternating roles, a fixed assistant acknowledgement after it).
BLOCK_LABEL_OPEN = "[Instructions for the next reply]\n"
BLOCK_LABEL_CLOSE = "\n[End of instructions]"
BLOCK_ACK = "Understood."
#: The note of a template probed with ``tools=[]`` (it lists tools unconditionally).
EMPTY_TOOLS_NOTE = "rendered with an empty tool list"
#: The note of a template that reads a message's content only as a list of parts.
CONTENT_LISTS_NOTE = "message contents given as lists of text parts"

# Used when a GGUF has no template or its template cannot be probed.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


#: How to replace the ChatML fallback, said wherever the fallback is reported.
CHOOSE_TEMPLATE_HINT = "choose one with --chat-template NAME|FILE or Model → Chat template…"


@dataclass(frozen=True)
class Wrapper:
    before: str
    after: str


@dataclass(frozen=True)
class BlockPlacement:
    """How the instruction block is written at one position.

    ``role`` is "system" when the template accepts a system message there,
    "user" for the marked user-turn fallback, "user+ack" when the template also
    needs an assistant turn after it.
    """

    role: str
    wrapper: Wrapper
    label_open: str = ""
    label_close: str = ""
    ack: Wrapper | None = None


@dataclass(frozen=True)
class ChatMarkup:
    template_source: str
    #: "gguf", "builtin-chatml" (the fallback), "builtin:NAME" or "jinja:FILE" (chosen)
    template_origin: str
    preamble: str
    user: Wrapper
    assistant: Wrapper
    generation_prompt: str
    block_first: BlockPlacement  # system-first: the block opens the prompt
    block_later: BlockPlacement  # history-first: the block follows the history
    notes: tuple[str, ...] = ()

    @property
    def template_hash(self) -> str:
        return hashlib.sha256(self.template_source.encode()).hexdigest()[:16]

    @property
    def markup_hash(self) -> str:
        """Changes when any piece changes: stored message segments depend on all of them."""
        payload = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _raise_exception(message: str) -> None:
    raise TemplateProbeError(message)


# A date the template asks for (strftime_now, Llama 3.x's date_string) is written as a
# placeholder holding its format; PromptBuilder fills it with the chat's first-turn date.
_DATE_OPEN, _DATE_CLOSE = "\ue002", "\ue003"
_DATE_PLACEHOLDER = re.compile(f"{_DATE_OPEN}([^{_DATE_OPEN}{_DATE_CLOSE}]*){_DATE_CLOSE}")
#: The formats llama.cpp passes as plain variables to templates that read them.
_DATE_VARIABLES = {"date_string": "%d %b %Y", "datetime": "%b %d %Y %H:%M:%S GMT"}


def date_placeholder(fmt: str) -> str:
    return f"{_DATE_OPEN}{fmt}{_DATE_CLOSE}"


def has_dates(text: str) -> bool:
    return _DATE_OPEN in text


def fill_dates(text: str, when: datetime.datetime) -> str:
    """Replace every date placeholder with ``when`` in the template's own format."""
    if _DATE_OPEN not in text:
        return text
    return _DATE_PLACEHOLDER.sub(lambda match: when.strftime(match.group(1)), text)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}``: transformers' marker of the assistant's
    tokens (for training masks); rendering keeps its body as it is."""

    # Not a ClassVar: jinja2's Extension declares ``tags`` a plain attribute (mypy refuses
    # the override); it is only read, never changed.
    tags = {"generation"}  # noqa: RUF012

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


class TemplateRenderer:
    """Renders a Jinja chat template the way transformers and llama.cpp do.

    The context holds what real templates read: ``tools`` (None: no tools),
    ``raise_exception``, ``strftime_now``, ``namespace``, loop controls
    (``{% break %}``/``{% continue %}``) and ``{% generation %}``. With ``now`` the
    dates are real; without it (when probing) they are placeholders, so the probed
    pieces, and the markup hash, do not depend on the day. Rendering runs in a limited
    sandbox (:mod:`app.core.template_sandbox`): within ``budget`` (2 s when None), with
    capped sizes; past a limit it raises :class:`TemplateLimitError`.
    """

    def __init__(
        self,
        source: str,
        bos_token: str,
        eos_token: str,
        *,
        now: datetime.datetime | None = None,
        extra: dict[str, object] | None = None,
        content_lists: bool = False,
        budget: Budget | None = None,
    ) -> None:
        self._content_lists = content_lists
        self._budget = budget
        if len(source) > MAX_SOURCE_CHARS:
            raise TemplateLimitError(
                f"the template went past a limit: over {MAX_SOURCE_CHARS} characters of source"
            )
        env = LimitedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            undefined=jinja2.Undefined,
            extensions=["jinja2.ext.loopcontrols", _GenerationTag],
        )
        env.filters["tojson"] = _tojson

        def strftime_now(fmt: str) -> str:
            return now.strftime(fmt) if now is not None else date_placeholder(fmt)

        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as error:  # e.g. a syntax error in a chosen file
            raise TemplateProbeError(f"{type(error).__name__}: {error}") from error
        self._context: dict[str, object] = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "tools": None,
            "functions": "",
            **{name: strftime_now(fmt) for name, fmt in _DATE_VARIABLES.items()},
            **(extra or {}),
        }

    def render(self, messages: list[dict[str, object]], add_generation_prompt: bool = False) -> str:
        if self._content_lists:
            messages = [
                {**m, "content": [{"type": "text", "text": m["content"]}]}
                if isinstance(m.get("content"), str)
                else m
                for m in messages
            ]
        context = {
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            **self._context,
        }
        try:
            return render_limited(self._template, self._budget, context)
        except TemplateProbeError:
            raise
        except Exception as error:  # templates can fail in any way Jinja allows
            raise TemplateProbeError(f"{type(error).__name__}: {error}") from error


def _tojson(
    value: object, indent: int | None = None, ensure_ascii: bool = False, **_: object
) -> str:
    """transformers' tojson: keeps non-ASCII text as is (Jinja's escapes it for HTML)."""
    check_json_indent(indent)
    return markupsafe.Markup(json.dumps(value, indent=indent, ensure_ascii=ensure_ascii))


class Renderer(Protocol):
    def render(
        self, messages: list[dict[str, object]], add_generation_prompt: bool = False
    ) -> str: ...


def _msg(role: str, key: str) -> dict[str, object]:
    return {"role": role, "content": _SENTINELS[key]}


def _split(text: str, key: str) -> Wrapper:
    sentinel = _SENTINELS[key]
    if text.count(sentinel) != 1:
        raise TemplateProbeError(f"the template drops or repeats the {key} message")
    before, after = text.split(sentinel)
    return Wrapper(before, after)


def _clean_cut(text: str, index: int) -> bool:
    """A cut between two pieces of markup, not inside a marker (``<|…|>``, ``[INST]``) or
    a word: pieces are tokenized apart, so a marker cut in two would not be one token."""
    if index <= 0 or index >= len(text):
        return True
    head = text[:index]
    for open_, close in (("<", ">"), ("[", "]")):
        if head.rfind(open_) > head.rfind(close):
            return False
    return not (text[index - 1].isalnum() and text[index].isalnum())


class _Probe:
    """Renders of real prompt shapes: every conversation probed ends with a user message,
    as every prompt the app sends does (a template may write the last assistant message
    differently, e.g. with its reasoning, or without its end marker)."""

    def __init__(self, renderer: Renderer) -> None:
        self.renderer = renderer
        self.tail = self._find_tail()

    def _find_tail(self) -> str:
        """Text some templates write after the last message only (e.g. an EOS when there is
        no generation prompt): it is not part of any turn."""
        one = self.renderer.render([_msg("user", "A")])
        three = self.renderer.render([_msg("user", "A"), _msg("assistant", "B"), _msg("user", "C")])
        if three.startswith(one):
            return ""
        for size in range(1, len(one) + 1):
            tail = one[-size:]
            if not three.endswith(tail) or any(s in tail for s in _SENTINELS.values()):
                break
            cut = len(one) - size
            if three.startswith(one[:cut]) and _clean_cut(one, cut) and _clean_cut(three, cut):
                return tail
        raise TemplateProbeError("the template rewrites earlier turns when a turn is added")

    def body(self, messages: list[dict[str, object]]) -> str:
        if not messages:
            return ""
        text = self.renderer.render(messages)
        if self.tail:
            if not text.endswith(self.tail):
                raise TemplateProbeError("the template ends conversations in different ways")
            text = text[: len(text) - len(self.tail)]
        return text

    def delta(self, before: list[dict[str, object]], after: list[dict[str, object]]) -> str:
        """Text that ``after`` adds to ``before``; it must only append."""
        head = self.body(before)
        full = self.body(after)
        if not full.startswith(head):
            raise TemplateProbeError("the template rewrites earlier turns when a turn is added")
        return full[len(head) :]

    def generation_prompt(self, messages: list[dict[str, object]]) -> str:
        with_prompt = self.renderer.render(messages, add_generation_prompt=True)
        without = self.body(messages)
        if not with_prompt.startswith(without):
            raise TemplateProbeError("the generation prompt rewrites the conversation")
        return with_prompt[len(without) :]


def _wrapped(wrapper: Wrapper, key: str) -> str:
    return wrapper.before + _SENTINELS[key] + wrapper.after


def _split_between(between: str, first_before: str, assistant_before: str, hint: str) -> int:
    """Where the assistant's end markup stops and the next user turn's starts.

    The user turn's opening must also end the first user turn's opening (after the
    preamble). Preferred: the end markup the template writes after a last assistant
    message; else the cut where the user's opening looks most like the assistant's
    (both start with the same turn marker, e.g. ``<|im_start|>``).
    """
    candidates = [i for i in range(len(between) + 1) if first_before.endswith(between[i:])]
    candidates = [i for i in candidates if _clean_cut(between, i)] or candidates
    if hint and len(hint) in candidates and between.startswith(hint):
        return len(hint)
    return max(candidates, key=lambda i: (common_prefix_length(between[i:], assistant_before), -i))


def _block_later(
    probe: _Probe, user: Wrapper, assistant: Wrapper
) -> BlockPlacement:
    """The instruction block after the history: a system message, else a marked user turn."""
    start = [_msg("user", "A")]
    history = [*start, _msg("assistant", "B")]
    old = _wrapped(assistant, "B")
    new = _wrapped(user, "C")
    try:
        text = probe.delta(start, [*history, _msg("system", "S"), _msg("user", "C")])
        if text.startswith(old) and text.endswith(new):
            return BlockPlacement("system", _split(text[len(old) : len(text) - len(new)], "S"))
    except TemplateLimitError:
        raise
    except TemplateProbeError:
        pass
    return _block_as_user(probe, start, history, old, user, assistant, "")


def _block_as_user(
    probe: _Probe,
    start: list[dict[str, object]],
    history: list[dict[str, object]],
    old: str,
    user: Wrapper,
    assistant: Wrapper,
    preamble: str,
) -> BlockPlacement:
    new = _wrapped(user, "C")
    opening = Wrapper(preamble + user.before, user.after)
    try:
        text = probe.delta(start, [*history, _msg("user", "S"), _msg("user", "C")])
        if text == preamble + old + _wrapped(user, "S") + new:
            return BlockPlacement("user", opening, BLOCK_LABEL_OPEN, BLOCK_LABEL_CLOSE)
    except TemplateLimitError:
        raise
    except TemplateProbeError:
        pass
    ack: dict[str, object] = {"role": "assistant", "content": BLOCK_ACK}
    text = probe.delta(start, [*history, _msg("user", "S"), ack, _msg("user", "C")])
    acknowledged = assistant.before + BLOCK_ACK + assistant.after
    expected = preamble + old + _wrapped(user, "S") + acknowledged + new
    if text != expected:
        raise TemplateProbeError("the template accepts no instruction block before a message")
    return BlockPlacement("user+ack", opening, BLOCK_LABEL_OPEN, BLOCK_LABEL_CLOSE, ack=assistant)


def _block_first(
    probe: _Probe, preamble: str, user: Wrapper, assistant: Wrapper, pair: str
) -> BlockPlacement:
    """The instruction block opening the prompt (system-first): a system message, whose
    markup replaces the preamble, else a marked user turn after the preamble."""
    first = [_msg("system", "S"), _msg("user", "C")]
    try:
        text = probe.body(first)
        new = _wrapped(user, "C")
        more = probe.delta(first, [*first, _msg("assistant", "B"), _msg("user", "A")])
        if text.endswith(new) and more == pair.replace(_SENTINELS["C"], _SENTINELS["A"]):
            return BlockPlacement("system", _split(text[: len(text) - len(new)], "S"))
    except TemplateLimitError:
        raise
    except TemplateProbeError:
        pass
    return _block_as_user(probe, [], [], "", user, assistant, preamble)


def probe_markup(
    source: str,
    bos_token: str,
    eos_token: str,
    origin: str = "gguf",
    renderer: Renderer | None = None,
) -> ChatMarkup:
    """Cut the template's renders into pieces (see the module's docstring).

    ``renderer`` renders something other than Jinja the same way (llama.cpp's
    built-in formatters); ``source`` then names it.
    """
    if renderer is not None:
        return _probe_with(_Probe(renderer), source, origin, ())
    first_error: TemplateProbeError | None = None
    budget = Budget()  # one time limit for every render of the probe
    for notes in _RENDER_VARIANTS:
        try:
            plain = markup_renderer(source, bos_token, eos_token, notes, budget=budget)
            return _probe_with(_Probe(plain), source, origin, notes)
        except TemplateLimitError:
            raise
        except TemplateProbeError as error:
            first_error = first_error or error
    assert first_error is not None
    raise first_error


#: How a template is rendered, tried in this order: as transformers and llama.cpp call
#: it; with an empty tool list (tool-use templates list tools unconditionally); with
#: each message's content as a list of parts (templates written for multimodal input).
_RENDER_VARIANTS: tuple[tuple[str, ...], ...] = (
    (),
    (EMPTY_TOOLS_NOTE,),
    (CONTENT_LISTS_NOTE,),
    (EMPTY_TOOLS_NOTE, CONTENT_LISTS_NOTE),
)


def markup_renderer(
    source: str,
    bos_token: str,
    eos_token: str,
    notes: tuple[str, ...] = (),
    now: datetime.datetime | None = None,
    budget: Budget | None = None,
) -> TemplateRenderer:
    """The renderer a Jinja markup was probed with (its ``notes`` say how it was called);
    with ``now``, dates are real (to compare a prompt with the template's own render)."""
    return TemplateRenderer(
        source,
        bos_token,
        eos_token,
        now=now,
        extra={"tools": []} if EMPTY_TOOLS_NOTE in notes else None,
        content_lists=CONTENT_LISTS_NOTE in notes,
        budget=budget,
    )


def _probe_with(
    probe: _Probe, source: str, origin: str, notes_before: tuple[str, ...]
) -> ChatMarkup:
    one = [_msg("user", "A")]
    three = [*one, _msg("assistant", "B"), _msg("user", "C")]
    five = [*three, _msg("assistant", "D"), _msg("user", "E")]
    first = _split(probe.delta([], one), "A")
    pair = probe.delta(one, three)
    if pair.count(_SENTINELS["B"]) != 1 or pair.count(_SENTINELS["C"]) != 1:
        raise TemplateProbeError("the template drops or repeats a message")
    assistant_before, rest = pair.split(_SENTINELS["B"])
    if _SENTINELS["C"] not in rest:
        raise TemplateProbeError("the template reorders messages")
    between, user_after = rest.split(_SENTINELS["C"])
    again = probe.delta(three, five)
    expected = pair.replace(_SENTINELS["B"], _SENTINELS["D"]).replace(
        _SENTINELS["C"], _SENTINELS["E"]
    )
    if again != expected:
        raise TemplateProbeError("the template writes later turns differently from earlier ones")
    if user_after != first.after:
        raise TemplateProbeError("the first user turn is written differently from later ones")
    try:
        last = probe.body([*one, _msg("assistant", "B")])
        hint = last.split(_SENTINELS["B"], 1)[1] if last.count(_SENTINELS["B"]) == 1 else ""
    except TemplateLimitError:
        raise
    except TemplateProbeError:
        hint = ""
    cut = _split_between(between, first.before, assistant_before, hint)
    assistant = Wrapper(assistant_before, between[:cut])
    user = Wrapper(between[cut:], user_after)
    if not first.before.endswith(user.before):
        raise TemplateProbeError("the first user turn is written differently from later ones")
    preamble = first.before[: len(first.before) - len(user.before)]
    generation_prompt = probe.generation_prompt(three)
    if probe.generation_prompt(one) != generation_prompt:
        raise TemplateProbeError("the generation prompt changes from turn to turn")
    block_first = _block_first(probe, preamble, user, assistant, pair)
    block_later = _block_later(probe, user, assistant)
    turn_pieces = (user, assistant, block_later.wrapper, block_later.ack or user)
    if has_dates(generation_prompt) or any(
        has_dates(wrapper.before + wrapper.after) for wrapper in turn_pieces
    ):
        raise TemplateProbeError(
            "the template writes the date inside turns, so stored turns would change daily"
        )
    notes = list(notes_before)
    if assistant.before != generation_prompt:
        notes.append("assistant turns are written differently from the generation prompt")
    if probe.tail:
        notes.append(f"the template ends every conversation with {probe.tail!r}; left out")
    if block_later.role != "system":
        notes.append(
            f"this template refuses a system message after the history; the instruction block "
            f"is sent as a marked {block_later.role} turn"
        )
    return ChatMarkup(
        template_source=source,
        template_origin=origin,
        preamble=preamble,
        user=user,
        assistant=assistant,
        generation_prompt=generation_prompt,
        block_first=block_first,
        block_later=block_later,
        notes=tuple(notes),
    )


#: Architectures whose chat format llama.cpp knows under another name.
_FORMAT_OF_ARCHITECTURE = {"qwen": "chatml", "smollm": "chatml", "exaone": "exaone3"}


def suggest_format(architecture: str, names: list[str]) -> str | None:
    """The llama.cpp built-in format a GGUF of ``architecture`` most likely wants (e.g.
    ``gemma`` for ``gemma3``), offered first when the GGUF has no usable template."""
    arch = architecture.lower()
    for prefix, name in _FORMAT_OF_ARCHITECTURE.items():
        if arch.startswith(prefix) and name in names:
            return name
    matches = [name for name in names if arch == name or (arch.startswith(name) and arch)]
    return max(matches, key=len) if matches else None


def markup_for(
    source: str | None,
    bos_token: str,
    eos_token: str,
    choice: TemplateChoice | None = None,
    builtin: Renderer | None = None,
) -> ChatMarkup:
    """The markup a model's prompts are written with.

    ``choice`` (a template chosen for the model) comes first; ``builtin`` renders it when
    it is one of llama.cpp's built-in formats. A choice that cannot be used raises
    :class:`TemplateProbeError`. Otherwise the GGUF's template is probed, and when it is
    missing or cannot be used, ChatML, with a note saying why and how to choose one.
    """
    if choice is not None:
        if choice.kind == TemplateKind.BUILTIN and builtin is None:
            raise TemplateProbeError(f"no renderer for llama.cpp's {choice.label} format")
        markup = probe_markup(
            choice.value,
            bos_token,
            eos_token,
            origin=f"{choice.kind}:{choice.label}",
            renderer=builtin if choice.kind == TemplateKind.BUILTIN else None,
        )
        note = f"chat template chosen for this model: {choice}"
        return replace(markup, notes=(note, *markup.notes))
    if source:
        try:
            return probe_markup(source, bos_token, eos_token)
        except (TemplateProbeError, jinja2.TemplateError) as error:
            reason = f"the model's chat template could not be used ({error}); using ChatML"
    else:
        reason = "the model has no chat template; using ChatML"
    reason += f" ({CHOOSE_TEMPLATE_HINT})"
    markup = probe_markup(CHATML_TEMPLATE, bos_token, eos_token, origin="builtin-chatml")
    return replace(markup, notes=(reason, *markup.notes))


def asdict_shallow(markup: ChatMarkup) -> dict[str, object]:
    return {name: getattr(markup, name) for name in markup.__dataclass_fields__}
