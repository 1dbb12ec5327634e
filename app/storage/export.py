"""A chat as a file: Markdown to read, JSON to process (with every turn's metrics).

JSON carries ``format`` and ``format_version`` so readers can tell what they hold. Token
ids are exported as stored (the reply's exact tokens); the KV state is not exported:
it belongs to one model build and is rebuilt from the messages.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from app.storage.sqlite_file import SQLITE_MAGIC
from app.storage.store import StorageError, Store

#: Files SQLite keeps beside a database.
SIDE_FILES = ("-wal", "-shm", "-journal")

EXPORT_FORMAT = "kvchat-chat"
EXPORT_FORMAT_VERSION = 1


#: Characters no file name may hold on one of the desktops KV Chat runs on.
_NOT_IN_FILE_NAMES = set('/\\:*?"<>|')
MAX_FILE_STEM = 120


def export_file_name(title: str, suffix: str) -> str:
    """A file name for a chat's export: its visible title as it reads (spaces, brackets
    and letters of any script kept), only the characters a file name cannot hold
    replaced, and never a hidden or empty name."""
    stem = "".join(
        "_" if c in _NOT_IN_FILE_NAMES or not c.isprintable() else c for c in title
    ).strip(" .")
    return (stem[:MAX_FILE_STEM].rstrip(" .") or "chat") + suffix


def _when(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, tz=dt.UTC).isoformat(timespec="seconds")


def chat_document(store: Store, chat_id: int) -> dict[str, Any]:
    """Everything a reader of the chat needs, as plain data."""
    chat = store.chat(chat_id)
    metrics_by_message = {
        row.message_id: row.data for row in store.metrics(chat_id) if row.message_id is not None
    }
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "exported_at": _when(dt.datetime.now(tz=dt.UTC).timestamp()),
        "chat": {
            "name": chat.name,
            "layout": chat.layout,
            "trim_tokens": chat.trim_tokens,
            "trim_mode": chat.trim_mode,
            "created_at": _when(chat.created_at),
        },
        "instruction_versions": [
            {
                "version": version.version,
                "text": version.text,
                "variables": dict(version.variables),
                "created_at": _when(version.created_at),
            }
            for version in store.instruction_versions(chat_id)
        ],
        "messages": [
            {
                "role": message.role,
                "text": message.text,
                "status": message.status,
                "instruction_version": message.instruction_version,
                "token_ids": list(message.token_ids),
                "created_at": _when(message.created_at),
                "metrics": metrics_by_message.get(message.id),
            }
            for message in store.messages(chat_id)
        ],
    }


def family_versions(store: Store, chat_id: int) -> list[dict[str, Any]]:
    """Every version of the chat (its family: the first chat and each branch made by an
    edit or a Regenerate), each with its messages, so nothing is lost in an export."""
    versions = []
    for chat in store.family(chat_id):
        metrics = {
            row.message_id: row.data for row in store.metrics(chat.id) if row.message_id
        }
        versions.append(
            {
                "name": chat.name,
                "branch_of": chat.root_chat_id and store.chat(chat.root_chat_id).name,
                "branch_seq": chat.branch_seq,
                "used_last": chat.id == store.latest_in_family(chat_id).id,
                "messages": [
                    {
                        "seq": m.seq,
                        "role": m.role,
                        "text": m.text,
                        "status": m.status,
                        "created_at": _when(m.created_at),
                        "metrics": metrics.get(m.id),
                    }
                    for m in store.messages(chat.id)
                ],
            }
        )
    return versions


def _metrics_line(metrics: dict[str, Any]) -> str:
    parts = [
        f"reused {metrics.get('reused_tokens', 0)}",
        f"recomputed {metrics.get('prefill_tokens', 0)} tokens",
    ]
    if metrics.get("ttft_ms") is not None:
        parts.append(f"first token {float(metrics['ttft_ms']):.0f} ms")
    if metrics.get("decode_tokens_per_s"):
        parts.append(f"{float(metrics['decode_tokens_per_s']):.0f} tok/s")
    return " · ".join(parts)


def _fence(text: str) -> str:
    """A fence longer than any backtick run inside, so the block cannot end early."""
    longest = max((len(run) for run in text.split("\n") if set(run) == {"`"}), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}\n{text}\n{ticks}"


def chat_markdown(store: Store, chat_id: int) -> str:
    """The chat as Markdown: instructions, then each message with its turn's figures."""
    document = chat_document(store, chat_id)
    chat = document["chat"]
    lines = [f"# {chat['name']}", ""]
    lines.append(f"*Exported from KV Chat · layout {chat['layout']} · {document['exported_at']}*")
    lines.append("")
    versions = document["instruction_versions"]
    if versions:
        current = versions[-1]
        lines += [f"## Instructions (version {current['version']})", "", _fence(current["text"])]
        if current["variables"]:
            lines += ["", "| Variable | Value |", "|---|---|"]
            for name, value in current["variables"].items():
                cell = str(value).replace("|", "\\|").replace("\n", " ")
                lines.append(f"| {name} | {cell} |")
        lines.append("")
    for message in document["messages"]:
        title = "You" if message["role"] == "user" else "Assistant"
        if message["status"] not in ("complete", None):
            title += f" ({message['status']})"
        lines += [f"## {title}", "", message["text"], ""]
        if message["metrics"]:
            lines += [f"*{_metrics_line(message['metrics'])}*", ""]
    return "\n".join(lines)


