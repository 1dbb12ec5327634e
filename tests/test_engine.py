"""The cache logic on the real model: reuse, commit, warm-up, saved states, trim, metrics."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from conftest import GREEDY, TEST_CTX, flip_page_byte, send_cancelled_after, set_state_field

from app.core.sequences import common_prefix_length
from app.domain import Step
from app.session.chat_session import (
    ChatSession,
    ContextOverflowError,
    GenerationOptions,
    SessionError,
    StepResult,
    Turn,
    TurnStage,
    Upkeep,
)
from app.storage.store import Store

INSTRUCTIONS = "You are a terse assistant. Answer in one short sentence."
QUESTIONS = [
    "What is the capital of France?",
    "Name a large animal.",
    "What colour is the sky?",
    "Say something about rivers.",
]


def _chat(
    store: Store, name: str, layout: str = "history-first", instructions: str = INSTRUCTIONS
) -> int:
    chat = store.create_chat(name, layout)
    if instructions:
        store.add_instruction_version(chat.id, instructions)
    return chat.id


def _turn(engine: ChatSession, chat_id: int, text: str, options: GenerationOptions = GREEDY):
    result = engine.send(chat_id, text, options)
    engine.after_reply(chat_id)
    return result


def _block_tokens(engine: ChatSession, text: str) -> list[int]:
    return list(engine.builder.block_segment(text, engine.markup.block_later))


def _step(work: Turn | Upkeep) -> StepResult:
    """Run the next idle-time step, which must exist."""
    result = work.advance()
    assert result is not None
    return result


def _contains(haystack: list[int], needle: list[int]) -> bool:
    n = len(needle)
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def test_second_turn_reuses_history_and_block(engine: ChatSession, store: Store) -> None:
    chat_id = _chat(store, "reuse")
    first = _turn(engine, chat_id, QUESTIONS[0])
    assert first.metrics.reused_tokens == 0
    history = len(engine.history_plan(chat_id).tokens)
    second = engine.send(chat_id, QUESTIONS[1], GREEDY)
    pending = len(store.messages(chat_id)[-2].token_ids)  # the new user message's segment
    assert second.metrics.reused_tokens >= history
    generation = len(engine.builder.generation_prompt())
    assert second.metrics.prefill_tokens == pending + generation
    assert (
        second.metrics.prompt_tokens == second.metrics.reused_tokens + second.metrics.prefill_tokens
    )


def test_commit_leaves_only_history_and_warm_up_adds_the_block(
    engine: ChatSession, store: Store
) -> None:
    chat_id = _chat(store, "commit")
    result = engine.send(chat_id, QUESTIONS[0], GREEDY)
    block = _block_tokens(engine, INSTRUCTIONS)
    # The reply was generated with the block in view.
    assert _contains(list(engine.cache_tokens), block)

    before_commit = list(engine.cache_tokens)
    turn = engine.current_turn
    assert turn is not None and turn.next_step == Step.COMMIT
    commit = _step(turn)
    chat = store.chat(chat_id)
    history = engine.history_plan(chat.id).tokens
    assert commit.completed
    assert list(engine.cache_tokens) == history
    assert not _contains(list(engine.cache_tokens), block)
    assert engine.backend.last_position() + 1 == len(list(engine.cache_tokens))
    user, reply = store.messages(chat_id)[-2:]
    # Everything after the history is evaluated again, minus tokens that happen to match
    # (e.g. the <|im_start|> that opened the block also opens the user message).
    shared = common_prefix_length(before_commit, history)
    assert shared <= len(history) - len(user.token_ids) - len(reply.token_ids) + 1
    assert commit.tokens == len(history) - shared
    before, after = engine.builder.wrapper_sizes(engine.markup.assistant)
    content = reply.token_ids[before : len(reply.token_ids) - after]
    assert reply.token_ids == list(engine.builder.assistant_segment(content))

    warm = _step(turn)
    assert list(engine.cache_tokens) == history + block
    assert warm.tokens == len(block)
    assert _step(turn).step == Step.SAVE and turn.done
    metrics = turn.metrics
    assert metrics is not None and metrics.state_bytes > 0
    assert metrics.commit_tokens == commit.tokens
    assert metrics.warmup_tokens == warm.tokens
    assert metrics.background_tokens == commit.tokens + warm.tokens
    assert result.metrics.prefill_tokens > 0
    stored = store.metrics(chat_id)[-1].data
    assert stored["background_tokens"] == metrics.background_tokens
    assert stored["state_bytes"] == metrics.state_bytes
    # A first save writes every page; the pages hold the state less its few header bytes.
    assert 0.99 * metrics.state_bytes < stored["state_bytes_written"] <= metrics.state_bytes


def test_saved_state_restores_in_a_new_engine(store: Store, make_engine: Callable) -> None:
    chat_id = _chat(store, "restart")
    first = make_engine(store)
    _turn(first, chat_id, QUESTIONS[0])
    _turn(first, chat_id, QUESTIONS[1])
    saved_tokens = list(first.cache_tokens)
    first.close()

    second = make_engine(store)
    result = second.send(chat_id, QUESTIONS[2], GREEDY)
    history = store.kv.state(chat_id)
    assert result.metrics.state_load_ms is not None
    assert result.metrics.state_rejected is None
    assert result.metrics.reused_tokens >= len(saved_tokens)
    assert history.token_ids == saved_tokens


def test_instruction_edit_costs_only_the_block_in_history_first(
    store: Store, make_engine: Callable
) -> None:
    chat_id = _chat(store, "edit-hf")
    engine = make_engine(store)
    for question in QUESTIONS[:2]:
        _turn(engine, chat_id, question)
    history = len(engine.history_plan(chat_id).tokens)
    store.add_instruction_version(chat_id, "Always answer like a pirate.")
    result = engine.send(chat_id, QUESTIONS[2], GREEDY)
    block = len(_block_tokens(engine, "Always answer like a pirate."))
    pending = len(store.messages(chat_id)[-2].token_ids)
    assert result.metrics.reused_tokens >= history
    generation = len(engine.builder.generation_prompt())
    assert pending + generation <= result.metrics.prefill_tokens <= block + pending + generation


def test_instruction_edit_recomputes_everything_in_system_first(
    store: Store, make_engine: Callable
) -> None:
    chat_id = _chat(store, "edit-sf", layout="system-first")
    engine = make_engine(store)
    for question in QUESTIONS[:2]:
        _turn(engine, chat_id, question)
    steady = engine.send(chat_id, QUESTIONS[2], GREEDY)
    engine.after_reply(chat_id)
    assert steady.metrics.reused_tokens >= steady.metrics.history_tokens  # prefix caching works
    store.add_instruction_version(chat_id, "Always answer like a pirate.")
    edited = engine.send(chat_id, QUESTIONS[3], GREEDY)
    assert edited.metrics.reused_tokens < 8  # the block opens the prompt: nothing survives
    assert edited.metrics.prefill_tokens >= edited.metrics.history_tokens
    assert any("recomputed" in note for note in edited.metrics.notes)


def test_greedy_reply_with_reuse_matches_cold_evaluation(
    store: Store, make_engine: Callable
) -> None:
    options = GenerationOptions(max_tokens=24, temperature=0.0)
    chat_id = _chat(store, "greedy")
    warm = make_engine(store)
    for question in QUESTIONS[:2]:
        _turn(warm, chat_id, question, options)
    store.add_instruction_version(chat_id, "Describe things with colours.")
    reused = warm.send(chat_id, QUESTIONS[2], options)
    assert reused.metrics.reused_tokens > 0
    reused_tokens = store.message(reused.reply_message_id).token_ids
    warm.close()

    store.kv.delete_state(chat_id)
    cold = make_engine(store)
    again = cold.regenerate(chat_id, options)
    assert again.metrics.reused_tokens == 0
    cold_tokens = store.message(again.reply_message_id).token_ids
    opening, _ = cold.builder.wrapper_sizes(cold.markup.assistant)
    content = slice(opening, opening + 16)  # the first 16 reply tokens, after the markup
    assert len(reused_tokens) >= opening + 16 or reused_tokens == cold_tokens
    assert reused_tokens[content] == cold_tokens[content]
    assert again.reply.startswith(reused.reply[:20])


@pytest.mark.parametrize(
    ("change", "same_numbers"),
    [
        ("n_ctx", True),
        ("template", True),
        ("model", True),
        ("kv_type", False),  # a q8_0 cache computes (slightly) different numbers
    ],
)
def test_state_with_another_fingerprint_is_discarded_and_recomputed(
    store: Store, make_engine: Callable, change: str, same_numbers: bool
) -> None:
    chat_id = _chat(store, f"fingerprint-{change}")
    first = make_engine(store)
    _turn(first, chat_id, QUESTIONS[0])
    clean = first.send(chat_id, QUESTIONS[1], GREEDY)
    clean_reply = store.message(clean.reply_message_id).token_ids
    first.regenerate(chat_id, GREEDY)  # same reply again; leaves the cache as before
    first.after_reply(chat_id)
    first.close()
    fingerprint = dict(store.kv.state(chat_id).fingerprint)
    if change == "n_ctx":
        second = make_engine(store, n_ctx=TEST_CTX + 512)
    elif change == "kv_type":
        second = make_engine(store, kv_type="q8_0")
    else:
        fingerprint[change] = "something-else"
        set_state_field(store, chat_id, "fingerprint", json.dumps(fingerprint, sort_keys=True))
        second = make_engine(store)
    result = second.regenerate(chat_id, GREEDY)
    assert result.metrics.state_rejected is not None
    assert change in result.metrics.state_rejected
    assert result.metrics.reused_tokens == 0
    assert store.kv.state(chat_id) is None  # discarded, not kept around
    recomputed_reply = store.message(result.reply_message_id).token_ids
    assert recomputed_reply == clean_reply or not same_numbers


def test_flipped_bytes_in_state_are_detected(store: Store, make_engine: Callable) -> None:
    chat_id = _chat(store, "flipped")
    first = make_engine(store)
    _turn(first, chat_id, QUESTIONS[0])
    first.close()
    flip_page_byte(store, chat_id, 0)
    second = make_engine(store)
    load = second.activate(chat_id)
    assert not load.restored
    assert "checksum" in load.rejected
    assert second.cache_tokens == ()
    assert store.kv.state(chat_id) is None


def _fill(engine: ChatSession, chat_id: int, turns: int) -> None:
    for index in range(turns):
        _turn(engine, chat_id, QUESTIONS[index % len(QUESTIONS)])


def test_exact_trim_drops_oldest_turns_and_recomputes_what_is_kept(
    engine: ChatSession, store: Store
) -> None:
    chat_id = _chat(store, "trim-exact")
    _fill(engine, chat_id, 3)
    messages = store.messages(chat_id)
    last_turn = sum(len(m.token_ids) for m in messages[-2:])
    preview = engine.preview_trim(chat_id, last_turn + 1, "exact")
    assert preview.turns_change == 2
    assert preview.dropped_message_ids == [m.id for m in messages[:4]]
    assert preview.recompute_tokens == last_turn
    engine.set_trim(chat_id, last_turn + 1, "exact")
    chat = store.chat(chat_id)
    assert chat.trim_tokens == last_turn + 1 and chat.cache_start_seq == messages[-2].seq
    warm = _step(engine.upkeep(chat_id, (Step.WARM_UP,)))
    anchor = len(engine.history_plan(chat.id).segments[0].tokens)
    assert warm.tokens >= last_turn  # everything after the anchor is evaluated again
    assert list(engine.cache_tokens)[:anchor] == engine.history_plan(chat.id).tokens[:anchor]
    result = engine.send(chat_id, QUESTIONS[3], GREEDY)
    engine.after_reply(chat_id)
    assert result.metrics.history_tokens <= anchor + last_turn + 1
    after = store.metrics(chat_id)[-1].data
    assert after["trimmed_turns"] >= 1  # the limit keeps holding as the chat grows
    kept = [m for m in store.messages(chat_id) if m.seq >= store.chat(chat_id).cache_start_seq]
    assert sum(len(m.token_ids) for m in kept) <= last_turn + 1


def test_shift_trim_moves_cells_without_recompute(engine: ChatSession, store: Store) -> None:
    chat_id = _chat(store, "trim-shift")
    _fill(engine, chat_id, 3)
    before = list(engine.cache_tokens)
    messages = store.messages(chat_id)
    dropped = sum(len(m.token_ids) for m in messages[:2])
    keep = sum(len(m.token_ids) for m in messages[2:])
    preview = engine.set_trim(chat_id, keep, "shift")
    assert preview.recompute_tokens == 0 and preview.turns_change == 1
    assert len(list(engine.cache_tokens)) == len(before) - dropped
    assert engine.backend.last_position() + 1 == len(list(engine.cache_tokens))
    warm = _step(engine.upkeep(chat_id, (Step.WARM_UP,)))
    assert warm.tokens == 0  # the block is still on top, shifted with the history
    cached = engine.history_plan(chat_id, with_block=True).tokens
    assert list(engine.cache_tokens) == cached
    result = engine.send(chat_id, QUESTIONS[3], GREEDY)
    assert result.metrics.reused_tokens == len(cached)
    assert result.reply


def test_metrics_are_complete_and_consistent(engine: ChatSession, store: Store) -> None:
    chat_id = _chat(store, "metrics")
    result = engine.send(chat_id, QUESTIONS[0], GREEDY)
    metrics = engine.after_reply(chat_id)
    data = metrics.as_dict()
    for key in (
        "reused_tokens",
        "prefill_tokens",
        "background_tokens",
        "prefill_ms",
        "ttft_ms",
        "decode_tokens",
        "decode_tokens_per_s",
        "cache_tokens",
        "state_bytes",
        "state_save_ms",
        "state_load_ms",
        "layout",
        "trimmed_turns",
    ):
        assert key in data
    assert data["ttft_ms"] >= data["prefill_ms"] > 0
    assert data["decode_tokens"] == len(store.message(result.reply_message_id).token_ids) - 6
    assert data["cache_tokens"] == len(list(engine.cache_tokens))
    assert data["state_bytes"] > 1000 * data["cache_tokens"]
    assert data["state_load_ms"] is None  # nothing was loaded in this process
    assert store.metrics(chat_id)[-1].data == data


def test_q8_0_cache_stores_fewer_bytes_per_token(store: Store, make_engine: Callable) -> None:
    sizes = {}
    for kv_type in ("f16", "q8_0"):
        chat_id = _chat(store, f"kv-{kv_type}")
        engine = make_engine(store, kv_type=kv_type)
        _turn(engine, chat_id, QUESTIONS[0])
        sizes[kv_type] = engine.bytes_per_token
        engine.close()
    assert sizes["q8_0"] < 0.6 * sizes["f16"]


def test_cancel_keeps_partial_reply_and_a_consistent_cache(
    engine: ChatSession, store: Store
) -> None:
    chat_id = _chat(store, "cancel")
    result, pieces = send_cancelled_after(engine, chat_id)
    assert result.metrics.finish_reason == "cancelled"
    reply = store.message(result.reply_message_id)
    assert reply.status == "cancelled" and reply.text == "".join(pieces)
    assert engine.backend.last_position() + 1 == len(list(engine.cache_tokens))
    engine.after_reply(chat_id)
    assert list(engine.cache_tokens) == engine.history_plan(chat_id, with_block=True).tokens
    follow = engine.send(chat_id, QUESTIONS[0], GREEDY)
    assert follow.metrics.reused_tokens > 0


def test_context_overflow_is_refused_with_the_excess(store: Store, make_engine: Callable) -> None:
    chat_id = _chat(store, "overflow")
    engine = make_engine(store, n_ctx=256)
    with pytest.raises(ContextOverflowError) as raised:
        engine.send(chat_id, "word " * 400, GREEDY)
    assert raised.value.over > 0
    assert f"{raised.value.over} tokens over" in str(raised.value)
    assert store.messages(chat_id) == []  # refused before anything was stored


def test_history_over_the_context_drops_oldest_turns(store: Store, make_engine: Callable) -> None:
    chat_id = _chat(store, "overflow-history")
    engine = make_engine(store, n_ctx=256)
    for index in range(10):
        result = engine.send(chat_id, QUESTIONS[index % 4] + " Explain in detail.", GREEDY)
        engine.after_reply(chat_id)
        assert result.metrics.prompt_tokens + GREEDY.max_tokens <= 256
    assert store.chat(chat_id).cache_start_seq > 0
    assert len(store.messages(chat_id)) == 20  # nothing lost from the chat itself


def test_a_turn_loads_the_chat_messages_once(
    engine: ChatSession, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    chat_id = _chat(store, "load-once")
    _turn(engine, chat_id, QUESTIONS[0])
    loads: list[int] = []
    real_messages = store.messages

    def counted(requested: int) -> list:
        loads.append(requested)
        return real_messages(requested)

    monkeypatch.setattr(store, "messages", counted)
    turn = engine.start_turn(chat_id, QUESTIONS[1], GREEDY)
    turn.respond()
    steps = []
    while (step := turn.advance()) is not None:
        steps.append(step.step)
    assert steps == [Step.COMMIT, Step.WARM_UP, Step.SAVE]
    assert turn.done and turn.metrics is not None and turn.metrics.state_bytes > 0
    assert loads == [chat_id]


def test_idle_steps_refuse_to_run_before_the_reply(engine: ChatSession, store: Store) -> None:
    chat_id = _chat(store, "order")
    turn = engine.start_turn(chat_id, QUESTIONS[0], GREEDY)
    with pytest.raises(SessionError, match="respond"):
        turn.advance()
    turn.respond()
    with pytest.raises(SessionError, match="already replied"):
        turn.respond()
    newer = engine.upkeep(chat_id)
    assert turn.advance() is None and turn.stage == TurnStage.SUPERSEDED
    assert newer.run()


def test_regenerate_draws_a_new_seed_unless_greedy(engine: ChatSession, store: Store) -> None:
    chat_id = _chat(store, "seeds")
    sampled = GenerationOptions(max_tokens=6, temperature=0.9, seed=7)
    first = engine.send(chat_id, QUESTIONS[0], sampled)
    assert first.metrics.seed == 7
    seeds = {engine.regenerate(chat_id, sampled).metrics.seed for _ in range(3)}
    assert len(seeds) == 3 and 7 not in seeds
    greedy_a = engine.regenerate(chat_id, GREEDY)
    greedy_b = engine.regenerate(chat_id, GREEDY)
    assert greedy_a.metrics.seed == greedy_b.metrics.seed == GREEDY.seed
    assert greedy_a.reply == greedy_b.reply


def test_attention_memory_keeps_no_snapshots(engine: ChatSession, store: Store) -> None:
    """Snapshots are only for memory that cannot drop a partial range (recurrent)."""
    assert engine.backend.memory_kind == "attention" and engine.mirror.partial_removal
    chat_id = _chat(store, "no-snapshots")
    for question in QUESTIONS[:2]:
        _turn(engine, chat_id, question)
    assert engine.mirror.checkpoints == []
    assert engine.idle_order == (Step.COMMIT, Step.WARM_UP, Step.SAVE)
    assert not any(row.data["notes"] for row in store.metrics(chat_id))
