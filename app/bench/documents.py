"""``bench --documents``: a document computed once serves every chat and every question.

Two measurements on the real model, each in a scratch database:

- Shared document: chat "first" attaches a document of ``document_tokens`` and asks a
  question; the cache is then emptied (only the pages on disk can help) and chat
  "second" attaches the same file and asks another. Figures: the second chat's first
  prefill, and the KV storage of both chats against that of the first alone.
- Independent questions: one chat whose questions each start from the document. The
  document (with the block) is evaluated and saved once; then each question restores that
  state from disk, prefills only the question and samples. The per-step table is the
  prompt-caching demo's: load_state, document eval, question prefill, sampling, save.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.core.documents import read_document
from app.session.chat_session import ChatSession, GenerationOptions
from app.storage.store import Store

GOAL_SECOND_PREFILL = 100  # tokens
GOAL_STORAGE_RATIO = 1.3  # both chats / one chat
GOAL_TTFT_RATIO = 1.2  # 10th question / 1st
GREEDY = GenerationOptions(max_tokens=16, temperature=0.0, seed=0)
_PLACES = (
    "harbor", "library", "museum", "market", "station", "bridge", "school", "park",
    "tower", "garden", "square", "theatre", "bakery", "clinic", "stadium", "ferry pier",
)  # fmt: skip


@dataclass
class QuestionStep:
    """One question's steps, in milliseconds (tokens where a step evaluates some)."""

    question: int
    load_state_ms: float
    document_eval_tokens: int
    document_eval_ms: float
    prefill_tokens: int
    question_prefill_ms: float
    sample_tokens: int
    sample_ms: float
    save_ms: float
    prompt_tokens: int
    ttft_ms: float


@dataclass
class DocumentReport:
    document_tokens: int
    first_prefill_tokens: int
    second_prefill_tokens: int
    second_reused_tokens: int
    second_notes: list[str]
    one_chat_bytes: int
    both_chats_bytes: int
    setup_eval_tokens: int
    setup_eval_ms: float
    setup_save_ms: float
    questions: list[QuestionStep] = field(default_factory=list)

    @property
    def storage_ratio(self) -> float:
        return self.both_chats_bytes / self.one_chat_bytes if self.one_chat_bytes else 0.0

    @property
    def ttft_ratio(self) -> float:
        first, last = self.questions[0].ttft_ms, self.questions[-1].ttft_ms
        return last / first if first else 0.0

    def as_json(self) -> str:
        data: dict[str, Any] = asdict(self)
        data["storage_ratio"] = round(self.storage_ratio, 3)
        data["ttft_ratio"] = round(self.ttft_ratio, 3)
        return json.dumps(data)


def write_document(session: ChatSession, path: Path, tokens: int) -> None:
    """A real text file of about ``tokens`` tokens: one numbered fact per line."""
    lines: list[str] = []
    size = 0
    while size < tokens:
        n = len(lines)
        line = (
            f"Fact {n}: the {_PLACES[n % len(_PLACES)]} opens at {6 + n % 5}:{n * 7 % 60:02d}"
            f" and is run by team {n * 13 % 97}."
        )
        lines.append(line)
        size += session.builder.content_tokens(line + "\n")
    path.write_text("\n".join(lines), encoding="utf-8")


def _attach(store: Store, name: str, path: Path, *, no_history: bool = False) -> int:
    chat = store.create_chat(name)
    document = read_document(path)
    store.attach_document(chat.id, document.name, document.text)
    if no_history:
        store.update_chat(chat.id, no_history=1)
    return chat.id


def _shared(
    folder: Path, model_path: str | Path | None, document_tokens: int, n_threads: int | None
) -> dict[str, Any]:
    """Two chats with the same document: the second's first turn, and both chats' storage."""
    with Store(folder / "shared.db") as store:
        session = ChatSession(
            store, model_path, n_ctx=document_tokens + 1024, n_threads=n_threads
        )
        try:
            path = folder / "report.txt"
            write_document(session, path, document_tokens)
            first = _attach(store, "first", path)
            cold = session.send(first, "When does the harbor open?", GREEDY)
            session.after_reply(first)
            one_chat = store.kv.total_bytes()
            session.forget_chat(first)  # only the pages on disk can help the second chat
            second = _attach(store, "second", path)
            warm = session.send(second, "Which team runs the library?", GREEDY)
            session.after_reply(second)
            return {
                "document_tokens": cold.metrics.document_tokens,
                "first_prefill_tokens": cold.metrics.prefill_tokens,
                "second_prefill_tokens": warm.metrics.prefill_tokens,
                "second_reused_tokens": warm.metrics.reused_tokens,
                "second_notes": list(warm.metrics.notes),
                "one_chat_bytes": one_chat,
                "both_chats_bytes": store.kv.total_bytes(),
            }
        finally:
            session.close()


