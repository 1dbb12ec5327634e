"""Benchmark of caching strategies: one scripted chat replayed seven ways in one run.

Why: the product claims that the history-first layout with commit and idle-time
warm-up makes instruction edits cheap, and that saved states make reopening a
long chat instant. This module measures both claims against what a stateless
client does (``naive``) and what llama.cpp's server, Ollama and LM Studio do
(``system-first-prefix``: system-first layout + longest-common-prefix reuse).

Strategies (each has its own :class:`ChatSession`, hence its own KV cache, and its own
chat in one temporary SQLite database, so interleaving never switches chats and
no state save/load lands in another strategy's TTFT):

``naive``
    system-first layout; the cache is cleared before every turn, so the whole
    prompt is prefilled every turn.
``system-first-prefix``
    system-first layout with prefix reuse; an edit near the start of the block
    invalidates everything after it.
``history-first``
    history-first layout; after the reply ``commit`` (not timed) leaves the
    history in the cache; the block is prefilled on the critical path.
``history-first-warm``
    as above plus ``warm_up`` after the commit and after each instruction edit
    (idle time, not timed): the critical path holds only the new message.
``reopen``
    as ``history-first-warm``, but before every turn the chat's state is saved to
    SQLite and dropped from memory (``forget_chat``), as when the app is closed; then,
    as the app does when the chat is selected, ``prefetch`` restores it from SQLite
    before the message is sent. The restore's time is reported apart (load ms), not
    inside TTFT. Its reference is ``naive`` at the same turn: the same history
    prefilled from scratch.
``history-first-live``
    as ``history-first-warm``, and the message is revealed word by word before it is
    sent, with one correction per turn (a word deleted and retyped); after each word the
    live prefill (``prefill_draft``) settles, as it does at human typing speed. TTFT is
    measured from send; the tokens evaluated while typing and those the correction threw
    away are reported per turn.
``limit``
    history-first with commit and warm-up and a block that is never edited: only the new
    message is prefilled, on a warm cache at the same depth. The floor of any client
    that starts its work at send.

The conversation is deterministic text generated here (no data files): a history
of about ``history_tokens`` tokens is stored directly as messages in every
strategy's chat and prefilled once, untimed; then ``turns`` measured turns follow,
each with a new user message of about ``message_tokens`` tokens, greedy decoding
and ``max_tokens`` reply tokens. Every ``edit_every`` turns (0: never) the
instruction block is edited near its start, as a real edit would. Turns are
interleaved across strategies, in an order rotated every turn, so machine drift
hits all of them alike. TTFT is the engine's own ``TurnMetrics.ttft_ms`` (from
the start of ``send`` to the first sampled token) for every strategy.

With ``server_url`` every strategy plays on an OpenAI-compatible server instead
(:class:`RemoteChatSession`, one chat and slot each; the local model only sizes the
script): ``naive`` erases its slot before each turn, ``reopen`` restores its slot file on
the server, and the figures are the server's own.

API (Qt-free; the GUI calls it from a worker thread)::

    config = BenchConfig(history_tokens=3000, instruction_tokens=400, turns=8)
    report = run_benchmark(config, on_turn=print, on_status=print, cancel=event)
    report.summaries["history-first-warm"].median_ttft_ms
    report.ratios["vs_naive"]["history-first-warm"]   # > 1: that many times faster
    report.to_json(); report.format_table()

``on_turn(TurnSample)`` fires after each measured turn of each strategy (its
background steps included); ``on_status(str)`` reports set-up progress; setting
``cancel`` stops at the next step and returns a partial report with
``cancelled=True``. ``python -m app bench`` is the command-line front end (``app.bench.cli``);
``--plot`` uses ``app.bench.plot``, which is the only part that imports Qt.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from app.bench.config import (
    HISTORY_FIRST,
    HISTORY_FIRST_LIVE,
    HISTORY_FIRST_WARM,
    LAYOUT_OF,
    LIMIT,
    NAIVE,
    REOPEN,
    BenchConfig,
    TurnSample,
)
from app.bench.report import BenchReport, build_report
from app.bench.script import Script, block_text
from app.domain import FinishReason, Layout, Role, Step
from app.remote.session import RemoteChatSession
from app.session.engine import ChatEngine, GenerationOptions
from app.storage.store import Store

if TYPE_CHECKING:  # llama.cpp is loaded only on the thread that runs the benchmark
    from app.core.prompt import PromptBuilder
    from app.session.chat_session import ChatSession

Session = ChatEngine


class _Runner:
    """One strategy: its session, its chat and the idle-time steps it runs around each turn."""

    def __init__(self, name: str, session: Session, chat_id: int) -> None:
        self.name = name
        self.session = session
        self.chat_id = chat_id
        self.naive = name == NAIVE
        self.commits = name in (
            HISTORY_FIRST, HISTORY_FIRST_WARM, REOPEN, HISTORY_FIRST_LIVE, LIMIT
        )
        self.warm = name in (HISTORY_FIRST_WARM, REOPEN, HISTORY_FIRST_LIVE, LIMIT)
        self.reopen = name == REOPEN
        self.live = name == HISTORY_FIRST_LIVE
        self.never_edits = name == LIMIT  # the floor: nothing but the message at send
        steps = []
        if self.commits:
            steps.append(Step.COMMIT)
        if self.warm:
            steps.append(Step.WARM_UP)
        if not self.naive:
            steps.append(Step.SAVE)
        self.idle_steps = tuple(steps)

    def play(
        self,
        turn: int,
        edit: bool,
        block: str,
        message: str,
        options: GenerationOptions,
        cancel: threading.Event | None,
    ) -> TurnSample | None:
        """Run one turn; None if cancelled. Only the reply is on the measured path."""
        session, chat = self.session, self.chat_id
        background_tokens = 0
        background_ms = 0.0
        edit = edit and not self.never_edits
        if edit:
            session.store.add_instruction_version(chat, block)
            if self.warm:  # idle time while the user types the next message
                step = session.upkeep(chat, (Step.WARM_UP,)).advance(cancel)
                if step is not None:
                    background_tokens += step.tokens
                    background_ms += step.ms
        load_ms: float | None = None
        if self.reopen:
            session.save_if_changed()
            session.forget_chat(chat)  # the app was closed
            load_ms = session.prefetch(chat).ms  # selecting the chat restores it
        if self.naive:
            session.drop_cache()
        typed = self.type_message(message, cancel) if self.live else (0, 0)
        if cancel is not None and cancel.is_set():
            return None
        pipeline = session.start_turn(chat, message, options, idle_steps=self.idle_steps)
        result = pipeline.respond(cancel=cancel)
        metrics = result.metrics
        if metrics.finish_reason == FinishReason.CANCELLED:
            return None
        while (step := pipeline.advance(cancel)) is not None:
            if step.step in (Step.COMMIT, Step.WARM_UP):
                background_tokens += step.tokens
                background_ms += step.ms
        if cancel is not None and cancel.is_set():
            return None
        saved = Step.SAVE in self.idle_steps
        return TurnSample(
            strategy=self.name,
            turn=turn,
            edit=edit,
            ttft_ms=metrics.ttft_ms,
            prefill_tokens=metrics.prefill_tokens,
            reused_tokens=metrics.reused_tokens,
            prompt_tokens=metrics.prompt_tokens,
            prefill_ms=metrics.prefill_ms,
            decode_tokens=metrics.decode_tokens,
            background_tokens=background_tokens,
            background_ms=background_ms,
            state_bytes=metrics.state_bytes if saved else 0,
            state_save_ms=metrics.state_save_ms if saved else None,
            state_load_ms=load_ms if self.reopen else metrics.state_load_ms,
            reply=result.reply,
            typed_tokens=typed[0],
            discarded_tokens=typed[1],
        )

    def type_message(self, message: str, cancel: threading.Event | None) -> tuple[int, int]:
        """Reveal the message word by word, with one word deleted and retyped halfway;
        the live prefill settles after each word. Returns (evaluated, discarded) tokens."""
        words = message.split(" ")
        fix = len(words) // 2
        drafts = [" ".join(words[:count]) for count in range(1, len(words) + 1)]
        drafts[fix + 1 : fix + 1] = [" ".join(words[:fix]), drafts[fix]]  # the correction
        evaluated = discarded = 0
        for draft in drafts:
            done = self.session.prefill_draft(self.chat_id, draft, cancel=cancel)
            evaluated += done.evaluated
            discarded += done.discarded
        return evaluated, discarded


def _reply_target(remaining: int, message_tokens: int) -> int:
    return max(8, min(3 * message_tokens, remaining))


def run_benchmark(
    config: BenchConfig,
    *,
    on_turn: Callable[[TurnSample], None] | None = None,
    on_status: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
) -> BenchReport:
    """Build the script, prefill every strategy's history (untimed), then run the turns."""
    config.validate()
    started = time.perf_counter()
    status = on_status or (lambda _text: None)
    with tempfile.TemporaryDirectory(prefix="kvchat-bench-") as folder:
        db_path = Path(config.db_path) if config.db_path else Path(folder) / "bench.db"
        if db_path.exists():
            raise ValueError(f"the benchmark needs a new database; {db_path} exists")
        store = Store(db_path)
        sessions: list[Session] = []
        try:
            return _run(config, store, sessions, started, status, on_turn, cancel)
        finally:
            for session in sessions:
                session.close()
            store.close()


