"""What a benchmark run is: the strategies, its sizes, and one measured turn (plain data)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.domain import KVType, Layout

NAIVE = "naive"
SYSTEM_FIRST_PREFIX = "system-first-prefix"
HISTORY_FIRST = "history-first"
HISTORY_FIRST_WARM = "history-first-warm"
REOPEN = "reopen"
HISTORY_FIRST_LIVE = "history-first-live"
LIMIT = "limit"
STRATEGIES = (
    NAIVE, SYSTEM_FIRST_PREFIX, HISTORY_FIRST, HISTORY_FIRST_WARM, REOPEN, HISTORY_FIRST_LIVE, LIMIT
)

DESCRIPTIONS = {
    NAIVE: "stateless client: whole prompt prefilled every turn",
    SYSTEM_FIRST_PREFIX: "system-first + longest-common-prefix reuse (llama.cpp server, Ollama)",
    HISTORY_FIRST: "history-first + commit; block prefilled on the critical path",
    HISTORY_FIRST_WARM: "history-first + commit + idle-time warm-up",
    REOPEN: "history-first-warm restored from SQLite before every turn (load is timed)",
    HISTORY_FIRST_LIVE: "history-first-warm + the message prefilled while it is typed",
    LIMIT: "floor of a client that starts at send: only the message, on a warm cache",
}


#: The layout each strategy's chat uses.
LAYOUT_OF = {
    NAIVE: Layout.SYSTEM_FIRST,
    SYSTEM_FIRST_PREFIX: Layout.SYSTEM_FIRST,
    HISTORY_FIRST: Layout.HISTORY_FIRST,
    HISTORY_FIRST_WARM: Layout.HISTORY_FIRST,
    REOPEN: Layout.HISTORY_FIRST,
    HISTORY_FIRST_LIVE: Layout.HISTORY_FIRST,
    LIMIT: Layout.HISTORY_FIRST,
}


@dataclass
class BenchConfig:
    """Sizes are in tokens of the benchmark's model; ``edit_every`` 0 never edits."""

    model_path: str | Path | None = None
    n_ctx: int | None = None
    kv_type: str = KVType.F16
    n_threads: int | None = None
    history_tokens: int = 3000
    instruction_tokens: int = 400
    message_tokens: int = 40
    turns: int = 8
    edit_every: int = 1
    max_tokens: int = 16
    seed: int = 0
    strategies: tuple[str, ...] = STRATEGIES
    db_path: str | Path | None = None  # None: a temporary database, deleted afterwards
    #: Play the strategies on this OpenAI-compatible server instead of the local model
    #: (which still sizes the script in its tokens).
    server_url: str | None = None
    server_model: str | None = None

    def validate(self) -> None:
        unknown = [name for name in self.strategies if name not in STRATEGIES]
        if unknown:
            raise ValueError(f"unknown strategies {unknown}; use some of {', '.join(STRATEGIES)}")
        if not self.strategies:
            raise ValueError("no strategy to run")
        if REOPEN in self.strategies and NAIVE not in self.strategies:
            raise ValueError("reopen is compared with naive (the same history prefilled anew)")
        sizes = ("history_tokens", "instruction_tokens", "message_tokens", "turns", "max_tokens")
        for name in sizes:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be greater than 0")
        if self.edit_every < 0:
            raise ValueError("edit_every must be 0 (never) or more")

    def is_edit_turn(self, turn: int) -> bool:
        return self.edit_every > 0 and turn % self.edit_every == 0


@dataclass
class TurnSample:
    """One measured turn of one strategy. Token counts are exact, times in ms."""

    strategy: str
    turn: int
    edit: bool
    ttft_ms: float
    prefill_tokens: int  # evaluated on the critical path (before the first token)
    reused_tokens: int
    prompt_tokens: int
    prefill_ms: float
    decode_tokens: int
    background_tokens: int  # commit + warm-ups for this turn, off the critical path
    background_ms: float
    state_bytes: int = 0
    state_save_ms: float | None = None
    state_load_ms: float | None = None
    reply: str = ""
    #: history-first-live: tokens evaluated while the message was typed, and those of
    #: them thrown away by the correction (and by BPE merges at the end of the draft).
    typed_tokens: int = 0
    discarded_tokens: int = 0

