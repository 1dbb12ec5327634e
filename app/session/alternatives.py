"""Alternatives: several replies to one prompt, the prompt evaluated once.

The replies are sequences of the cache that share the prompt's cells (llama.cpp's
``llama_memory_seq_cp`` tags the cells, no data moves), and every decode step evaluates
the next token of every unfinished reply in one batch: N replies cost one prefill and
about one reply's decode steps, each a little wider. Sequence 0 is the reply the turn
keeps; the others leave the cache when sampling ends, so the cache (and its mirror)
then hold the prompt and the kept reply only.

Memory that cannot share or drop part of a sequence (recurrent and hybrid models) gets
the replies one after another instead, each from a snapshot of the prompt.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from app import limits
from app.core.kv_mirror import KVMirror, ProgressCallback, SyncResult
from app.core.metrics import TurnMetrics
from app.domain import FinishReason
from app.session.engine import GenerationOptions, TokenCallback
from app.session.generation import GeneratedReply, ReplyStream, generate_reply

if TYPE_CHECKING:
    from app.core.llama_backend import LlamaBackend

GREEDY_NOTE = (
    "temperature 0: every alternative is the same reply (greedy sampling always takes "
    "the most likely token); raise the temperature for different ones"
)


def shares_cells(backend: LlamaBackend, mirror: KVMirror) -> bool:
    """Whether the replies can be sequences sharing the prompt's cells: attention memory
    that drops partial ranges (recurrent state cannot be shared that way)."""
    return mirror.partial_removal and backend.memory_kind == "attention"


def sample_together(
    backend: LlamaBackend,
    mirror: KVMirror,
    end: tuple[int | None, str],
    options: GenerationOptions,
    metrics: TurnMetrics,
    started: float,
    on_token: TokenCallback | None,
    cancel: threading.Event | None,
) -> list[GeneratedReply]:
    """``options.alternatives`` replies after the prompt the cache ends with, one batch per
    decode step for all of them; the first streams to ``on_token`` and stays in the cache."""
    count = options.alternatives
    sequences = mirror.fork(count)
    streams = [
        ReplyStream(backend, end[0], end[1], on_token if index == 0 else None)
        for index in range(count)
    ]
    samplers = [
        backend.make_sampler(
            options.temperature, limits.alternative_seed(options.seed, index), options.sampling
        )
        for index in range(count)
    ]
    logits_at = dict.fromkeys(sequences, -1)  # the prompt's last logits serve every reply
    finish = FinishReason.LENGTH
    decode_started = time.perf_counter()
    try:
        for step in range(options.max_tokens):
            if cancel is not None and cancel.is_set():
                finish = FinishReason.CANCELLED
                break
            batch: dict[int, int] = {}
            for sequence, stream, sampler in zip(sequences, streams, samplers, strict=True):
                if stream.finish is not None:
                    continue
                token = sampler.sample(logits_at[sequence])
                if step == 0 and sequence == 0:
                    metrics.ttft_ms = (time.perf_counter() - started) * 1000
                    decode_started = time.perf_counter()
                if not stream.take(token) and step < options.max_tokens - 1:
                    batch[sequence] = token  # the last token need not be evaluated
            if not batch:
                break
            if not mirror.step_forks(batch):
                finish = FinishReason.CONTEXT_FULL
                break
            logits_at = {sequence: index for index, sequence in enumerate(batch)}
    finally:
        for sampler in samplers:
            sampler.close()
        mirror.join()  # only sequence 0, the kept reply, stays in the cache
    replies = [stream.close(finish) for stream in streams]
    _decode_figures(metrics, replies, decode_started)
    metrics.notes.append(
        f"{count} alternatives sampled as {count} sequences sharing the prompt's "
        f"{metrics.prompt_tokens} cells (one decode per step for all)"
    )
    return replies


def sample_one_by_one(
    backend: LlamaBackend,
    mirror: KVMirror,
    end: tuple[int | None, str],
    options: GenerationOptions,
    metrics: TurnMetrics,
    started: float,
    back_to_prompt: Callable[[], SyncResult],
    on_token: TokenCallback | None,
    cancel: threading.Event | None,
) -> list[GeneratedReply]:
    """The fallback: the replies one after another, the cache put back to the prompt
    before each (``back_to_prompt``: a snapshot restored on memory that cannot drop part
    of a sequence). The first is sampled last, so the cache ends holding the kept reply."""
    count = options.alternatives
    replies: dict[int, GeneratedReply] = {}
    decode_started = time.perf_counter()
    for run, index in enumerate([*range(1, count), 0]):
        if cancel is not None and cancel.is_set():
            replies[index] = GeneratedReply(FinishReason.CANCELLED)
            continue
        if run > 0:  # the first run starts from the prompt the caller evaluated
            back_to_prompt()
        seeded = GenerationOptions(
            options.max_tokens,
            options.temperature,
            limits.alternative_seed(options.seed, index),
            options.sampling,
        )
        scratch = TurnMetrics()
        replies[index] = generate_reply(
            backend, mirror, end[0], end[1], seeded, scratch, started,
            on_token if index == 0 else None, cancel,
        )  # fmt: skip
        if index == 0:
            metrics.ttft_ms = scratch.ttft_ms
    ordered = [replies[index] for index in range(count)]
    _decode_figures(metrics, ordered, decode_started)
    metrics.notes.append(
        f"{count} alternatives sampled one after another from a snapshot of the prompt: "
        "the model's memory cannot share the prompt's cells between sequences"
    )
    return ordered


def _decode_figures(
    metrics: TurnMetrics, replies: list[GeneratedReply], decode_started: float
) -> None:
    """Decode figures over all the replies: tokens of every reply, the wall time of all."""
    tokens = sum(len(reply.tokens) for reply in replies)
    metrics.decode_tokens = tokens
    metrics.decode_ms = (time.perf_counter() - decode_started) * 1000
    if metrics.decode_ms > 0 and tokens > 1:
        metrics.decode_tokens_per_s = (tokens - 1) / (metrics.decode_ms / 1000)


def prefill(
    mirror: KVMirror,
    prompt: list[int],
    options: GenerationOptions,
    cancel: threading.Event | None,
    progress: ProgressCallback | None,
) -> SyncResult:
    """Evaluate the prompt. For alternatives on memory that cannot share cells, in two
    steps with a snapshot before its last token: what each further reply starts from."""
    if options.alternatives == 1 or shares_cells(mirror.backend, mirror) or len(prompt) < 2:
        return mirror.sync(prompt, need_logits=True, cancel=cancel, progress=progress)
    head = mirror.sync(prompt[:-1], need_logits=False, cancel=cancel, progress=progress)
    if not head.completed:
        return head
    mirror.checkpoint()
    last = mirror.sync(prompt, need_logits=True, cancel=cancel)
    return SyncResult(
        head.reused,
        head.evaluated + last.evaluated,
        last.completed,
        head.ms + last.ms,
        head.fallback or last.fallback,
    )


def generate_replies(
    backend: LlamaBackend,
    mirror: KVMirror,
    end: tuple[int | None, str],
    options: GenerationOptions,
    metrics: TurnMetrics,
    started: float,
    prompt: list[int],
    on_token: TokenCallback | None,
    cancel: threading.Event | None,
) -> list[GeneratedReply]:
    """``options.alternatives`` replies to the prompt the cache holds (the first is kept)."""
    if options.alternatives == 1:
        return [
            generate_reply(
                backend, mirror, end[0], end[1], options, metrics, started, on_token, cancel
            )
        ]
    metrics.alternatives = options.alternatives
    if options.temperature <= 0:
        metrics.notes.append(GREEDY_NOTE)
    if shares_cells(backend, mirror):
        return sample_together(
            backend, mirror, end, options, metrics, started, on_token, cancel
        )

    def back_to_prompt() -> SyncResult:
        return mirror.sync(prompt, need_logits=True)

    return sample_one_by_one(
        backend, mirror, end, options, metrics, started, back_to_prompt, on_token, cancel
    )


def kept_replies(
    replies: list[GeneratedReply],
    metrics: TurnMetrics,
    wrap: Callable[[list[int]], tuple[int, ...]],
) -> tuple[GeneratedReply, tuple[int, ...] | None, list[tuple[str, tuple[int, ...] | None]]]:
    """The reply to store with its token ids, and the other versions to store with it
    (text, token ids): ids are tokens ``wrap``-ped in the assistant's markup. Stopped
    alternatives store nothing: the chat keeps the reply it had (a regenerate's old one)."""
    first, others = replies[0], replies[1:]
    if others and first.finish == FinishReason.CANCELLED:
        metrics.notes.append(
            f"stopped: the {len(replies)} partial alternatives are not stored; "
            "the chat keeps the reply it had"
        )
        return GeneratedReply(FinishReason.CANCELLED), None, []
    stored = [(reply.text, wrap(reply.tokens) if reply.tokens else None) for reply in replies]
    return first, stored[0][1], stored[1:]
