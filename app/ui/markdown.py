"""Replies as Markdown: markdown-it-py (CommonMark + GFM tables) and Pygments for code.

A reply is cut into blocks: rich text between top-level code blocks, and each code
block on its own, so the bubble can give every code block a Copy button. Qt's rich text
understands only part of HTML/CSS, so the HTML is given explicit, theme-coloured styles
here. Raw HTML in a reply is shown as text (``html: False``), never interpreted.
Half-written Markdown while streaming is fine: an open fence is a code block to the end.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import re

from markdown_it import MarkdownIt
from markdown_it.token import Token
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.lexers.special import TextLexer
from pygments.util import ClassNotFound

from app.ui.theme import Palette, palette


@dataclasses.dataclass(frozen=True)
class TextBlock:
    html: str


@dataclasses.dataclass(frozen=True)
class CodeBlock:
    code: str
    language: str
    html: str  # highlighted, ready for a QLabel


Block = TextBlock | CodeBlock


_LANGUAGE = re.compile(r"^\S+")


@functools.lru_cache(maxsize=256)
def highlight_code(code: str, language: str, style: str) -> str:
    """Pygments spans with inline colours (Qt reads no CSS classes), in a wrapping <pre>."""
    try:
        lexer = get_lexer_by_name(language) if language else TextLexer()
    except ClassNotFound:
        lexer = TextLexer()
    formatter = HtmlFormatter(style=style, noclasses=True, nowrap=True)
    body = highlight(code, lexer, formatter).rstrip("\n") or "&nbsp;"
    return f"<pre style='margin:0; white-space:pre-wrap; font-family:monospace'>{body}</pre>"


def _style_html(fragment: str, colours: Palette) -> str:
    """Explicit styles on the tags markdown-it emits (the text itself is already escaped)."""
    replacements = {
        "<p>": "<p style='margin:0 0 6px 0'>",
        "<table>": (
            f"<table border='1' cellspacing='0' cellpadding='4' "
            f"style='border-collapse:collapse; border-color:{colours.border}; margin:4px 0'>"
        ),
        "<th>": f"<th style='background:{colours.panel}'>",
        '<th style="text-align:left">': f"<th align='left' style='background:{colours.panel}'>",
        '<th style="text-align:right">': f"<th align='right' style='background:{colours.panel}'>",
        '<th style="text-align:center">': (
            f"<th align='center' style='background:{colours.panel}'>"
        ),
        '<td style="text-align:left">': "<td align='left'>",
        '<td style="text-align:right">': "<td align='right'>",
        '<td style="text-align:center">': "<td align='center'>",
        "<blockquote>": (f"<blockquote style='color:{colours.muted}; margin:4px 0 4px 12px'>"),
        "<code>": (f"<code style='background:{colours.code_background}; font-family:monospace'>"),
        "<ul>": "<ul style='margin:0 0 6px 0'>",
        "<ol>": "<ol style='margin:0 0 6px 0'>",
        "<h1>": "<h1 style='font-size:x-large; margin:4px 0'>",
        "<h2>": "<h2 style='font-size:large; margin:4px 0'>",
        "<h3>": "<h3 style='font-size:medium; margin:4px 0'>",
    }
    for tag, styled in replacements.items():
        fragment = fragment.replace(tag, styled)
    fragment = re.sub(r"<h([4-6])>", r"<h\1 style='font-size:medium; margin:4px 0'>", fragment)
    fragment = fragment.replace("<a href=", f"<a style='color:{colours.accent}' href=")
    return fragment


def _nested_code(colours: Palette) -> object:
    """markdown-it's highlight hook: code blocks inside lists or quotes stay in the text."""

    def render(code: str, language: str, _attrs: object) -> str:
        inner = highlight_code(code.rstrip("\n"), language, colours.pygments_style)
        return inner.replace(
            "<pre style='", f"<pre style='background:{colours.code_background}; ", 1
        )

    return render


@functools.cache
def _parser(colours: Palette) -> MarkdownIt:
    parser = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable(
        ["table", "strikethrough"]
    )
    parser.options["highlight"] = _nested_code(colours)
    return parser


def markdown_blocks(text: str, colours: Palette | None = None) -> list[Block]:
    """The reply as text blocks and top-level code blocks, in order."""
    colours = colours or palette()
    parser = _parser(colours)
    tokens = parser.parse(text)
    blocks: list[Block] = []
    pending: list[Token] = []

    def flush() -> None:
        if pending:
            rendered = parser.renderer.render(pending, parser.options, {})
            if rendered.strip():
                blocks.append(TextBlock(_style_html(rendered, colours)))
            pending.clear()

    for token in tokens:
        if token.level == 0 and token.type in ("fence", "code_block"):
            flush()
            match = _LANGUAGE.match(token.info.strip()) if token.info else None
            language = match.group(0) if match else ""
            code = token.content.rstrip("\n")
            blocks.append(
                CodeBlock(code, language, highlight_code(code, language, colours.pygments_style))
            )
        else:
            pending.append(token)
    flush()
    return blocks


def markdown_to_html(text: str, colours: Palette | None = None) -> str:
    """The whole reply as one rich-text document (exports, tooltips, tests)."""
    colours = colours or palette()
    parts = []
    for block in markdown_blocks(text, colours):
        if isinstance(block, CodeBlock):
            parts.append(
                f"<table width='100%' cellspacing='0' cellpadding='6' style='background:"
                f"{colours.code_background}; border:1px solid {colours.code_border}'>"
                f"<tr><td>{block.html}</td></tr></table>"
            )
        else:
            parts.append(block.html)
    return "".join(parts)


def plain_to_html(text: str) -> str:
    """User messages: shown as typed, only escaped."""
    return "<p style='margin:0'>" + html.escape(text).replace("\n", "<br>") + "</p>"
