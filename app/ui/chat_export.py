"""Where a chat export goes by default: the user's documents folder, named as the chat reads.

The title is the one the window shows (the family's name, never a branch's internal
"Chat 1 (branch 2)"); the folder is the desktop's documents folder (QStandardPaths), or
the home folder where the desktop names none.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QStandardPaths

from app.storage.export import export_file_name

#: What each export kind writes: the file suffix, the dialog's filter, every version.
EXPORT_KINDS = {
    "md": (".md", "Markdown (*.md)", False),
    "json": (".json", "JSON (*.json)", False),
    "tree": (".json", "JSON (*.json)", True),
}


def documents_folder() -> Path:
    """The user's documents folder (made by the desktop; the home folder if there is none)."""
    location = QStandardPaths.StandardLocation.DocumentsLocation
    found = QStandardPaths.writableLocation(location)
    folder = Path(found) if found else Path.home()
    return folder if folder.is_dir() else Path.home()


def default_export_path(title: str, kind: str) -> Path:
    """The path the Export dialog proposes for the chat titled ``title``."""
    suffix = EXPORT_KINDS[kind][0]
    return documents_folder() / export_file_name(title, suffix)
