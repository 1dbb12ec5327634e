"""A Jinja sandbox with limits, for chat templates nobody vetted (a file, a GGUF's own).

Jinja's immutable sandbox already stops attribute tricks, in-place mutation and ranges
over 100 000 items. A template can still grow values without bound (``9**(9**9)``,
``'x' * 6000000000``, a string doubled in a loop) or loop for hours (nested ranges).
Here every growing operation is checked *before* it runs (binary operators, ``~``,
the string methods and filters that take a size), the output is capped while it is
written, and a line tracer on the template's own code stops a render that runs past
its time budget. Past any limit the render raises :class:`TemplateLimitError`, one line
that says which limit.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import closing, contextmanager
from types import FrameType
from typing import Any, cast

import jinja2
import jinja2.compiler
import jinja2.filters
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

from app import limits

#: Time one probe (all its renders) or one render may take.
RENDER_SECONDS = 2.0
#: The largest text (or list) a template may build, and the largest output it may write.
MAX_VALUE_SIZE = 1 << 20
#: The largest integer a template may compute, in bits (about 20 000 digits).
MAX_INT_BITS = 1 << 16
#: The largest template source accepted.
MAX_SOURCE_CHARS = limits.MAX_TEMPLATE_CHARS

_TEMPLATE_FILE = "<template>"
_FILTERS_FILE = jinja2.filters.__file__
#: A huge or computed width/precision in a format (``%9999999d``, ``%*d``, ``{:>9999999}``).
_BIG_PERCENT = re.compile(r"%[-#0 +]*(\d{7,}|\*|\d*\.(\d{7,}|\*))")
_BIG_BRACES = re.compile(r"\{[^{}]*:[^{}]*(\d{7,}|\{)")


class TemplateProbeError(Exception):
    pass


class TemplateLimitError(TemplateProbeError):
    """The template went past a limit (time, size, growth): refused, never retried."""


def _refuse(what: str) -> None:
    raise TemplateLimitError(f"the template went past a limit: {what}")


def _size(value: object) -> int | None:
    return len(value) if isinstance(value, str | list | tuple) else None


class Budget:
    """The time left for one probe or one render."""

    def __init__(self, seconds: float = RENDER_SECONDS) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.spent = False

    def check(self) -> None:
        """Raise once when the time is up (the frames it unwinds must not raise again)."""
        if not self.spent and time.monotonic() > self.deadline:
            self.spent = True
            _refuse(f"it ran longer than {self.seconds:g} s")


@contextmanager
def time_limit(budget: Budget) -> Iterator[None]:
    """Check ``budget`` at every line the template's code (and Jinja's filters) runs.

    Only those frames are traced, so the rest of the program runs at full speed; the
    previous trace function (a debugger, coverage) is restored afterwards.
    """

    def on_line(frame: FrameType, event: str, arg: object) -> Callable[..., Any] | None:
        if event == "line":
            budget.check()
        return on_line

    def on_call(frame: FrameType, event: str, arg: object) -> Callable[..., Any] | None:
        name = frame.f_code.co_filename
        if name in (_TEMPLATE_FILE, _FILTERS_FILE):
            budget.check()
            return on_line
        return None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


def _check_power(left: object, right: object) -> None:
    if (
        isinstance(left, int)
        and isinstance(right, int)
        and right > 0
        and abs(left) > 1
        and right * abs(left).bit_length() > MAX_INT_BITS
    ):
        _refuse(f"a power over {MAX_INT_BITS} bits")


def _check_product(left: object, right: object) -> None:
    for seq, count in ((left, right), (right, left)):
        size = _size(seq)
        if size is not None and isinstance(count, int) and size * count > MAX_VALUE_SIZE:
            _refuse(f"a repeated text or list over {MAX_VALUE_SIZE} items")
    if (
        isinstance(left, int)
        and isinstance(right, int)
        and abs(left).bit_length() + abs(right).bit_length() > MAX_INT_BITS
    ):
        _refuse(f"a product over {MAX_INT_BITS} bits")


def _check_sum(left: object, right: object) -> None:
    sizes = (_size(left), _size(right))
    if None not in sizes and sum(sizes) > MAX_VALUE_SIZE:  # type: ignore[arg-type]
        _refuse(f"a text or list over {MAX_VALUE_SIZE} items")


def _check_format(text: object, pattern: re.Pattern[str] = _BIG_PERCENT) -> None:
    if isinstance(text, str) and pattern.search(text):
        _refuse("a format with a huge or computed width")


_BINOP_CHECKS: dict[str, Callable[[object, object], None]] = {
    "**": _check_power,
    "*": _check_product,
    "+": _check_sum,
    "%": lambda left, _: _check_format(left),
}


def _check_str_method(text: str, name: str, args: tuple[Any, ...]) -> None:
    """Refuse a string method whose result would be over the size limit."""
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        estimate = args[0]
    elif name == "expandtabs":
        tab = args[0] if args and isinstance(args[0], int) else 8
        estimate = len(text) + text.count("\t") * tab
    elif name == "replace" and len(args) >= 2:
        estimate = _replaced_size(text, *args[:3])
    elif name == "join" and args and isinstance(args[0], list | tuple | str | dict):
        items = args[0]
        estimate = len(text) * len(items) + sum(len(str(item)) for item in items)
    elif name == "join":
        _refuse("str.join over an iterator (the join filter takes one)")
    elif name in ("format", "format_map"):
        _check_format(text, _BIG_BRACES)
        return
    else:
        return
    if estimate > MAX_VALUE_SIZE:
        _refuse(f"a text over {MAX_VALUE_SIZE} characters ({name})")


def _replaced_size(text: str, old: object, new: object, count: object = -1) -> int:
    old, new = str(old), str(new)
    found = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    return len(text) + found * (len(new) - len(old))


class _LimitedCodeGenerator(jinja2.compiler.CodeGenerator):
    """Writes ``a ~ b`` as a checked join: concatenation is Jinja's other way to grow text."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: jinja2.compiler.Frame) -> None:
        try:
            const = node.as_const(frame.eval_ctx)  # literals only: bounded by the source
        except jinja2.nodes.Impossible:
            self.write("environment.checked_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")
            return
        self.write(repr(const))


