"""``bench --alternatives N``: N replies to one prompt against one reply, wall time.

Both start from an empty cache with the same prompt and the same sampling, so the
difference is what N replies cost over one: the prompt is evaluated once either way,
and each decode step of the N replies is one batch holding a token of each.
Runs alternate (one, N, one, N, ...) so a machine whose load changes affects both.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from app.session.engine import GenerationOptions
from app.storage.store import Store

if TYPE_CHECKING:
    from app.session.chat_session import ChatSession

GOAL_RATIO = 1.6
INSTRUCTIONS = "You are a storyteller. Write vivid, long stories with many details."
QUESTION = "Write a long story about a dragon who guards a library."


@dataclass
class AlternativesRun:
    replies: int
    wall_ms: float
    prefill_tokens: int
    reply_tokens: list[int]


@dataclass
class AlternativesReport:
    count: int
    max_tokens: int
    prompt_tokens: int
    one: list[AlternativesRun] = field(default_factory=list)
    many: list[AlternativesRun] = field(default_factory=list)

    @property
    def one_ms(self) -> float:
        return statistics.median(run.wall_ms for run in self.one)

    @property
    def many_ms(self) -> float:
        return statistics.median(run.wall_ms for run in self.many)

    @property
    def ratio(self) -> float:
        return self.many_ms / self.one_ms if self.one_ms else float("inf")

    def as_dict(self) -> dict[str, object]:
        return {
            **asdict(self),
            "one_ms": round(self.one_ms, 1),
            "many_ms": round(self.many_ms, 1),
            "ratio": round(self.ratio, 3),
            "goal_ratio": GOAL_RATIO,
        }

    def format_table(self) -> str:
        def tokens(runs: list[AlternativesRun]) -> str:
            return ", ".join("+".join(str(t) for t in run.reply_tokens) for run in runs)

        return "\n".join(
            [
                f"alternatives: {self.count} replies of up to {self.max_tokens} tokens vs one, "
                f"same {self.prompt_tokens}-token prompt, empty cache each run",
                f"  one reply        median {self.one_ms:8.0f} ms   tokens {tokens(self.one)}",
                f"  {self.count} alternatives   median {self.many_ms:8.0f} ms   "
                f"tokens {tokens(self.many)}",
                f"  ratio {self.ratio:.2f} (goal <= {GOAL_RATIO})",
            ]
        )


def run_alternatives_benchmark(
    model_path: str | None,
    count: int,
    *,
    max_tokens: int = 64,
    repeats: int = 3,
    n_threads: int | None = None,
    on_run: Callable[[AlternativesRun], None] | None = None,
) -> AlternativesReport:
    """Median wall time of ``count`` alternatives and of one reply, ``repeats`` each."""
    from app.session.chat_session import ChatSession  # llama.cpp only when measuring

    with tempfile.TemporaryDirectory() as folder, Store(Path(folder) / "alt.db") as store:
        session = ChatSession(store, model_path, n_ctx=2048, n_threads=n_threads)
        try:
            report = AlternativesReport(count, max_tokens, 0)
            for repeat in range(repeats):
                for replies in (1, count) if repeat % 2 == 0 else (count, 1):
                    run = _one_run(session, store, replies, max_tokens, f"r{repeat}-{replies}")
                    (report.one if replies == 1 else report.many).append(run)
                    report.prompt_tokens = run.prefill_tokens
                    if on_run is not None:
                        on_run(run)
            return report
        finally:
            session.close()


def _one_run(
    session: ChatSession, store: Store, replies: int, max_tokens: int, name: str
) -> AlternativesRun:
    """One turn on a new chat, from an empty cache: the wall time of send()."""
    chat = store.create_chat(name, "history-first")
    store.add_instruction_version(chat.id, INSTRUCTIONS)
    session.drop_cache()
    # Sampled (greedy replies would all be the same), the same seed for both runs.
    options = GenerationOptions(max_tokens, 0.8, 11, alternatives=replies)
    started = time.perf_counter()
    result = session.send(chat.id, QUESTION, options)
    wall_ms = (time.perf_counter() - started) * 1000
    texts = [a.text for a in result.alternatives] or [result.reply]
    return AlternativesRun(
        replies,
        wall_ms,
        result.metrics.prefill_tokens,
        [len(session.backend.tokenize(text, special=False)) for text in texts],
    )
