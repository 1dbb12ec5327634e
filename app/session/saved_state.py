"""Saved-state policy: what a chat's saved KV cache must match before it is reused.

A state is worth restoring only if it was computed by the same model file, with the
same context size, KV type, chat markup, layout and llama.cpp state format; any
difference would make reused cells disagree with a fresh evaluation. The CRC-32
catches truncated or flipped bytes; the binding (:mod:`app.session.state_check`)
catches a state that is not this chat's token ids and positions (copied from another
chat, or edited with its CRC fixed up); llama.cpp's own checks and the cell count
catch the rest. A rejected or unreadable state is deleted, and the reason goes into
the turn's metrics: the history is recomputed, the chat is never blocked.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

from app.core.kv_mirror import KVMirror
from app.core.llama_backend import llama_cpp_version
from app.session.state_check import binding_problem, state_binding
from app.storage.records import SavedState
from app.storage.store import Store

STATE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class StateLoad:
    """What happened when a chat became the cache's chat."""

    restored: bool
    tokens: int = 0
    ms: float | None = None
    rejected: str | None = None
    bytes: int = 0


@dataclass(frozen=True)
class StateSave:
    bytes: int
    ms: float


class SavedStates:
    """Saves and restores one model's KV cache for any chat of one store."""

    def __init__(self, store: Store, mirror: KVMirror, identity: dict[str, object]) -> None:
        self.store = store
        self.mirror = mirror
        self._identity = identity

    def fingerprint(self, layout: str) -> dict[str, object]:
        """Everything that changes the KV values of the same token ids."""
        return {
            "format": STATE_FORMAT_VERSION,
            **self._identity,
            "layout": str(layout),
            "llama_cpp": llama_cpp_version(),
        }

    def reject_reason(self, saved: SavedState, layout: str) -> str | None:
        if saved.unreadable:
            return saved.unreadable
        if saved.format_version != STATE_FORMAT_VERSION:
            return f"saved-state format {saved.format_version} is not {STATE_FORMAT_VERSION}"
        expected = self.fingerprint(layout)
        differences = [
            f"{key} {saved.fingerprint.get(key)!r} != {value!r}"
            for key, value in expected.items()
            if saved.fingerprint.get(key) != value
        ]
        if differences:
            return "saved with different settings: " + "; ".join(differences)
        if zlib.crc32(saved.state) != saved.checksum:
            return "checksum mismatch: the saved state is truncated or corrupt"
        return binding_problem(
            saved.binding,
            saved.chat_id,
            saved.fingerprint,
            saved.token_ids,
            saved.checksum,
            len(saved.state),
        )

    def restore(self, chat_id: int, layout: str) -> StateLoad:
        """Load the chat's saved state into the (already emptied) cache, if it is valid."""
        started = time.perf_counter()
        saved = self.store.load_state(chat_id)
        if saved is None:
            return StateLoad(restored=False)
        reason = self.reject_reason(saved, layout)
        if reason is None:
            reason = self.mirror.restore(saved.state, saved.token_ids)
        elapsed = (time.perf_counter() - started) * 1000
        if reason is not None:
            self.mirror.reset()
            self.mirror.mark_saved()
            self.store.delete_state(chat_id)
            return StateLoad(restored=False, ms=elapsed, rejected=reason)
        return StateLoad(
            restored=True, tokens=len(self.mirror), ms=elapsed, bytes=len(saved.state)
        )

    def save(self, chat_id: int, layout: str) -> StateSave:
        """Write the cache's cells and token ids as the chat's saved state."""
        started = time.perf_counter()
        if not len(self.mirror):
            self.store.delete_state(chat_id)
            self.mirror.mark_saved()
            return StateSave(0, (time.perf_counter() - started) * 1000)
        data = self.mirror.snapshot()
        fingerprint = self.fingerprint(layout)
        token_ids = list(self.mirror.tokens)
        checksum = zlib.crc32(data)
        self.store.save_state(
            SavedState(
                chat_id=chat_id,
                format_version=STATE_FORMAT_VERSION,
                fingerprint=fingerprint,
                token_ids=token_ids,
                state=data,
                checksum=checksum,
                binding=state_binding(chat_id, fingerprint, token_ids, checksum, len(data)),
            )
        )
        self.mirror.mark_saved()
        return StateSave(len(data), (time.perf_counter() - started) * 1000)
