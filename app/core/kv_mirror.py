"""The KV mirror: the exact token ids held in llama.cpp's sequence 0, kept in step with it.

Every cache operation goes through here, so the mirror and llama.cpp's cells can never
disagree: ``sync`` (keep the longest common prefix with a target, evaluate the rest),
``drop_range`` (remove cells and slide the rest down), ``restore`` and ``reset``.
Which chat the cells belong to, and whether they were saved, is the session's
business; this class only knows tokens.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from app.core.llama_backend import ContextFullError, DecodeError, LlamaBackend
from app.core.state_pages import ParsedState, parse_state
from app.domain import Step

ProgressCallback = Callable[[str, int, int], None]


class NothingToEvaluate(ValueError):
    """A target with no tokens: there is no position to produce logits for."""


@dataclass(frozen=True)
class SyncResult:
    reused: int  # tokens of the target already held (kept as they were)
    evaluated: int  # tokens computed by this call
    completed: bool  # False: cancelled between two batches
    ms: float


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    limit = min(len(a), len(b))
    index = 0
    while index < limit and a[index] == b[index]:
        index += 1
    return index


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
        """Empty the cache."""
        self._exact_floor = 0
        self.backend.clear()
        if self._tokens:
            self.changed = True
        self._tokens = []

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
        if reused < len(self._tokens):
            self.backend.remove_cells(reused, -1)
            del self._tokens[reused:]
            self.changed = True
        size = min(chunk or self.backend.n_batch, self.backend.n_batch)
        position = reused
        started = time.perf_counter()
        while position < len(target):
            if cancel is not None and cancel.is_set():
                break
            run = list(target[position : position + size])
            last = position + len(run) == len(target)
            try:
                self.backend.decode(run, position, logits_for_last=need_logits and last)
            except DecodeError:
                self._resync_after_error()
                raise
            self._tokens.extend(run)
            self.changed = True
            position += len(run)
            if progress is not None:
                progress(step, position - reused, len(target) - reused)
        evaluated = position - reused
        elapsed = time.perf_counter() - started
        if evaluated >= 32 and elapsed > 0:
            rate = evaluated / elapsed
            previous = self.prefill_tokens_per_s
            self.prefill_tokens_per_s = rate if previous is None else 0.5 * previous + 0.5 * rate
        return SyncResult(reused, evaluated, position == len(target), elapsed * 1000)

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

    def drop_range(self, start: int, end: int) -> bool:
        """Remove cells [start, end) and slide the later ones down, without recomputing.

        False (cache untouched) when the model cannot shift positions.
        """
        if not self.backend.can_shift or not self._exact_floor <= start <= end <= len(self._tokens):
            return False
        self.backend.remove_cells(start, end)
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