class LimitedEnvironment(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The immutable sandbox, with every growing operation checked before it runs."""

    code_generator_class = _LimitedCodeGenerator
    intercepted_binops = frozenset(_BINOP_CHECKS)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters.update(_limited_filters())
        self.globals["lipsum"] = _limited_lipsum

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        _BINOP_CHECKS[operator](left, right)
        return super().call_binop(context, operator, left, right)

    def call(  # the sandbox's own signature (positional-only by name mangling)
        __self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any
    ) -> Any:
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(method, "__self__", None)
        if isinstance(owner, str):
            _check_str_method(owner, getattr(method, "__name__", ""), args)
        return super().call(__context, __obj, *args, **kwargs)

    @staticmethod
    def checked_concat(values: tuple[Any, ...]) -> str:
        texts = [str(value) for value in values]
        if sum(map(len, texts)) > MAX_VALUE_SIZE:
            _refuse(f"a text over {MAX_VALUE_SIZE} characters (~)")
        return "".join(texts)


def _limited_lipsum(n: int = 5, *args: Any, **kwargs: Any) -> str:
    """Jinja's lorem ipsum writes ``n`` paragraphs in one Python call: keep ``n`` small."""
    if not isinstance(n, int) or n > 100:
        _refuse("lipsum over 100 paragraphs")
    return jinja2.utils.generate_lorem_ipsum(n, *args, **kwargs)


def _limited_filters() -> dict[str, Callable[..., Any]]:
    """Jinja's filters that take a size, refusing a size over the limit before they run."""

    def sized(name: str, check: Callable[..., None]) -> Callable[..., Any]:
        original = jinja2.filters.FILTERS[name]

        def limited(*args: Any, **kwargs: Any) -> Any:
            check(*args, **kwargs)
            return original(*args, **kwargs)

        for marker in ("jinja_pass_arg",):  # keep pass_eval_context / pass_environment
            if hasattr(original, marker):
                setattr(limited, marker, getattr(original, marker))
        return limited

    def center(value: object, width: object = 80) -> None:
        if isinstance(width, int) and width > MAX_VALUE_SIZE:
            _refuse(f"a width over {MAX_VALUE_SIZE}")

    def indent(s: object, width: object = 4, *_: object, **__: object) -> None:
        step = width if isinstance(width, int) else len(str(width))
        if (str(s).count("\n") + 1) * step > MAX_VALUE_SIZE:
            _refuse(f"an indented text over {MAX_VALUE_SIZE} characters")

    def replace(_ctx: object, s: object, old: object, new: object, count: object = None) -> None:
        if _replaced_size(str(s), old, new, -1 if count is None else count) > MAX_VALUE_SIZE:
            _refuse(f"a text over {MAX_VALUE_SIZE} characters (replace)")

    def fmt(value: object, *_: object, **__: object) -> None:
        _check_format(value)

    def batch(value: object, linecount: object = 1, fill_with: object = None) -> None:
        if isinstance(linecount, int) and linecount > MAX_VALUE_SIZE:
            _refuse(f"a batch over {MAX_VALUE_SIZE} items")

    def slices(_ctx: object, value: object, slices: object = 1, fill_with: object = None) -> None:
        if isinstance(slices, int) and slices > MAX_VALUE_SIZE:
            _refuse(f"over {MAX_VALUE_SIZE} slices")

    @jinja2.pass_eval_context
    def join(eval_ctx: Any, value: Any, d: object = "", attribute: Any = None) -> str:
        items = list(value)
        separators = len(str(d)) * max(0, len(items) - 1)
        if separators + sum(len(str(item)) for item in items) > MAX_VALUE_SIZE:
            _refuse(f"a joined text over {MAX_VALUE_SIZE} characters")
        # ``do_join`` is typed Any by its async wrapper; this environment is not async, so
        # it returns the sync variant's text.
        joined: str = jinja2.filters.do_join(eval_ctx, items, d, attribute)
        return joined

    @jinja2.pass_environment
    def total(environment: Any, iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
        items = list(iterable)
        sizes = [size for item in (start, *items) if (size := _size(item)) is not None]
        if sum(sizes) > MAX_VALUE_SIZE:
            _refuse(f"a sum of texts or lists over {MAX_VALUE_SIZE} items")
        return jinja2.filters.do_sum(environment, items, attribute, start)

    return {
        "join": join,
        "sum": total,
        "center": sized("center", center),
        "indent": sized("indent", indent),
        "replace": sized("replace", replace),
        "format": sized("format", fmt),
        "batch": sized("batch", batch),
        "slice": sized("slice", slices),
    }


def check_json_indent(indent: object) -> None:
    """``tojson(indent=…)`` writes the indent on every line: keep it to a real indent."""
    if indent is not None and not (isinstance(indent, int) and 0 <= indent <= 16) and not (
        isinstance(indent, str) and len(indent) <= 16
    ):
        _refuse("a tojson indent that is not 0 to 16 spaces")


def render_limited(
    template: jinja2.Template, budget: Budget | None, context: dict[str, Any]
) -> str:
    """Render within ``budget`` (a fresh one when None), the output capped as it is written."""
    budget = budget or Budget()
    parts: list[str] = []
    size = 0
    if budget.spent:
        budget.spent = False
        budget.check()  # the probe's time is up: every later render is refused at once
    # ``generate`` is a generator function annotated as an Iterator: closing it ends the
    # template's render at once when the output is refused.
    pieces = cast(Generator[str, None, None], template.generate(**context))
    with time_limit(budget), closing(pieces):
        for piece in pieces:
            size += len(piece)
            if size > MAX_VALUE_SIZE:
                _refuse(f"an output over {MAX_VALUE_SIZE} characters")
            parts.append(piece)
    return "".join(parts)