class ExportRefused(StorageError):
    """An export target that must not be overwritten (one of the app's files, a database)."""


def _protected_files(store: Store) -> list[Path]:
    """The chats database, its KV file, their WAL/SHM/journal files and the lock."""
    files = [store.path.with_name(store.path.name + ".lock")]
    for database in (store.path, store.kv_path):
        files += [database, *(database.with_name(database.name + end) for end in SIDE_FILES)]
    return files


def _same_file(one: Path, other: Path) -> bool:
    if one.resolve() == other.resolve():
        return True
    try:
        return os.path.samefile(one, other)  # a hard link, or another spelling of the path
    except OSError:
        return False


def _is_sqlite(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


def check_export_target(store: Store, path: str | Path) -> Path:
    """Where an export may be written, or ExportRefused: never over the chats database,
    its KV file, their WAL/SHM/lock files, or any SQLite database (by its header)."""
    target = Path(path).expanduser().resolve()
    if target.is_dir():
        raise ExportRefused(f"{path} is a folder; choose a file name")
    for protected in _protected_files(store):
        if _same_file(target, protected):
            raise ExportRefused(
                f"{path} is one of KV Chat's own files ({protected.name}); choose another file"
            )
    if _is_sqlite(target):
        raise ExportRefused(f"{path} is a SQLite database; an export never overwrites one")
    for end in SIDE_FILES:
        base = target.with_name(target.name.removesuffix(end))
        if target.name.endswith(end) and _is_sqlite(base):
            raise ExportRefused(f"{path} belongs to the SQLite database {base.name}")
    return target


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def write_atomically(target: Path, data: bytes) -> None:
    """Write a temporary file beside ``target`` and rename it over ``target`` once it is
    complete, so a failed write (a full disk, a kill) never leaves a truncated file."""
    mode = target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask()
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _readable(text: str) -> str:
    """Lone surrogates (bytes from argv or stdin that were not UTF-8) as U+FFFD."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def export_chat(
    store: Store, chat_id: int, path: str | Path, *, all_versions: bool = False
) -> Path:
    """Write ``.json`` as JSON and anything else as Markdown, checked and atomically;
    ``all_versions`` (JSON): every version of the chat too, under ``versions``.

    Text that UTF-8 cannot hold (lone surrogates) is kept exactly in JSON, as a ``\\uXXXX``
    escape, and shown as U+FFFD in Markdown.
    """
    target = check_export_target(store, path)
    if target.suffix.lower() == ".json":
        document = chat_document(store, chat_id)
        if all_versions:
            document["versions"] = family_versions(store, chat_id)
        text = json.dumps(document, ensure_ascii=False, indent=2)
        data = (text + "\n").encode("utf-8", errors="backslashreplace")
    else:
        data = (_readable(chat_markdown(store, chat_id)) + "\n").encode("utf-8")
    write_atomically(target, data)
    return target
