"""A chat as a file: Markdown to read, JSON to process (with every turn's metrics).

JSON carries ``format`` and ``format_version`` so readers can tell what they hold. Token
ids are exported as stored (the reply's exact tokens); the KV state is not exported:
it belongs to one model build and is rebuilt from the messages.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from app.storage.store import Store

EXPORT_FORMAT = "kvchat-chat"
EXPORT_FORMAT_VERSION = 1


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


def export_chat(store: Store, chat_id: int, path: str | Path) -> Path:
    """Write ``.json`` as JSON and anything else as Markdown."""
    target = Path(path)
    if target.suffix.lower() == ".json":
        text = json.dumps(chat_document(store, chat_id), ensure_ascii=False, indent=2)
    else:
        text = chat_markdown(store, chat_id)
    target.write_text(text + "\n", encoding="utf-8")
    return target
