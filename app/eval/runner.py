"""Plays the eval's scripted chats on the real engine, one chat per case and layout.

Layouts (each a real :class:`ChatSession` chat in a temporary SQLite database):

``system-first``
    the block at the top of the prompt, as most chat apps do.
``history-first``
    the product's default: the block after the history; after each reply the commit
    leaves the history in the cache without the block, then warm-up puts it back on top.
``history-first-no-commit``
    what the commit step avoids: each turn's block stays in front of the message it was
    answered with, so the replies are cached with the block before them and the next
    turn's prompt is the history with every earlier block occurrence left in place. The
    engine builds history from each message's stored token ids, so the user message is
    stored with the block's tokens in front of it, and no commit runs: the next turn
    reuses the reply's cells as generated.

Replies are greedy (temperature 0). Every turn is scored; the last turn is the headline,
since history-first's claim is about long chats. A recall probe per layout states a fact
in the first user message and asks for it in the last.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from app.core.models import check_gguf_file
from app.domain import FinishReason, Layout, Step, TemplateChoice
from app.eval import checks
from app.eval.cases import Case, RecallProbe, load_cases, load_recall_probes, max_turns
from app.eval.cases import stratified_sample as sample_cases
from app.eval.report import CaseResult, EvalReport
from app.session.engine import GenerationOptions
from app.storage.store import Store

if TYPE_CHECKING:
    from app.core.llama_backend import LlamaBackend
    from app.session.chat_session import ChatSession

SYSTEM_FIRST = "system-first"
HISTORY_FIRST = "history-first"
NO_COMMIT = "history-first-no-commit"
LAYOUTS = (SYSTEM_FIRST, HISTORY_FIRST, NO_COMMIT)
#: The product layout each eval layout runs as, and the idle-time steps after each reply.
CHAT_LAYOUT = {
    SYSTEM_FIRST: Layout.SYSTEM_FIRST,
    HISTORY_FIRST: Layout.HISTORY_FIRST,
    NO_COMMIT: Layout.HISTORY_FIRST,
}
IDLE_STEPS: dict[str, tuple[Step, ...]] = {
    SYSTEM_FIRST: (),
    HISTORY_FIRST: (Step.COMMIT, Step.WARM_UP),
    NO_COMMIT: (),
}
DEFAULT_MAX_TOKENS = 64


def default_threads() -> int:
    """All cores but one, as the app's chat worker: llama.cpp's threads spin while they
    wait for each other, and one busy core less made decoding 15x faster on a loaded
    2-core machine (50 vs 3 tokens/s for SmolLM2-135M)."""
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass(frozen=True)
class EvalConfig:
    model_path: str | Path | None = None
    n_ctx: int | None = None
    kv_type: str = "f16"
    n_threads: int | None = None
    layouts: tuple[str, ...] = LAYOUTS
    cases: int | None = None  # None: every shipped case
    turns: int = 3
    seed: int = 0
    max_tokens: int = DEFAULT_MAX_TOKENS
    probes: int | None = None  # recall probes to play; None: all, 0: none

    def validate(self, cases: Sequence[Case]) -> None:
        unknown = [name for name in self.layouts if name not in LAYOUTS]
        if unknown or not self.layouts:
            raise ValueError(f"layouts are a subset of {', '.join(LAYOUTS)}")
        if not 1 <= self.turns <= max_turns(list(cases)):
            raise ValueError(f"turns must be between 1 and {max_turns(list(cases))}")
        if self.cases is not None and self.cases < 1:
            raise ValueError("cases must be at least 1")
        if self.probes is not None and self.probes < 0:
            raise ValueError("probes cannot be negative")
        GenerationOptions(max_tokens=self.max_tokens, temperature=0.0, seed=self.seed)


@dataclass(frozen=True)
class Progress:
    """One scored reply, with how far the run is (for an ETA)."""

    result: CaseResult
    done: int  # replies generated so far
    total: int


class Cancelled(Exception):
    pass


class _Player:
    """Plays chats on one session; counts replies for progress."""

    def __init__(
        self,
        session: ChatSession,
        config: EvalConfig,
        total: int,
        on_result: Callable[[Progress], None] | None,
        cancel: threading.Event | None,
    ) -> None:
        self.session = session
        self.options = GenerationOptions(
            max_tokens=config.max_tokens, temperature=0.0, seed=config.seed
        )
        self.total = total
        self.done = 0
        self.on_result = on_result
        self.cancel = cancel

    def chat(
        self,
        name: str,
        layout: str,
        block: str,
        messages: Sequence[str],
        score: Callable[[int, str, str], CaseResult | None],
    ) -> list[CaseResult]:
        """Play ``messages`` in a new chat; ``score(turn, reply, finish)`` judges each reply."""
        session, store = self.session, self.session.store
        chat = store.create_chat(name, CHAT_LAYOUT[layout])
        store.add_instruction_version(chat.id, block)
        later_block = session.builder.later_block(block)
        results: list[CaseResult] = []
        try:
            for number, text in enumerate(messages, start=1):
                if self.cancel is not None and self.cancel.is_set():
                    raise Cancelled
                turn = session.start_turn(
                    chat.id, text, self.options, idle_steps=IDLE_STEPS[layout]
                )
                result = turn.respond(cancel=self.cancel)
                if result.metrics.finish_reason == FinishReason.CANCELLED:
                    raise Cancelled
                while turn.advance(self.cancel) is not None:
                    pass
                if layout == NO_COMMIT and later_block is not None:
                    user = store.message(result.user_message_id)
                    kept = [*later_block.tokens, *user.token_ids]
                    store.set_message_tokens(user.id, kept, session.token_format)
                self.done += 1
                scored = score(number, result.reply, str(result.metrics.finish_reason))
                if scored is not None:
                    results.append(scored)
                    if self.on_result is not None:
                        self.on_result(Progress(scored, self.done, self.total))
        finally:
            session.forget_chat(chat.id)  # the next chat starts empty; nothing is saved
        return results


def _play_case(player: _Player, case: Case, layout: str, turns: int) -> list[CaseResult]:
    def score(number: int, reply: str, finish: str) -> CaseResult:
        return CaseResult(
            layout=layout,
            case=case.id,
            instruction_ids=case.instruction_ids,
            kwargs=case.kwargs,
            turn=number,
            reply=reply,
            followed=checks.follows(case.instruction_ids, case.kwargs, reply),
            finish=finish,
        )

    name = f"{case.id} {layout}"
    return player.chat(name, layout, case.instructions, case.turns[:turns], score)


def _play_probe(player: _Player, probe: RecallProbe, layout: str) -> list[CaseResult]:
    last = len(probe.turns)

    def score(number: int, reply: str, finish: str) -> CaseResult | None:
        if number < last:
            return None
        return CaseResult(
            layout=layout,
            case=probe.id,
            instruction_ids=(),
            kwargs=(),
            turn=number,
            reply=reply,
            followed=checks.recalls(probe.answer, reply),
            finish=finish,
            probe=True,
        )

    return player.chat(f"{probe.id} {layout}", layout, probe.instructions, probe.turns, score)


def evaluate(
    session: ChatSession,
    config: EvalConfig,
    *,
    on_result: Callable[[Progress], None] | None = None,
    on_status: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
) -> EvalReport:
    """Run the eval on ``session`` (its store should be a scratch database)."""
    started = time.perf_counter()
    every_case = load_cases()
    config.validate(every_case)
    for case in every_case:
        checks.validate(case.instruction_ids, case.kwargs)
    cases = sample_cases(every_case, config.cases, config.seed)
    probes = load_recall_probes()[: config.probes]
    total = len(config.layouts) * (len(cases) * config.turns + sum(len(p.turns) for p in probes))
    info = session.model_info
    report = EvalReport(
        model={
            "file": info.path.name,
            "description": info.description,
            "n_ctx": session.n_ctx,
            "llama_cpp": session.backend_version,
        },
        layouts=tuple(config.layouts),
        turns=config.turns,
        seed=config.seed,
        max_tokens=config.max_tokens,
    )
    player = _Player(session, config, total, on_result, cancel)
    status = on_status or (lambda _text: None)
    try:
        for index, case in enumerate(cases, start=1):
            status(f"case {index}/{len(cases)}: {case.id}")
            for layout in config.layouts:  # interleaved: machine drift hits all alike
                report.results.extend(_play_case(player, case, layout, config.turns))
        for probe in probes:
            status(f"recall probe {probe.id}")
            for layout in config.layouts:
                report.results.extend(_play_probe(player, probe, layout))
    except Cancelled:
        report.cancelled = True
    report.elapsed_s = time.perf_counter() - started
    return report


def run_eval(
    config: EvalConfig,
    *,
    backend: LlamaBackend | None = None,
    template: TemplateChoice | None = None,
    on_result: Callable[[Progress], None] | None = None,
    on_status: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
) -> EvalReport:
    """Run the eval in a scratch database, on ``config.model_path`` or on an open
    ``backend`` (the app's loaded model: borrowed, emptied, never closed here)."""
    config.validate(load_cases())  # before the model loads
    # llama.cpp is loaded here, on the thread that runs the eval.
    from app.session.chat_session import ChatSession

    with tempfile.TemporaryDirectory(prefix="kvchat-eval-") as folder:
        store = Store(Path(folder) / "eval.db")
        session: ChatSession | None = None
        try:
            if backend is None:
                model_path = check_gguf_file(str(config.model_path)) if config.model_path else None
                if on_status is not None:
                    on_status("loading the model")
                session = ChatSession(
                    store,
                    model_path,
                    n_ctx=config.n_ctx,
                    kv_type=config.kv_type,
                    n_threads=config.n_threads or default_threads(),
                )
            else:
                session = ChatSession(store, backend=backend, chat_template=template)
                session.drop_cache()  # the cells belong to the app's chat, not to this session
            return evaluate(
                session, config, on_result=on_result, on_status=on_status, cancel=cancel
            )
        finally:
            if session is not None and backend is None:
                session.close()
            store.close()
