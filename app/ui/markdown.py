"""A small Markdown-ish to Qt rich-text converter for replies.

Qt's own Markdown reader produces HTML that QLabel cannot style per block, and model
replies are often half-finished while streaming (an open code fence must still show
as code). So this handles only what chat replies use: fenced code, inline code,
bold, italics, headings, bullet and numbered lists, paragraphs.
"""

from __future__ import annotations

import html
import re

CODE_BACKGROUND = "#f1f3f5"
CODE_BORDER = "#d0d7de"
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*|__(.+?)__")
_ITALIC = re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])")
_BULLET = re.compile(r"^\s*[-*+]\s+(.*)$")
_NUMBERED = re.compile(r"^\s*\d+[.)]\s+(.*)$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_FENCE = re.compile(r"^\s*```")


def _inline(text: str) -> str:
    """Escape, then mark up inline code first so its content is never bolded."""
    pieces: list[str] = []
    position = 0
    for match in _INLINE_CODE.finditer(text):
        pieces.append(_emphasis(html.escape(text[position : match.start()])))
        pieces.append(
            f"<code style='background:{CODE_BACKGROUND}'>{html.escape(match.group(1))}</code>"
        )
        position = match.end()
    pieces.append(_emphasis(html.escape(text[position:])))
    return "".join(pieces)


def _emphasis(escaped: str) -> str:
    escaped = _BOLD.sub(lambda m: f"<b>{m.group(1) or m.group(2)}</b>", escaped)
    return _ITALIC.sub(lambda m: f"<i>{m.group(1)}</i>", escaped)


def _code_block(lines: list[str], language: str) -> str:
    code = html.escape("\n".join(lines)) or "&nbsp;"
    caption = (
        f"<div style='color:#57606a; font-size:small'>{html.escape(language)}</div>"
        if language
        else ""
    )
    return (
        f"<table width='100%' cellspacing='0' cellpadding='6' "
        f"style='background:{CODE_BACKGROUND}; border:1px solid {CODE_BORDER}; margin:4px 0'>"
        f"<tr><td>{caption}<pre style='margin:0; font-family:monospace'>{code}</pre></td></tr>"
        "</table>"
    )


def markdown_to_html(text: str) -> str:
    """Rich text for a QLabel; tolerant of unfinished Markdown (streaming)."""
    out: list[str] = []
    paragraph: list[str] = []
    list_kind: str | None = None
    code: list[str] | None = None
    language = ""

    def flush_paragraph() -> None:
        if paragraph:
            out.append("<p style='margin:0 0 6px 0'>" + "<br>".join(paragraph) + "</p>")
            paragraph.clear()

    def close_list() -> None:
        nonlocal list_kind
        if list_kind:
            out.append(f"</{list_kind}>")
            list_kind = None

    for line in text.split("\n"):
        if code is not None:
            if _FENCE.match(line):
                out.append(_code_block(code, language))
                code = None
            else:
                code.append(line)
            continue
        if _FENCE.match(line):
            flush_paragraph()
            close_list()
            code = []
            language = line.strip()[3:].strip()
            continue
        bullet = _BULLET.match(line)
        numbered = None if bullet else _NUMBERED.match(line)
        if bullet or numbered:
            flush_paragraph()
            kind = "ul" if bullet else "ol"
            if list_kind != kind:
                close_list()
                out.append(f"<{kind} style='margin:0 0 6px 0'>")
                list_kind = kind
            item = (bullet or numbered).group(1)  # type: ignore[union-attr]
            out.append(f"<li>{_inline(item)}</li>")
            continue
        heading = _HEADING.match(line)
        if heading:
            flush_paragraph()
            close_list()
            size = {1: "x-large", 2: "large"}.get(len(heading.group(1)), "medium")
            out.append(
                f"<p style='margin:4px 0; font-size:{size}'><b>{_inline(heading.group(2))}</b></p>"
            )
            continue
        if not line.strip():
            flush_paragraph()
            close_list()
            continue
        close_list()
        paragraph.append(_inline(line))
    if code is not None:  # an unfinished fence while streaming
        out.append(_code_block(code, language))
    flush_paragraph()
    close_list()
    return "".join(out)


def plain_to_html(text: str) -> str:
    """User messages: shown as typed, only escaped."""
    return "<p style='margin:0'>" + html.escape(text).replace("\n", "<br>") + "</p>"