@dataclass
class _Script:
    """The scripted chat in the benchmark model's tokens: rules, history, messages, sizes."""

    rules: str
    history: list[tuple[str, str]]
    messages: list[str]
    history_size: int
    block_size: int
    message_size: int


def _open_sessions(
    config: BenchConfig, store: Store, sessions: list[Session], status: Callable[[str], None]
) -> tuple[ChatSession, list[Session]]:
    """One engine per strategy (its own KV cache); with a server, the local model only
    sizes the script. Returns the sizer and the engines that play."""
    # llama.cpp is loaded here, on the thread that runs the benchmark.
    from app.session.chat_session import ChatSession

    status("loading the model")
    sizer: ChatSession | None = None
    for _ in config.strategies:
        local = ChatSession(store, config.model_path, n_ctx=config.n_ctx,
                            kv_type=config.kv_type, n_threads=config.n_threads)
        sizer = sizer or local
        sessions.append(local)
        if config.server_url:
            break  # the local model only sizes the script; the server plays it
    assert sizer is not None  # validate() refuses an empty strategy list
    if not config.server_url:
        return sizer, list(sessions)
    status(f"connecting to {config.server_url}")
    servers: list[Session] = []
    for name in config.strategies:
        server = RemoteChatSession(store, config.server_url, config.server_model)
        server.live_prefill = name == HISTORY_FIRST_LIVE  # off by default for servers
        servers.append(server)
        sessions.append(server)
    slots = server.info.total_slots
    if slots < len(config.strategies):
        status(f"the server has {slots} slot(s) for {len(config.strategies)} strategies: "
               "they evict each other (start it with --parallel 5)")
    return sizer, servers


