"""Reading a file to attach as a document: its text, bounded, or one line saying why not.

Plain text (``.txt``, ``.md`` and other UTF-8 text) is read as it is; a PDF by its text
layer (pypdf). Anything else (binary data, a PDF without text, a file past the limits)
is refused with a :class:`DocumentError` whose message is one line. No Qt, no storage.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

#: Largest file read at all, and the most text kept from it: far above what a context
#: holds (the prompt check refuses a document that does not fit), far below memory trouble.
MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_TEXT_CHARS = 2_000_000
#: Most PDF pages read (a hostile PDF can claim millions).
MAX_PDF_PAGES = 2000
TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown", ".text", ".rst", ".csv", ".log"})


class DocumentError(ValueError):
    """A file that cannot be attached, explained in one line."""


@dataclass(frozen=True)
class DocumentText:
    name: str
    text: str


def read_document(path: str | Path) -> DocumentText:
    """The file's name and text, or DocumentError (missing, too large, binary, no text)."""
    file = Path(path).expanduser()
    try:
        size = file.stat().st_size
        if not file.is_file():
            raise DocumentError(f"{file.name} is not a file")
    except OSError as error:
        raise DocumentError(f"cannot read {file}: {error.strerror or error}") from error
    if size > MAX_FILE_BYTES:
        raise DocumentError(
            f"{file.name} is {size / 1024**2:.0f} MB; documents up to "
            f"{MAX_FILE_BYTES // 1024**2} MB can be attached"
        )
    try:
        data = file.read_bytes()
    except OSError as error:
        raise DocumentError(f"cannot read {file}: {error.strerror or error}") from error
    text = _pdf_text(file.name, data) if data.startswith(b"%PDF-") else _plain_text(file.name, data)
    if not text.strip():
        raise DocumentError(f"{file.name} holds no text")
    if len(text) > MAX_TEXT_CHARS:
        raise DocumentError(
            f"{file.name} holds {len(text):,} characters; documents up to "
            f"{MAX_TEXT_CHARS:,} can be attached"
        )
    return DocumentText(file.name, text)


def _plain_text(name: str, data: bytes) -> str:
    """UTF-8 text (a BOM dropped); NUL bytes or invalid UTF-8 mean a binary file."""
    if b"\x00" in data[:65536]:
        raise DocumentError(f"{name} is not a text file (it holds binary data)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DocumentError(
            f"{name} is not UTF-8 text (byte {error.start} is not); attach .txt, .md or .pdf"
        ) from error
    return text.replace("\r\n", "\n")


def _pdf_text(name: str, data: bytes) -> str:
    """The text layer of a PDF, page by page (a scanned PDF has none: refused)."""
    from pypdf import PdfReader  # local: only a PDF pays for the import
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise DocumentError(f"{name} is an encrypted PDF")
        pages = reader.pages
        if len(pages) > MAX_PDF_PAGES:
            raise DocumentError(f"{name} has {len(pages)} pages; up to {MAX_PDF_PAGES} are read")
        parts: list[str] = []
        total = 0
        for page in pages:
            piece = page.extract_text() or ""
            total += len(piece)
            if total > MAX_TEXT_CHARS:
                raise DocumentError(
                    f"{name} holds over {MAX_TEXT_CHARS:,} characters of text; "
                    "documents up to that can be attached"
                )
            parts.append(piece.strip())
    except DocumentError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, RecursionError, OSError) as error:
        raise DocumentError(f"{name} is not a readable PDF: {error}") from error
    text = "\n\n".join(part for part in parts if part)
    if not text.strip():
        raise DocumentError(f"{name} has no text layer (a scanned PDF?)")
    return text
