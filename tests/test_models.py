"""Beyond the embedded model: Gemma 3 270M, whose sliding-window layers keep a second cache.

Every promise must hold there too: saved states restore across restarts at chat lengths
several times the window, and a greedy reply computed on a reused or restored cache is
the reply computed from scratch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import GREEDY

from app.core.llama_backend import LlamaBackend
from app.core.state_pages import join_pages, parse_state, split_pages
from app.domain import Role
from app.session.chat_session import ChatSession
from app.storage.store import Store

GEMMA_CTX = 4096
TOPIC = "The orchard gets morning sun, the pears ripen late, and the bees like the clover. "


def test_gemma_has_a_sliding_window_and_pages_join_byte_for_byte(gemma_model_path: Path) -> None:
    backend = LlamaBackend(gemma_model_path, n_ctx=GEMMA_CTX)
    try:
        window = backend.sliding_window
        assert window > 0
        ids = backend.tokenize(TOPIC * 80, special=False)[: 2 * window + 100]
        for start in range(0, len(ids), backend.n_batch):
            backend.decode(ids[start : start + backend.n_batch], start, logits_for_last=False)
        blob = bytes(backend.get_state())
        parsed = parse_state(blob)
        assert parsed is not None and len(parsed.caches) == 2  # full attention, then window
        assert parsed.caches[0].count == len(ids)
        assert 0 < parsed.caches[1].count < len(ids)
        pages = split_pages(parsed)
        joined = join_pages(parsed.seq_id, [c.format for c in parsed.caches], pages)
        assert bytes(joined) == blob
    finally:
        backend.close()


def _gemma_chat(store: Store, session: ChatSession, turns: int) -> int:
    chat = store.create_chat("orchard")
    store.add_instruction_version(chat.id, "Keep answers short. Mention the season. " * 90)
    for index in range(turns):
        store.add_message(chat.id, Role.USER, f"Question {index}: {TOPIC * 3}")
        store.add_message(chat.id, Role.ASSISTANT, f"Answer {index}: {TOPIC * 2}")
    session.after_reply(chat.id)
    return chat.id


@pytest.mark.slow
def test_gemma_restores_and_reuses_its_state_across_restarts(
    store: Store, make_engine: Callable, gemma_model_path: Path
) -> None:
    first = make_engine(store, model_path=gemma_model_path, n_ctx=GEMMA_CTX)
    chat_id = _gemma_chat(store, first, turns=14)
    history = len(first.history_plan(chat_id).tokens)
    assert history > 2 * first.backend.sliding_window
    reply = first.send(chat_id, "What ripens first?", GREEDY)
    first.after_reply(chat_id)
    assert reply.metrics.reused_tokens >= history
    first.close()

    second = make_engine(store, model_path=gemma_model_path, n_ctx=GEMMA_CTX)
    again = second.send(chat_id, "And what do the bees like?", GREEDY)
    assert again.metrics.state_rejected is None, again.metrics.notes
    assert again.metrics.reused_tokens >= len(second.history_plan(chat_id).tokens) - 64


@pytest.mark.slow
def test_gemma_greedy_reply_is_the_same_with_and_without_reuse(
    store: Store, make_engine: Callable, gemma_model_path: Path
) -> None:
    warm = make_engine(store, model_path=gemma_model_path, n_ctx=GEMMA_CTX)
    chat_id = _gemma_chat(store, warm, turns=10)
    warm.send(chat_id, "What ripens first?", GREEDY)
    warm.after_reply(chat_id)
    warm.close()
    # A restart, then an edit of the (1,000-token) block between turns.
    restored = make_engine(store, model_path=gemma_model_path, n_ctx=GEMMA_CTX)
    restored.send(chat_id, "Which fruit keeps longest?", GREEDY)
    restored.after_reply(chat_id)
    store.add_instruction_version(chat_id, "Answer in one sentence. Name a colour. " * 90)
    reused = restored.send(chat_id, "What should I plant next spring?", GREEDY)
    assert reused.metrics.reused_tokens > 2 * restored.backend.sliding_window
    reused_tokens = store.message(reused.reply_message_id).token_ids
    restored.close()

    store.kv.delete_state(chat_id)
    cold = make_engine(store, model_path=gemma_model_path, n_ctx=GEMMA_CTX)
    again = cold.regenerate(chat_id, GREEDY)
    assert again.metrics.reused_tokens == 0
    assert store.message(again.reply_message_id).token_ids == reused_tokens
