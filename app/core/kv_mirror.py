"""The KV mirror: the exact token ids held in llama.cpp's sequence 0, kept in step with it.

Every cache operation goes through here, so the mirror and llama.cpp's cells can never
disagree: ``sync`` (keep the longest common prefix with a target, evaluate the rest),
``drop_range`` (remove cells and slide the rest down), ``restore`` and ``reset``.
Which chat the cells belong to, and whether they were saved, is the session's
business; this class only knows tokens.

Recurrent and hybrid memory (Mamba, LFM2, Granite 4.0-H, Qwen3-Next) cannot drop a
partial range: llama.cpp refuses the removal. The mirror then goes back to a
``checkpoint`` (a copy of the sequence state taken where the session asked, e.g. at the
committed history) whose tokens begin the target, or, when none does, starts over; the
sync says which in ``SyncResult.fallback``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from app.core.errors import ContextFullError, DecodeAborted, DecodeError
from app.core.llama_backend import ALTERNATIVE_SEQ, LlamaBackend
from app.core.sequences import common_prefix_length
from app.core.state_pages import ParsedState, parse_state
from app.domain import Step

ProgressCallback = Callable[[str, int, int], None]
#: Checkpoints kept in memory: the committed history, and the one before it (regenerate).
MAX_CHECKPOINTS = 2


class NothingToEvaluate(ValueError):
    """A target with no tokens: there is no position to produce logits for."""


@dataclass(frozen=True)
class SyncResult:
    reused: int  # tokens of the target already held (kept as they were)
    evaluated: int  # tokens computed by this call
    completed: bool  # False: cancelled (between two batches or inside llama_decode)
    ms: float
    #: Why fewer tokens were reused than the cache held in common with the target, when
    #: the memory could not drop a partial range (a checkpoint restored, or a recompute).
    fallback: str | None = None


@dataclass(frozen=True)
class Checkpoint:
    """A copy of the sequence state while the cache held exactly ``tokens``."""

    tokens: tuple[int, ...]
    state: bytearray


class KVMirror:
    """Owns sequence 0 of one llama.cpp context and the list of token ids it holds."""

    def __init__(self, backend: LlamaBackend) -> None:
        self.backend = backend
        self._tokens: list[int] = []
        self.changed = False  # cells changed since the last mark_saved()
        self.prefill_tokens_per_s: float | None = None  # smoothed, from large evaluations
        # A restored sliding-window cache holds only the window before its last position:
        # keeping less than this many tokens would leave later tokens a window with holes.
        self._exact_floor = 0
        self.recomputed_for_window = False  # the last sync started over because of that
        # Learned from llama.cpp too: a refused removal turns it off for good.
        self.partial_removal = bool(backend.partial_removal)
        self.checkpoints: list[Checkpoint] = []
        #: Other sequences sharing sequence 0's cells (alternatives): id -> next position.
        self._forks: dict[int, int] = {}

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def matching(self, target: Sequence[int]) -> int:
        """How many leading tokens of ``target`` the cache already holds."""
        return common_prefix_length(self._tokens, target)

    def mark_saved(self) -> None:
        self.changed = False

    def reset(self) -> None:
        """Empty the cache (checkpoints stay: they are valid for any chat with their tokens)."""
        if self._tokens:
            self.changed = True
        self._clear()

    def sync(
        self,
        target: Sequence[int],
        *,
        need_logits: bool,
        cancel: threading.Event | None = None,
        chunk: int | None = None,
        progress: ProgressCallback | None = None,
        step: Step = Step.PREFILL,
    ) -> SyncResult:
        """Make the cache equal ``target``: keep the common prefix, evaluate the rest.

        With ``need_logits`` the last token is evaluated even when already held, so
        the next token can be sampled. Cancelling stops between two batches and
        leaves the cache holding a prefix of the target.
        """
        reused = self.matching(target)
        if need_logits and reused == len(target):
            reused -= 1
        if reused < 0:
            raise NothingToEvaluate("nothing to evaluate: the prompt is empty")
        self.recomputed_for_window = 0 < reused < self._exact_floor
        if self.recomputed_for_window:
            reused = 0  # exact results need the whole window: start over
        if reused < self._exact_floor:
            self._exact_floor = 0
        fallback = None
        if reused < len(self._tokens):
            fallback = self._truncate(reused, target)
            reused = len(self._tokens)
        size = min(chunk or self.backend.n_batch, self.backend.n_batch)
        position = reused
        started = time.perf_counter()
        while position < len(target):
            if cancel is not None and cancel.is_set():
                break
            run = list(target[position : position + size])
            last = position + len(run) == len(target)
            try:
                self.backend.decode(
                    run, position, logits_for_last=need_logits and last, cancel=cancel
                )
            except DecodeAborted:
                position = self._after_abort(target, position, len(run))
                break
            except DecodeError:
                self._resync_after_error()
                raise
            self._tokens.extend(run)
            self.changed = True
            position += len(run)
            if progress is not None:
                progress(step, position - reused, len(target) - reused)
        evaluated = max(0, position - reused)
        elapsed = time.perf_counter() - started
        if evaluated >= 32 and elapsed > 0:
            rate = evaluated / elapsed
            previous = self.prefill_tokens_per_s
            self.prefill_tokens_per_s = rate if previous is None else 0.5 * previous + 0.5 * rate
        completed = position == len(target) and len(self._tokens) == len(target)
        held = min(reused, len(self._tokens))
        return SyncResult(held, evaluated, completed, elapsed * 1000, fallback)

    def _truncate(self, keep: int, target: Sequence[int]) -> str | None:
        """Make the cache hold its first ``keep`` tokens, or fewer when it cannot.

        None when exactly ``keep`` are held; otherwise the fallback taken, in words.
        """
        self.changed = True
        if keep == 0:
            self._clear()
            return None
        if self.partial_removal:
            if self.backend.try_remove_cells(keep, -1):
                del self._tokens[keep:]
                return None
            self.partial_removal = False  # llama.cpp refused: the memory is recurrent
        held = len(self._tokens)
        why = (
            f"the model's memory cannot drop part of the sequence (positions {keep}-{held - 1})"
        )
        restored = self._restore_checkpoint(target, keep)
        if restored:
            return f"{why}: restored the snapshot of {restored} tokens"
        self._clear()
        return f"{why} and no snapshot fits: recomputed from the start"

    def _clear(self) -> None:
        self.backend.clear()
        self._forks.clear()
        self._tokens = []
        self._exact_floor = 0

    def _restore_checkpoint(self, target: Sequence[int], limit: int) -> int:
        """Load the longest checkpoint that begins ``target`` within ``limit`` tokens."""
        fitting = [
            c
            for c in self.checkpoints
            if 0 < len(c.tokens) <= limit and tuple(target[: len(c.tokens)]) == c.tokens
        ]
        for checkpoint in sorted(fitting, key=lambda c: len(c.tokens), reverse=True):
            loaded = self.backend.set_state(checkpoint.state)
            if loaded and self.backend.last_position() + 1 == len(checkpoint.tokens):
                self._tokens = list(checkpoint.tokens)
                self._exact_floor = 0
                return len(self._tokens)
            self.checkpoints.remove(checkpoint)  # llama.cpp rejected it: never again
        self._clear()
        return 0

    def checkpoint(self) -> int:
        """Keep a copy of the sequence state now, if the memory needs one to go back to.

        Only where a partial range cannot be dropped (recurrent and hybrid memory);
        returns the bytes kept (0: not needed, or already held).
        """
        if self.partial_removal or not self._tokens:
            return 0
        tokens = tuple(self._tokens)
        if any(c.tokens == tokens for c in self.checkpoints):
            return 0
        state = self.backend.get_state()
        self.checkpoints.append(Checkpoint(tokens, state))
        del self.checkpoints[:-MAX_CHECKPOINTS]
        return len(state)

    def _after_abort(self, target: Sequence[int], position: int, count: int) -> int:
        """Where the cache stands after llama_decode was aborted inside a run.

        llama.cpp keeps the micro-batches it finished and removes the one it was
        computing (``llama_memory_seq_rm`` from its first position on). Recurrent memory
        refuses that removal and may hold a half-updated state: it goes back to a
        checkpoint, or is emptied.
        """
        held = self.backend.last_position() + 1
        if self.partial_removal and position <= held <= position + count:
            self._tokens.extend(target[position:held])
            self.changed = self.changed or held > position
            return held
        self.changed = True
        self._restore_checkpoint(target, position)
        return len(self._tokens)

    def append(self, token: int) -> bool:
        """Evaluate one generated token at the end; False when the context is full."""
        if len(self._tokens) >= self.backend.n_ctx:
            return False
        try:
            self.backend.decode([token], len(self._tokens), logits_for_last=True)
        except ContextFullError:
            return False
        self._tokens.append(token)
        self.changed = True
        return True

    def fork(self, count: int) -> list[int]:
        """Sequence ids for ``count`` replies sampled from what the cache holds now:
        0 (this mirror's) and ``count - 1`` others tagged on the same cells (llama.cpp's
        ``llama_memory_seq_cp``: the prompt is evaluated once for all of them)."""
        self.join()
        others = list(range(ALTERNATIVE_SEQ, ALTERNATIVE_SEQ + count - 1))
        for sequence in others:
            self.backend.copy_sequence(sequence)
            self._forks[sequence] = len(self._tokens)
        return [0, *others]

    def step_forks(self, tokens: dict[int, int]) -> bool:
        """Evaluate one token for each sequence in ``tokens`` (sequence id -> token) in one
        llama_decode call; the logits of the i-th are at batch index i. False (nothing
        evaluated) when the cache has no room for them."""
        entries = [
            (token, len(self._tokens) if sequence == 0 else self._forks[sequence], sequence)
            for sequence, token in tokens.items()
        ]
        try:
            self.backend.decode_sequences(entries)
        except ContextFullError:
            return False
        for token, _, sequence in entries:
            if sequence == 0:
                self._tokens.append(token)
                self.changed = True
            else:
                self._forks[sequence] += 1
        return True

    def join(self) -> None:
        """Drop every sequence but 0: the cache holds the kept reply only, as the mirror says."""
        for sequence in self._forks:
            self.backend.remove_sequence(sequence)
        self._forks.clear()

    @property
    def forks(self) -> tuple[int, ...]:
        """The other sequences held now (empty outside alternatives)."""
        return tuple(self._forks)

    def drop_range(self, start: int, end: int) -> bool:
        """Remove cells [start, end) and slide the later ones down, without recomputing.

        False (cache untouched) when the model cannot shift positions.
        """
        if not self.partial_removal or not self.backend.can_shift:
            return False
        if not self._exact_floor <= start <= end <= len(self._tokens):
            return False
        if not self.backend.try_remove_cells(start, end):
            self.partial_removal = False  # refused, cache untouched
            return False
        if len(self._tokens) > end:
            self.backend.shift_cells(end, -1, start - end)
        del self._tokens[start:end]
        self.changed = True
        return True

    def snapshot(self) -> bytearray:
        """llama.cpp's serialized state of the cells (``llama_state_seq_get_data``)."""
        return self.backend.get_state()

    def snapshot_from(self, start: int) -> bytearray:
        """The serialized state of the cells at positions >= ``start`` only."""
        return self.backend.get_state_from(start)

    def state_size(self) -> int:
        """Bytes of the whole serialized state, counted without copying it."""
        return self.backend.state_size()

    def restore(self, state: bytes | bytearray, token_ids: Sequence[int]) -> str | None:
        """Load a saved state that claims to hold ``token_ids``; the reason if it does not."""
        self.reset()
        if not self.backend.set_state(state):
            return "llama.cpp rejected the saved state"
        parsed = parse_state(state)
        reason = _cells_mismatch(parsed, len(token_ids), self.backend.last_position() + 1)
        if reason is not None:
            self.backend.clear()
            return reason
        windowed = parsed is not None and len(parsed.caches) > 1
        self._exact_floor = len(token_ids) if windowed else 0
        self._tokens = list(token_ids)
        self.changed = False
        return None

    def _resync_after_error(self) -> None:
        held = self.backend.last_position() + 1
        if held != len(self._tokens):
            self.backend.clear()
            self._tokens = []
            self.changed = True


def _cells_mismatch(parsed: ParsedState | None, expected: int, held: int) -> str | None:
    """Why a restored state does not hold positions 0..expected-1, or None if it does.

    The full-attention cache (the first in the state) must hold every position. A
    sliding-window cache after it legitimately starts later, so llama.cpp's lowest
    position of the sequence says nothing about the history; its positions are read
    from the state itself when its layout is known.
    """
    if held != expected:
        return f"the saved state holds {held} positions but {expected} token ids"
    if parsed is None:
        return None  # a layout we cannot read (e.g. recurrent memory): llama.cpp's checks stand
    positions = parsed.caches[0].positions
    if positions.shape[0] != expected or not np.array_equal(positions, np.arange(expected)):
        first = int(positions[0]) if positions.shape[0] else -1
        return (
            f"the saved state's full-attention cache holds {positions.shape[0]} cells from "
            f"position {first}, not the {expected} positions of its token ids"
        )
    return None