def _questions(
    folder: Path,
    model_path: str | Path | None,
    document_tokens: int,
    questions: int,
    n_threads: int | None,
    on_step: Callable[[QuestionStep], None] | None,
) -> tuple[dict[str, Any], list[QuestionStep]]:
    """Evaluate and save the document once, then answer each question from that state."""
    steps: list[QuestionStep] = []
    with Store(folder / "questions.db") as store:
        session = ChatSession(
            store, model_path, n_ctx=document_tokens + 1024, n_threads=n_threads
        )
        try:
            path = folder / "report.txt"
            chat_id = _attach(store, "questions", path, no_history=True)
            store.add_instruction_version(chat_id, "Answer in one short sentence.")
            started = time.perf_counter()
            session.activate(chat_id)
            session.prefill_history(chat_id, with_block=True)
            setup = {
                "setup_eval_tokens": session.cache_size,
                "setup_eval_ms": (time.perf_counter() - started) * 1000,
                "setup_save_ms": session.save_state(chat_id).ms,
            }
            for number in range(questions):
                session.forget_chat(chat_id)  # each question starts from the saved state
                place = _PLACES[number % len(_PLACES)]
                turn = session.start_turn(chat_id, f"When does the {place} open?", GREEDY)
                result = turn.respond()
                turn.run()
                m = turn.metrics or result.metrics
                step = QuestionStep(
                    question=number + 1,
                    load_state_ms=m.state_load_ms or 0.0,
                    document_eval_tokens=m.document_eval_tokens,
                    document_eval_ms=m.document_eval_ms,
                    prefill_tokens=m.prefill_tokens,
                    question_prefill_ms=m.prefill_ms - m.document_eval_ms,
                    sample_tokens=m.decode_tokens,
                    sample_ms=m.decode_ms,
                    save_ms=m.state_save_ms or 0.0,
                    prompt_tokens=m.prompt_tokens,
                    ttft_ms=m.ttft_ms,
                )
                steps.append(step)
                if on_step is not None:
                    on_step(step)
        finally:
            session.close()
    return setup, steps


def run_document_benchmark(
    model_path: str | Path | None,
    document_tokens: int = 1500,
    questions: int = 10,
    *,
    n_threads: int | None = None,
    on_step: Callable[[QuestionStep], None] | None = None,
) -> DocumentReport:
    with tempfile.TemporaryDirectory(prefix="kvchat-documents-") as name:
        folder = Path(name)
        shared = _shared(folder, model_path, document_tokens, n_threads)
        setup, steps = _questions(
            folder, model_path, document_tokens, questions, n_threads, on_step
        )
    return DocumentReport(**shared, **setup, questions=steps)


def format_documents(report: DocumentReport) -> str:
    """The figures against their goals, then the per-question step table."""
    verdict = {True: "ok", False: "MISSED"}
    prompts = [q.prompt_tokens for q in report.questions]
    lines = [
        f"document: {report.document_tokens} tokens",
        f"second chat, first turn: prefilled {report.second_prefill_tokens} tokens (reused "
        f"{report.second_reused_tokens}; the first chat prefilled {report.first_prefill_tokens})"
        f"  goal <= {GOAL_SECOND_PREFILL}: "
        f"{verdict[report.second_prefill_tokens <= GOAL_SECOND_PREFILL]}",
        f"storage: both chats {report.both_chats_bytes / 1024**2:.1f} MB / one chat "
        f"{report.one_chat_bytes / 1024**2:.1f} MB = {report.storage_ratio:.2f}x"
        f"  goal <= {GOAL_STORAGE_RATIO}x: {verdict[report.storage_ratio <= GOAL_STORAGE_RATIO]}",
        f"independent questions: prompt {min(prompts)}-{max(prompts)} tokens over "
        f"{len(prompts)} questions; TTFT question {len(prompts)} / question 1 = "
        f"{report.ttft_ratio:.2f}x  goal <= {GOAL_TTFT_RATIO}x: "
        f"{verdict[report.ttft_ratio <= GOAL_TTFT_RATIO]}",
        "",
        f"setup: eval document + block {report.setup_eval_tokens} tokens in "
        f"{report.setup_eval_ms:.0f} ms; save_state {report.setup_save_ms:.0f} ms",
        f"{'q':>3} {'load_state':>10} {'doc eval':>12} {'q prefill':>12} {'sampling':>12}"
        f" {'save':>7} {'prompt':>7} {'TTFT':>7}",
    ]
    for q in report.questions:
        lines.append(
            f"{q.question:>3} {q.load_state_ms:>8.0f}ms"
            f" {q.document_eval_tokens:>4}t {q.document_eval_ms:>5.0f}ms"
            f" {q.prefill_tokens - q.document_eval_tokens:>4}t {q.question_prefill_ms:>5.0f}ms"
            f" {q.sample_tokens:>4}t {q.sample_ms:>5.0f}ms"
            f" {q.save_ms:>5.0f}ms {q.prompt_tokens:>7} {q.ttft_ms:>5.0f}ms"
        )
    return "\n".join(lines)
