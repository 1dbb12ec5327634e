"""Per-turn measurements: what was reused, what was computed, where the time went."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TurnMetrics:
    """One turn. Token counts are exact; times are wall-clock milliseconds.

    ``prefill_tokens`` is the critical path (evaluated before the first token);
    ``background_tokens`` is commit + warm-up, done after the reply.
    """

    engine: str = "local"  # "server": figures reported by an OpenAI-compatible server
    layout: str = "history-first"
    reused_tokens: int = 0
    #: Of ``reused_tokens``: the message's own tokens, prefilled while it was typed.
    typed_ahead_tokens: int = 0
    prefill_tokens: int = 0
    background_tokens: int = 0
    commit_tokens: int = 0
    warmup_tokens: int = 0
    prompt_tokens: int = 0
    message_tokens: int = 0
    block_tokens: int = 0
    history_tokens: int = 0
    #: Attached documents in the prompt, and what of them this turn evaluated (part of
    #: the prefill: a document is evaluated before the question, timed on its own).
    document_tokens: int = 0
    document_eval_tokens: int = 0
    document_eval_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_tokens: int = 0
    decode_ms: float = 0.0
    decode_tokens_per_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    commit_ms: float = 0.0
    warmup_ms: float = 0.0
    cache_tokens: int = 0
    state_bytes: int = 0
    state_bytes_written: int = 0  # new pages only: what this turn's save cost on disk
    state_save_ms: float | None = None
    state_load_ms: float | None = None
    state_rejected: str | None = None
    trimmed_turns: int = 0
    trimmed_tokens: int = 0
    trim_mode: str = "exact"
    finish_reason: str = ""
    seed: int | None = None  # the sampler's seed; a regenerate at temperature > 0 draws a new one
    sampling: dict[str, float] | None = None  # top-k, top-p, min-p, repeat penalty used
    #: Continue: the reply's content tokens before this turn extended it (0: a new reply).
    continued_from_tokens: int = 0
    #: Replies sampled from the one prompt (decode figures cover all of them).
    alternatives: int = 1
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, float):
                data[key] = round(value, 3)
        return data


#: Phases shown in the profiler-like table, in the order they happen.
PHASES = (
    ("load state", "state_load_ms"),
    ("document eval", "document_eval_ms"),
    ("prefill", "prefill_ms"),
    ("first token", "ttft_ms"),
    ("decode", "decode_ms"),
    ("commit", "commit_ms"),
    ("warm-up", "warmup_ms"),
    ("save state", "state_save_ms"),
)