def _write_script(config: BenchConfig, builder: PromptBuilder, first: Session) -> _Script:
    """Rules, a history of whole turns, then one message per measured turn; refused
    when it cannot fit the context."""
    script = Script(builder.content_tokens, config.seed)
    rules = script.rules(config.instruction_tokens)
    history: list[tuple[str, str]] = []
    history_size = 0
    while history_size < config.history_tokens:
        user = script.user_message(config.message_tokens)
        history_size += len(builder.user_segment(user))
        remaining = config.history_tokens - history_size
        reply = script.reply(_reply_target(remaining, config.message_tokens))
        history_size += len(builder.assistant_segment_from_text(reply))
        history.append((user, reply))
    messages = [script.user_message(config.message_tokens) for _ in range(config.turns)]
    later = builder.later_block(block_text(rules, 0))
    block_size = len(later.tokens) if later is not None else 0
    message_size = max(len(builder.user_segment(m)) for m in messages)
    needed = (
        len(builder.opening(Layout.HISTORY_FIRST, "").tokens) + history_size + block_size + 16
        + config.turns * (message_size + config.max_tokens + 16)
    )
    if first.n_ctx and needed > first.n_ctx:  # a server may not say its context size
        raise ValueError(
            f"the scripted chat needs about {needed} tokens but the context holds {first.n_ctx}; "
            "lower --history-tokens/--turns or raise --n-ctx"
        )
    return _Script(rules, history, messages, history_size, block_size, message_size)


def _make_runners(
    config: BenchConfig, store: Store, sizer: ChatSession, players: list[Session], script: _Script
) -> dict[str, _Runner]:
    """Each strategy's chat, holding the scripted history and the first block."""
    runners: dict[str, _Runner] = {}
    for name, session in zip(config.strategies, players, strict=True):
        chat = store.create_chat(f"bench {name}", LAYOUT_OF[name])
        store.add_instruction_version(chat.id, block_text(script.rules, 0))
        for user, reply in script.history:
            store.add_message(chat.id, Role.USER, user)
            store.add_message(chat.id, Role.ASSISTANT, reply)
        sizer.history_plan(chat.id)  # tokenizes the stored messages, untimed
        runners[name] = _Runner(name, session, chat.id)
    return runners


