"""Live prefill on the real model: a draft prefilled while it is typed makes Send pay only
the tokens that differ, edits roll back to the common prefix, and the reply is the one a
cold evaluation gives."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from conftest import GREEDY, TEST_CTX

from app.core.sequences import common_prefix_length
from app.domain import Step
from app.session.chat_session import ChatSession, GenerationOptions
from app.storage.store import Store

INSTRUCTIONS = "You are a terse assistant. Answer in one short sentence."
MESSAGE = "What is the tallest mountain in Europe, and how high is it?"


def _warm_chat(engine: ChatSession, store: Store) -> int:
    """A history-first chat with one committed turn and its block warmed on top."""
    chat = store.create_chat("live", "history-first")
    store.add_instruction_version(chat.id, INSTRUCTIONS)
    engine.send(chat.id, "Name a large animal.", GREEDY)
    engine.after_reply(chat.id)
    return chat.id


def _draft_prompt(engine: ChatSession, chat_id: int, text: str) -> list[int]:
    return engine.prompt_plan(chat_id, text).tokens


def test_a_prefilled_draft_makes_send_pay_only_the_last_token(
    engine: ChatSession, store: Store
) -> None:
    chat_id = _warm_chat(engine, store)
    warm = engine.cache_size
    prompt = _draft_prompt(engine, chat_id, MESSAGE)
    draft = engine.prefill_draft(chat_id, MESSAGE)
    assert draft.completed and draft.skipped is None
    assert (draft.reused, draft.evaluated, draft.discarded) == (warm, len(prompt) - warm, 0)
    assert list(engine.cache_tokens) == prompt  # the prompt exactly as Send makes it
    result = engine.send(chat_id, MESSAGE, GREEDY)
    # Everything was held: only the last token is evaluated again, for its logits.
    assert result.metrics.prefill_tokens == 1
    assert result.metrics.reused_tokens == len(prompt) - 1
    assert result.metrics.typed_ahead_tokens == len(prompt) - 1 - warm


def test_a_send_after_more_typing_pays_only_the_tokens_that_differ(
    engine: ChatSession, store: Store
) -> None:
    chat_id = _warm_chat(engine, store)
    typed = MESSAGE[:30]
    engine.prefill_draft(chat_id, typed)
    held = list(engine.cache_tokens)
    prompt = _draft_prompt(engine, chat_id, MESSAGE)
    common = common_prefix_length(held, prompt)
    result = engine.send(chat_id, MESSAGE, GREEDY)
    assert result.metrics.reused_tokens == common
    assert result.metrics.prefill_tokens == len(prompt) - common


def test_an_edit_in_the_middle_rolls_back_to_the_common_prefix(
    engine: ChatSession, store: Store
) -> None:
    chat_id = _warm_chat(engine, store)
    engine.prefill_draft(chat_id, MESSAGE)
    first = list(engine.cache_tokens)
    edited = MESSAGE.replace("tallest", "oldest")
    target = _draft_prompt(engine, chat_id, edited)
    common = common_prefix_length(first, target)
    assert common < len(first) - 5  # the edit is in the middle, not at the end
    draft = engine.prefill_draft(chat_id, edited)
    assert draft.reused == common
    assert draft.discarded == len(first) - common
    assert draft.evaluated == len(target) - common
    assert list(engine.cache_tokens) == target


def test_the_greedy_reply_after_a_live_prefill_equals_a_cold_one(
    store: Store, make_engine: Callable
) -> None:
    options = GenerationOptions(max_tokens=24, temperature=0.0)
    live = make_engine(store)
    chat_id = _warm_chat(live, store)
    for end in range(8, len(MESSAGE) + 1, 9):  # typed in bursts, with a correction
        live.prefill_draft(chat_id, MESSAGE[:end])
    live.prefill_draft(chat_id, MESSAGE[:20] + "xyz")
    live.prefill_draft(chat_id, MESSAGE)
    typed_ahead = live.send(chat_id, MESSAGE, options)
    assert typed_ahead.metrics.prefill_tokens == 1
    live_tokens = store.message(typed_ahead.reply_message_id).token_ids
    live.close()

    store.kv.delete_state(chat_id)
    cold = make_engine(store)
    again = cold.regenerate(chat_id, options)
    assert again.metrics.reused_tokens == 0
    assert store.message(again.reply_message_id).token_ids == live_tokens


def test_a_newer_draft_cancels_the_one_being_prefilled(engine: ChatSession, store: Store) -> None:
    chat_id = _warm_chat(engine, store)
    warm = engine.cache_size
    newer = threading.Event()
    batches: list[int] = []

    def on_batch(phase: str, done: int, total: int) -> None:
        batches.append(done)
        newer.set()  # a keystroke arrives during the first batch

    long_draft = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)
    draft = engine.prefill_draft(chat_id, long_draft, cancel=newer, progress=on_batch)
    assert not draft.completed
    assert len(batches) == 1  # stopped at the first batch boundary
    assert draft.evaluated == batches[0] < len(_draft_prompt(engine, chat_id, long_draft)) - warm
    assert engine.cache_size == warm + draft.evaluated
    # The next draft keeps what the cancelled one evaluated.
    resumed = engine.prefill_draft(chat_id, long_draft)
    assert resumed.completed and resumed.reused == warm + draft.evaluated


def test_an_edited_block_is_warmed_on_top_of_the_history(engine: ChatSession, store: Store) -> None:
    chat_id = _warm_chat(engine, store)
    new_block = "Answer like a pirate, in one sentence."
    history = len(engine.history_plan(chat_id).tokens)
    cost, _ = engine.edit_cost(chat_id, new_block)
    draft = engine.prefill_draft(chat_id, "", block_text=new_block)
    assert draft.evaluated == cost
    assert history <= draft.reused < history + 8  # the history kept, the old block dropped
    store.add_instruction_version(chat_id, new_block)
    assert list(engine.cache_tokens) == engine.history_plan(chat_id, with_block=True).tokens
    warmed = len(engine.history_plan(chat_id, with_block=True).tokens)
    result = engine.send(chat_id, MESSAGE, GREEDY)
    assert result.metrics.reused_tokens == warmed  # the new block is not paid at send


def test_a_draft_runs_the_pending_commit_first(engine: ChatSession, store: Store) -> None:
    chat = store.create_chat("pending", "history-first")
    store.add_instruction_version(chat.id, INSTRUCTIONS)
    turn = engine.start_turn(chat.id, "Name a large animal.", GREEDY)
    turn.respond()
    assert turn.next_step == Step.COMMIT
    engine.prefill_draft(chat.id, MESSAGE)
    assert turn.done and not turn.remaining
    assert list(engine.cache_tokens) == _draft_prompt(engine, chat.id, MESSAGE)


def test_a_draft_that_cannot_fit_is_skipped_and_leaves_the_cache(
    engine: ChatSession, store: Store
) -> None:
    chat_id = _warm_chat(engine, store)
    held = engine.cache_tokens
    paste = ("A long pasted line of text with words. " * 30_000)[:1_000_000]
    started = time.perf_counter()
    for draft_text in (paste, "word " * TEST_CTX):  # refused untokenized; too many tokens
        draft = engine.prefill_draft(chat_id, draft_text)
        assert draft.skipped == "the draft does not fit the context"
        assert draft.evaluated == 0 and engine.cache_tokens == held
    assert time.perf_counter() - started < 30  # loose: no prefill of a 1 MB paste
