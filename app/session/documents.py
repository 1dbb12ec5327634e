"""A turn's prompt with documents: the fixed region up to the last document is evaluated
as a step of its own (the document's eval in the turn's phases), then the question."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace

from app.core.kv_mirror import KVMirror, ProgressCallback, SyncResult
from app.core.metrics import TurnMetrics
from app.core.prompt import PromptBuilder, PromptPlan, Segment
from app.core.sequences import common_prefix_length
from app.domain import SegmentKind
from app.session.alternatives import prefill
from app.session.engine import GenerationOptions
from app.storage.records import Document
from app.storage.store import Store


def documents_end(plan: PromptPlan) -> int:
    """Tokens from the start of the prompt to the end of its last document (0: none)."""
    end = position = 0
    for segment in plan.segments:
        position += len(segment.tokens)
        if segment.kind == SegmentKind.DOCUMENT:
            end = position
    return end


def sync_prompt(
    mirror: KVMirror,
    plan: PromptPlan,
    metrics: TurnMetrics,
    options: GenerationOptions,
    cancel: threading.Event | None,
    progress: ProgressCallback | None,
) -> SyncResult:
    """Bring the cache to the prompt; what the documents' region lacked is evaluated first
    and timed as the document's eval, then the rest (``prefill``: alternatives too). The
    result counts both parts as the prefill."""
    prompt = plan.tokens
    end = documents_end(plan)
    metrics.document_tokens = plan.count(SegmentKind.DOCUMENT)
    if not end or common_prefix_length(mirror.tokens, prompt) >= end:
        return prefill(mirror, prompt, options, cancel, progress)
    documents = mirror.sync(prompt[:end], need_logits=False, cancel=cancel, progress=progress)
    metrics.document_eval_tokens = documents.evaluated
    metrics.document_eval_ms = documents.ms
    if not documents.completed:
        return documents  # cancelled within the documents
    rest = prefill(mirror, prompt, options, cancel, progress)
    return replace(
        rest,
        reused=documents.reused,
        evaluated=rest.evaluated + documents.evaluated,
        ms=rest.ms + documents.ms,
        fallback=documents.fallback or rest.fallback,
    )


def document_sizes(builder: PromptBuilder, documents: Sequence[Document]) -> list[tuple[int, int]]:
    """(document id, tokens) of a chat's documents, in prompt order."""
    return [(d.id, len(builder.document_segment(d.name, d.text).tokens)) for d in documents]


def document_segments(builder: PromptBuilder, documents: Sequence[Document]) -> list[Segment]:
    """The documents' segments, in prompt order (each tokenized once per builder)."""
    return [builder.document_segment(d.name, d.text) for d in documents]


def shared_cache_note(store: Store, previous_chat: int | None, tokens: int) -> str:
    """The note of a chat that reuses the cells the previous chat left in the cache."""
    return (
        f"{tokens} tokens shared with the previous chat's cache"
        f" ({chat_label(store, previous_chat)}) are reused"
    )


def chat_label(store: Store, chat_id: int | None) -> str:
    """A chat's name for a note (its id when it is gone)."""
    chat = store.chat_or_none(chat_id) if chat_id is not None else None
    return repr(chat.name) if chat is not None else f"#{chat_id}"