def _prefill_histories(
    store: Store,
    runners: dict[str, _Runner],
    status: Callable[[str], None],
    cancel: threading.Event | None,
) -> bool:
    """Untimed prefill of each history (as the chats would hold after a long session);
    the history-first chats hold the same tokens: one is prefilled, its saved state
    copied. False if cancelled."""
    donor: _Runner | None = None
    for name, runner in runners.items():
        if cancel is not None and cancel.is_set():
            return False
        if runner.naive:
            continue
        session = runner.session
        if runner.commits and donor is not None and session.shares_saved_pages:
            store.kv.copy_state(donor.chat_id, runner.chat_id)  # shares its pages
            session.activate(runner.chat_id)
        status(f"prefilling the history of {name} (untimed)")
        session.prefill_history(runner.chat_id, with_block=False, cancel=cancel)
        if runner.commits and donor is None and session.shares_saved_pages:
            session.save_state(runner.chat_id)
            donor = runner
        if runner.warm:
            session.prefill_history(runner.chat_id, with_block=True, cancel=cancel)
        session.save_if_changed()
    return True


def _play_turns(
    config: BenchConfig,
    runners: dict[str, _Runner],
    script: _Script,
    status: Callable[[str], None],
    on_turn: Callable[[TurnSample], None] | None,
    cancel: threading.Event | None,
) -> tuple[list[TurnSample], bool]:
    """The measured turns, interleaved across strategies in an order rotated every turn;
    returns the samples and whether the run was cancelled."""
    options = GenerationOptions(max_tokens=config.max_tokens, temperature=0.0, seed=config.seed)
    samples: list[TurnSample] = []
    order = list(runners.values())
    for turn in range(config.turns):
        edit = config.is_edit_turn(turn)
        text = block_text(script.rules, turn + 1) if edit else ""
        shift = turn % len(order)
        for runner in order[shift:] + order[:shift]:
            if cancel is not None and cancel.is_set():
                return samples, True
            status(f"turn {turn + 1}/{config.turns}: {runner.name}")
            sample = runner.play(turn, edit, text, script.messages[turn], options, cancel)
            if sample is None:
                return samples, True
            samples.append(sample)
            if on_turn is not None:
                on_turn(sample)
    return samples, False


def _run(
    config: BenchConfig,
    store: Store,
    sessions: list[Session],
    started: float,
    status: Callable[[str], None],
    on_turn: Callable[[TurnSample], None] | None,
    cancel: threading.Event | None,
) -> BenchReport:
    sizer, players = _open_sessions(config, store, sessions, status)
    first = players[0]
    script = _write_script(config, sizer.builder, first)
    runners = _make_runners(config, store, sizer, players, script)
    sizes = (script.history_size, script.block_size, script.message_size)
    if not _prefill_histories(store, runners, status, cancel):
        return _report(config, first, *sizes, [], started, time.perf_counter() - started,
                       cancelled=True)
    setup_s = time.perf_counter() - started
    samples, cancelled = _play_turns(config, runners, script, status, on_turn, cancel)
    return _report(config, first, *sizes, samples, started, setup_s, cancelled=cancelled)


def _report(
    config: BenchConfig,
    session: Session,
    history_size: int,
    block_size: int,
    message_size: int,
    samples: list[TurnSample],
    started: float,
    setup_s: float,
    *,
    cancelled: bool,
) -> BenchReport:
    about = session.describe()
    local = about.kind == "local"
    model = {
        "file": Path(about.path).name if local else about.name.rsplit("/", 1)[-1],
        "description": about.description if local else f"{about.kind} at {about.path}",
        "n_ctx": about.n_ctx,
        "kv_type": about.kv_type,
        "n_threads": (config.n_threads or os.cpu_count()) if local else "server",
        "llama_cpp": about.backend_version,
    }
    script = {
        "history_tokens": history_size,
        "block_tokens": block_size,
        "max_message_tokens": message_size,
    }
    return build_report(
        config, model, script, samples, setup_s, time.perf_counter() - started, cancelled
    )
