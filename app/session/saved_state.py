"""Saved-state policy: how a chat's KV cache is saved as pages, and when one may be reused.

A state is worth restoring only if it was computed by the same model file, with the
same context size, KV type, chat markup and llama.cpp; any difference would make reused
cells disagree with a fresh evaluation. Pages are addressed by a hash chain over that
fingerprint, the token ids and their positions, so a page can only ever be restored
under the tokens it was computed for. Pages and state rows carry MACs keyed by the chats
database's secret (see ``app.storage.kv_store``): a state row copied from another chat,
a page replaced, moved or given a digest anyone can compute, is rejected and the history
is recomputed, with the reason in the turn's metrics. The KV file itself is disposable:
one found damaged is set aside and a fresh one started, and the turn goes on.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from app.core.kv_mirror import KVMirror
from app.core.llama_backend import SEQ, llama_cpp_version
from app.core.state_pages import (
    PAGE_FORMAT_VERSION,
    PAGE_TOKENS,
    CacheFormat,
    Page,
    join_pages,
    page_at,
    page_positions,
    parse_state,
    split_bounds,
)
from app.session.documents import chat_label
from app.session.engine import StateLoad, StateSave
from app.storage.errors import DatabaseCorrupt
from app.storage.kv_store import KVStore, StateRecord, StoredPage
from app.storage.store import Store

STATE_FORMAT_VERSION = 2  # 1: whole blobs in the chats database; 2: pages in the KV store


def _digest(*parts: bytes) -> bytes:
    return hashlib.blake2b(b"".join(parts), digest_size=16).digest()


def _tokens_bytes(tokens: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(tokens)}i", *tokens)


class SavedStates:
    """Saves and restores one model's KV cache for any chat, as pages in a KV store."""

    def __init__(
        self,
        store: Store,
        mirror: KVMirror,
        identity: dict[str, object],
        page_tokens: int = PAGE_TOKENS,
    ) -> None:
        self.store = store
        self.mirror = mirror
        self._identity = identity
        self.page_tokens = page_tokens
        self._root = _digest(json.dumps(self.fingerprint(), sort_keys=True).encode())
        # Learned at the first save: a cache that is not one plain attention cache (a
        # sliding-window pair, recurrent memory) never takes the range path, so later
        # saves do not copy a range out only to throw it away.
        self._whole_states_only = False

    @property
    def kv(self) -> KVStore:
        """The chats database's KV store (a fresh one after a damaged one was set aside)."""
        return self.store.kv

    def fingerprint(self) -> dict[str, object]:
        """Everything that changes the KV values of the same token ids."""
        return {
            "format": STATE_FORMAT_VERSION,
            "pages": PAGE_FORMAT_VERSION,
            "page_tokens": self.page_tokens,
            **self._identity,
            "llama_cpp": llama_cpp_version(),
        }

    # -- the hash chain ---------------------------------------------------------------

    def _chain(self, tokens: Sequence[int], bounds: Sequence[tuple[int, int]]) -> list[bytes]:
        hashes, parent = [], self._root
        for first, count in bounds:
            span = _tokens_bytes(tokens[first : first + count])
            parent = _digest(parent, struct.pack("<Bii", 0, first, count), span)
            hashes.append(parent)
        return hashes

    def _tail_hash(self, parent: bytes, tokens: Sequence[int], positions: Sequence[int]) -> bytes:
        held = [tokens[p] for p in positions]
        return _digest(parent, b"\x01", _tokens_bytes(list(positions)), _tokens_bytes(held))

    def _bounds(self, length: int) -> list[tuple[int, int]]:
        size = self.page_tokens
        return [(first, min(size, length - first)) for first in range(0, length, size)]

    # -- checks -----------------------------------------------------------------------

    def reject_reason(self, record: StateRecord) -> str | None:
        if record.unreadable:
            return f"the saved state's record is {record.unreadable}"
        if record.format_version != STATE_FORMAT_VERSION:
            return f"saved-state format {record.format_version} is not {STATE_FORMAT_VERSION}"
        expected = self.fingerprint()
        differences = [
            f"{key} {record.fingerprint.get(key)!r} != {value!r}"
            for key, value in expected.items()
            if record.fingerprint.get(key) != value
        ]
        if differences:
            return "saved with different settings: " + "; ".join(differences)
        if record.forged:
            return f"the saved state's record is not this chat's: {record.forged}"
        return None

    # -- restore ----------------------------------------------------------------------

    def restore(self, chat_id: int, hint: Sequence[int] = ()) -> StateLoad:
        """Load the chat's state into the (already emptied) cache, if it is valid.

        A chat without a state of its own (a fork, a branch) restores the longest run of
        stored pages that matches ``hint``, the tokens it will want. A KV file found
        damaged (now, or when it was opened) is set aside: nothing is restored, the
        reason is given.
        """
        started = time.perf_counter()
        try:
            self.kv  # noqa: B018 - opening it may set a damaged file aside
            notice, self.store.kv_notice = self.store.kv_notice, None
            load = None if notice else self._restore(chat_id, hint, started)
        except DatabaseCorrupt as error:
            notice = self.store.set_kv_aside(error)
            load = None
        if load is not None:
            return load
        self.mirror.reset()
        self.mirror.mark_saved()
        elapsed = (time.perf_counter() - started) * 1000
        return StateLoad(restored=False, ms=elapsed, rejected=notice)

    def has_state(self, chat_id: int) -> bool:
        """The chat has a saved state of its own (False when the KV file is damaged)."""
        try:
            return self.kv.state(chat_id) is not None
        except DatabaseCorrupt as error:
            self.store.kv_notice = self.store.set_kv_aside(error)
            return False

    def _restore(self, chat_id: int, hint: Sequence[int], started: float) -> StateLoad:
        self.kv.damaged_pages = []  # filled by this restore's reads only
        record = self.kv.state(chat_id)
        if record is None:
            held, size, sources = self._restore_shared(hint)
            note = None
            if held:
                names = ", ".join(sources) or "another chat"
                note = (
                    f"restored {held} tokens from pages shared with another chat: saved by"
                    f" {names} ({held // self.page_tokens} pages found by chain hash, each"
                    " signature checked)"
                )
            elapsed = (time.perf_counter() - started) * 1000
            return StateLoad(held > 0, held, elapsed if held else None, None, size, note)
        reason = self.reject_reason(record)
        restored, size, note = 0, 0, None
        if reason is None:
            if record.whole:
                restored, size, reason = self._restore_whole(record)
            else:
                restored, size, reason, note = self._restore_pages(record)
        elapsed = (time.perf_counter() - started) * 1000
        if reason is not None:
            self.mirror.reset()
            self.mirror.mark_saved()
            self.kv.drop_pages(self.kv.damaged_pages)  # the next save writes them anew
            self.kv.delete_state(chat_id)
            return StateLoad(restored=False, ms=elapsed, rejected=reason)
        return StateLoad(True, restored, elapsed, None, size, note)

    def _restore_whole(self, record: StateRecord) -> tuple[int, int, str | None]:
        blob, forged = self.kv.read_whole(record.chat_id)
        if forged:
            return 0, 0, f"the saved state's record is not this chat's: {forged}"
        if blob is None or zlib.crc32(blob) != record.checksum:
            return 0, 0, "checksum mismatch: the saved state is truncated or corrupt"
        reason = self.mirror.restore(blob, record.token_ids)
        return len(record.token_ids), len(blob), reason

    def _formats(self, record: StateRecord) -> list[CacheFormat | None]:
        return [CacheFormat.from_description(f) if f else None for f in record.formats]

    def _restore_pages(self, record: StateRecord) -> tuple[int, int, str | None, str | None]:
        tokens = record.token_ids
        try:
            formats = self._formats(record)
        except (TypeError, ValueError):
            return 0, 0, "the saved state's cell format is unreadable", None
        bounds = self._bounds(len(tokens))
        chain = self._chain(tokens, bounds)
        if record.page_hashes[: len(chain)] != chain or len(record.page_hashes) > len(chain) + (
            len(formats) - 1
        ):
            return 0, 0, "the saved state's pages do not belong to its token ids", None
        pages = self.kv.read_pages(record.page_hashes, record.formats)
        if self.kv.damaged_pages:
            return 0, 0, f"the saved state is damaged: {self.kv.last_gap}", None
        for page, (first, count) in zip(pages, bounds, strict=False):
            fmt = formats[0]
            if fmt is None or page.count != count or not _positions_are(page, fmt, first, count):
                return 0, 0, "a page of the saved state holds other positions", None
        complete = len(pages) == len(record.page_hashes)
        if complete and len(pages) > len(chain):
            tail = pages[len(chain)]
            fmt = formats[tail.cache] if tail.cache < len(formats) else None
            parent = chain[-1] if chain else self._root
            positions = page_positions(_page(tail), fmt).tolist() if fmt else []
            if fmt is None or any(p >= len(tokens) for p in positions) or (
                self._tail_hash(parent, tokens, positions) != tail.hash
            ):
                return 0, 0, "the saved state's window cache does not match its token ids", None
        gap = self.kv.last_gap or "a page is missing"
        if not complete and (len(formats) > 1 or not pages):
            return 0, 0, f"the saved state is incomplete: {gap}", None
        held = sum(page.count for page in pages[: len(chain)])
        try:
            blob = join_pages(record.seq_id, formats, [_page(p) for p in pages])
        except ValueError as error:  # e.g. a page's size does not match its cell format
            return 0, 0, f"the saved state cannot be put together: {error}", None
        reason = self.mirror.restore(blob, tokens[:held])
        note = None
        if not complete:
            note = f"restored {held} of {len(tokens)} saved tokens: {gap}"
        return held, len(blob), reason, note

    def _restore_shared(self, hint: Sequence[int]) -> tuple[int, int, list[str]]:
        """Restore the longest stored page run that ``hint`` begins with (single-cache only).

        Pages are looked up by their chain address among every chat's pages: any chat
        whose prompt begins with the same tokens (a fork, the same document, the same long
        instructions) saved them. Each page's MAC is checked as it is read; the run stops
        at the first that fails (it is dropped). Returns tokens, bytes and the names of
        the chats whose states list the last page restored.
        """
        shape = self.kv.any_state_shape(json.dumps(self.fingerprint(), sort_keys=True))
        if shape is None or not hint:
            return 0, 0, []
        seq_id, descriptions = shape
        formats = [CacheFormat.from_description(f) if f else None for f in descriptions]
        if len(formats) != 1 or formats[0] is None:
            return 0, 0, []
        full = [b for b in self._bounds(len(hint)) if b[1] == self.page_tokens]
        pages = self.kv.read_pages(self._chain(hint, full), descriptions)
        self.kv.drop_pages(self.kv.damaged_pages)
        if not pages:
            return 0, 0, []
        held = sum(page.count for page in pages)
        try:
            blob = join_pages(seq_id, formats, [_page(p) for p in pages])
        except ValueError:
            return 0, 0, []
        if self.mirror.restore(blob, hint[:held]) is not None:
            self.mirror.reset()
            return 0, 0, []
        return held, len(blob), self._owners(pages[-1].hash)

    def _owners(self, page_hash: bytes) -> list[str]:
        """Names of the chats whose saved states list a page (for the turn's notes)."""
        return [chat_label(self.store, chat_id) for chat_id in self.kv.page_owners(page_hash)[:3]]

    # -- save -------------------------------------------------------------------------

    def save(self, chat_id: int) -> StateSave:
        """Write the cache's new pages and the chat's state row.

        A KV file found damaged is set aside and the state saved in a fresh one.
        """
        try:
            return self._save(chat_id)
        except DatabaseCorrupt as error:
            note = self.store.set_kv_aside(error)
        return replace(self._save(chat_id), note=note)

    def _save(self, chat_id: int) -> StateSave:
        started = time.perf_counter()
        tokens = list(self.mirror.tokens)
        if not tokens:
            self.kv.delete_state(chat_id)
            self.mirror.mark_saved()
            return StateSave(0, (time.perf_counter() - started) * 1000)
        saved = None if self._whole_states_only else self._save_range(chat_id, tokens)
        if saved is None:
            saved = self._save_whole_state(chat_id, tokens)
        self.mirror.mark_saved()
        size, written, copied = saved
        return StateSave(size, (time.perf_counter() - started) * 1000, written, copied)

    def _save_range(self, chat_id: int, tokens: list[int]) -> tuple[int, int, int] | None:
        """Copy out of llama.cpp only the pages not stored yet; None if the cache has another shape.

        The pages are cut from a state of the cells past the last stored page, so a save
        costs the new tokens, not the whole history. Only a single cache whose cells hold
        positions 0..n-1 qualifies (a sliding-window cache, recurrent memory or shifted
        positions take the whole-state path).
        """
        bounds = self._bounds(len(tokens))
        hashes = self._chain(tokens, bounds)
        known = self.kv.known_pages(hashes)
        # At least the last page is cut again: it carries the cache's format for the record.
        first_new = next((i for i, digest in enumerate(hashes) if digest not in known), None)
        first_new = len(hashes) - 1 if first_new is None else first_new
        start = bounds[first_new][0]
        blob = self.mirror.snapshot_from(start)
        parsed = parse_state(blob)
        if parsed is None or len(parsed.caches) != 1 or parsed.caches[0].format is None:
            self._whole_states_only = True
            return None
        cells = parsed.caches[0]
        if not np.array_equal(cells.positions, np.arange(start, len(tokens), dtype=np.int32)):
            return None
        fmt = cells.format
        assert fmt is not None  # checked above
        # The cells were read as RANGE_SEQ's; the pages hold the chat sequence's id, as a
        # whole-state save would, so a page is the same bytes whichever way it was cut.
        cells.meta[:, fmt.meta_size - 4 :] = np.frombuffer(
            struct.pack("<i", SEQ), dtype=np.uint8
        )
        new = []
        for where in split_bounds(parsed, self.page_tokens):
            index = where.first_position // self.page_tokens
            if hashes[index] not in known:
                new.append(_stored(hashes[index], page_at(parsed, where)))
        record = StateRecord(
            chat_id=chat_id,
            format_version=STATE_FORMAT_VERSION,
            fingerprint=self.fingerprint(),
            seq_id=SEQ,
            formats=[fmt.describe()],
            token_ids=tokens,
            page_hashes=hashes,
        )
        written = self.kv.save_state(record, new)
        self.kv.enforce_budget(keep=hashes)
        return self.mirror.state_size(), written, len(blob)

    def _save_whole_state(self, chat_id: int, tokens: list[int]) -> tuple[int, int, int]:
        """Copy the whole state out; page it if it is recognised, else keep it as one blob."""
        blob = self.mirror.snapshot()
        parsed = parse_state(blob)
        record = StateRecord(
            chat_id=chat_id,
            format_version=STATE_FORMAT_VERSION,
            fingerprint=self.fingerprint(),
            seq_id=parsed.seq_id if parsed else 0,
            formats=[],
            token_ids=tokens,
        )
        first_cache = parsed.caches[0] if parsed else None
        paged = first_cache is not None and _positions_match(first_cache.positions, tokens)
        if parsed is None or not paged:
            record.whole = True
            record.checksum = zlib.crc32(blob)
            written = self.kv.save_state(record, whole=blob)
            return len(blob), written, len(blob)
        record.formats = [c.format.describe() if c.format else None for c in parsed.caches]
        # Bounds first: only the pages not stored yet are copied out of the state.
        bounds = split_bounds(parsed, self.page_tokens)
        first = [(b.first_position, b.count) for b in bounds if b.cache == 0]
        hashes = self._chain(tokens, first)
        copied: dict[int, Page] = {}
        for index in range(len(first), len(bounds)):
            fmt = parsed.caches[bounds[index].cache].format
            assert fmt is not None  # a page is only cut from a cache that has cells
            copied[index] = page_at(parsed, bounds[index])
            parent = hashes[-1] if hashes else self._root
            positions = page_positions(copied[index], fmt).tolist()
            hashes.append(self._tail_hash(parent, tokens, positions))
        record.page_hashes = hashes
        known = self.kv.known_pages(hashes)
        new = []
        for index, (digest, where) in enumerate(zip(hashes, bounds, strict=True)):
            if digest not in known:
                new.append(_stored(digest, copied.get(index) or page_at(parsed, where)))
        written = self.kv.save_state(record, new)
        self.kv.enforce_budget(keep=hashes)
        return len(blob), written, len(blob)

    def held_token_ids(self, chat_id: int) -> list[int]:
        """The token ids of the chat's saved state (empty if none)."""
        return self.kv.saved_token_ids(chat_id)


def _positions_match(positions: object, tokens: Sequence[int]) -> bool:
    array = np.asarray(positions)
    return array.shape[0] == len(tokens) and bool(np.all(array == np.arange(len(tokens))))


def _positions_are(page: StoredPage, fmt: CacheFormat, first: int, count: int) -> bool:
    return bool(np.array_equal(page_positions(_page(page), fmt), np.arange(first, first + count)))


def _stored(digest: bytes, page: Page) -> StoredPage:
    return StoredPage(digest, page.cache, page.first_position, page.count, page.payload)


def _page(stored: StoredPage) -> Page:
    return Page(stored.cache, stored.first_position, stored.count, stored.payload)
