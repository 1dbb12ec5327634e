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

Markup is tokenized with special tokens parsed; contents never are, so text that
looks like ``<|im_start|>`` in a message stays text.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import asdict, dataclass

import jinja2
import jinja2.sandbox

# Private-use code points: no real message contains them and templates leave them alone.
_SENTINELS = {name: f"\ue000{name}\ue001" for name in ("A", "B", "C", "D", "S")}

#: The instruction block's fallback when the template refuses a system message in
#: the middle of a chat: a clearly marked user turn (and, for templates that
#: demand alternating roles, a fixed assistant acknowledgement after it).
BLOCK_LABEL_OPEN = "[Instructions for the next reply]\n"
BLOCK_LABEL_CLOSE = "\n[End of instructions]"
BLOCK_ACK = "Understood."

# Used when a GGUF has no template or its template cannot be probed.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TemplateProbeError(Exception):
    pass


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
    template_origin: str  # "gguf" or "builtin-chatml"
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


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class TemplateRenderer:
    def __init__(self, source: str, bos_token: str, eos_token: str) -> None:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self._template = env.from_string(source)
        self._bos = bos_token
        self._eos = eos_token

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos,
                eos_token=self._eos,
            )
        except TemplateProbeError:
            raise
        except Exception as error:  # templates can fail in any way Jinja allows
            raise TemplateProbeError(f"{type(error).__name__}: {error}") from error


def _msg(role: str, key: str) -> dict[str, str]:
    return {"role": role, "content": _SENTINELS[key]}


def _delta(
    renderer: TemplateRenderer, before: list[dict[str, str]], after: list[dict[str, str]]
) -> str:
    """Text that rendering ``after`` adds to rendering ``before``; it must only append."""
    head = renderer.render(before) if before else ""
    full = renderer.render(after)
    if not full.startswith(head):
        raise TemplateProbeError("the template rewrites earlier turns when a turn is added")
    return full[len(head) :]


def _split(text: str, key: str) -> Wrapper:
    sentinel = _SENTINELS[key]
    if text.count(sentinel) != 1:
        raise TemplateProbeError(f"the template drops or repeats the {key} message")
    before, after = text.split(sentinel)
    return Wrapper(before, after)


def _probe_block(
    renderer: TemplateRenderer, history: list[dict[str, str]], user: Wrapper
) -> BlockPlacement:
    """Best role for the instruction block after ``history``: system, else a marked user turn."""
    try:
        text = _delta(renderer, history, [*history, _msg("system", "S")])
        wrapper = _split(text, "S")
        follow = _delta(
            renderer,
            [*history, _msg("system", "S")],
            [*history, _msg("system", "S"), _msg("user", "C")],
        )
        if not history or _split(follow, "C") == user:
            return BlockPlacement("system", wrapper)
    except TemplateProbeError:
        pass
    try:
        blocked = [*history, _msg("user", "S")]
        renderer.render([*blocked, _msg("user", "C")])
        return BlockPlacement(
            "user", user, label_open=BLOCK_LABEL_OPEN, label_close=BLOCK_LABEL_CLOSE
        )
    except TemplateProbeError:
        pass
    acked = [*history, _msg("user", "S"), {"role": "assistant", "content": BLOCK_ACK}]
    renderer.render([*acked, _msg("user", "C")])  # raises if nothing works
    ack_text = _delta(renderer, [*history, _msg("user", "S")], acked)
    if BLOCK_ACK not in ack_text:
        raise TemplateProbeError("the template drops the acknowledgement turn")
    ack_before, ack_after = ack_text.split(BLOCK_ACK, 1)
    return BlockPlacement(
        "user+ack",
        user,
        label_open=BLOCK_LABEL_OPEN,
        label_close=BLOCK_LABEL_CLOSE,
        ack=Wrapper(ack_before, ack_after),
    )


def probe_markup(source: str, bos_token: str, eos_token: str, origin: str = "gguf") -> ChatMarkup:
    renderer = TemplateRenderer(source, bos_token, eos_token)
    first_user = _split(_delta(renderer, [], [_msg("user", "A")]), "A")
    base = [_msg("user", "A"), _msg("assistant", "B")]
    user = _split(_delta(renderer, base, [*base, _msg("user", "C")]), "C")
    assistant = _split(
        _delta(
            renderer, [*base, _msg("user", "C")], [*base, _msg("user", "C"), _msg("assistant", "D")]
        ),
        "D",
    )
    if not first_user.before.endswith(user.before) or first_user.after != user.after:
        raise TemplateProbeError("the first user turn is written differently from later ones")
    preamble = first_user.before[: len(first_user.before) - len(user.before)]
    with_prompt = renderer.render([*base, _msg("user", "C")], add_generation_prompt=True)
    without_prompt = renderer.render([*base, _msg("user", "C")])
    if not with_prompt.startswith(without_prompt):
        raise TemplateProbeError("the generation prompt rewrites the conversation")
    generation_prompt = with_prompt[len(without_prompt) :]
    notes = []
    if assistant.before != generation_prompt:
        notes.append("assistant turns are written differently from the generation prompt")
    block_first = _probe_block(renderer, [], user)
    block_later = _probe_block(renderer, base, user)
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


def markup_for(source: str | None, bos_token: str, eos_token: str) -> ChatMarkup:
    """Probe the GGUF's template; fall back to ChatML, saying why, if it cannot be used."""
    if source:
        try:
            return probe_markup(source, bos_token, eos_token)
        except (TemplateProbeError, jinja2.TemplateError) as error:
            reason = f"the model's chat template could not be used ({error}); using ChatML"
    else:
        reason = "the model has no chat template; using ChatML"
    markup = probe_markup(CHATML_TEMPLATE, bos_token, eos_token, origin="builtin-chatml")
    return ChatMarkup(**{**asdict_shallow(markup), "notes": (reason, *markup.notes)})


def asdict_shallow(markup: ChatMarkup) -> dict[str, object]:
    return {name: getattr(markup, name) for name in markup.__dataclass_fields__}
