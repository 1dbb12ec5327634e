"""llama.cpp's sequence state cut into token-range pages, and joined back byte for byte.

Why: a chat's saved KV cache grows by a few hundred tokens a turn, but the blob of
``llama_state_seq_get_data`` holds all of it. Cut into pages of ``PAGE_TOKENS``
positions, a save only writes the pages that are new, and two chats (or branches) with
the same prefix share its pages.

The format read here is that of the pinned llama.cpp (``llama_kv_cache::state_write``)::

    u32 magic  i32 seq_id
    per KV cache (one; two for iSWA: full-attention layers, then sliding-window layers):
      u32 n_stream (1)  u32 cell_count
      cell_count × meta: i32 pos, u32 n_seq_id (1), [12-byte ext], i32 seq_id
      u32 v_trans  u32 n_layer
      per layer: i32 k_type  u64 k_row_size  cell_count × k_row_size bytes
      v_trans == 0, per layer: i32 v_type  u64 v_row_size  cell_count × v_row_size bytes
      v_trans == 1, per layer: i32 v_type  u32 v_el_size  u32 n_embd_v
                                n_embd_v × (cell_count × v_el_size) bytes

Anything else (recurrent memory, a future layout) is not recognised: ``parse_state``
returns None and the caller keeps the blob whole. Only the first cache is paged; a
sliding-window cache holds at most a window of cells, so it is kept as one tail page.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

STATE_MAGIC = 0xAF143CD8
PAGE_FORMAT_VERSION = 1
PAGE_TOKENS = 64  # 1.5 MB of SmolLM2 f16 cache: fine-grained sharing, few rows
_EXT_SIZE = 12  # llama_kv_cell_ext: x, y, tok
_MAX_LAYERS = 4096


@dataclass(frozen=True)
class LayerFormat:
    type_id: int
    size: int  # bytes per row (K, and V when not transposed) or per element (V transposed)
    n_embd: int = 0  # transposed V only: rows per layer

    def bytes_per_cell(self) -> int:
        return self.size * self.n_embd if self.n_embd else self.size


@dataclass(frozen=True)
class CacheFormat:
    """What every cell of one KV cache looks like: the part of the state that never changes."""

    meta_size: int
    v_trans: bool
    k_layers: tuple[LayerFormat, ...]
    v_layers: tuple[LayerFormat, ...]

    def cell_bytes(self) -> int:
        layers = self.k_layers + self.v_layers
        return self.meta_size + sum(layer.bytes_per_cell() for layer in layers)

    def describe(self) -> list[object]:
        """A JSON-able form (part of a saved state's record)."""
        return [
            self.meta_size,
            int(self.v_trans),
            [[k.type_id, k.size] for k in self.k_layers],
            [[v.type_id, v.size, v.n_embd] for v in self.v_layers],
        ]

    @staticmethod
    def from_description(data: Sequence[object]) -> CacheFormat:
        meta_size, v_trans, k_layers, v_layers = data
        return CacheFormat(
            _as_int(meta_size),
            bool(v_trans),
            tuple(LayerFormat(_as_int(t), _as_int(s)) for t, s in _rows(k_layers)),
            tuple(LayerFormat(_as_int(t), _as_int(s), _as_int(n)) for t, s, n in _rows(v_layers)),
        )


def _as_int(value: object) -> int:
    """A stored JSON number as an int; anything else raises TypeError, as ``int()`` would."""
    if isinstance(value, (int, float, str)):
        return int(value)
    raise TypeError(f"not a number: {value!r}")


def _rows(value: object) -> Iterator[Iterable[object]]:
    """A stored list of layer rows; what is not a list of lists raises TypeError, as
    iterating it would."""
    if not isinstance(value, Iterable):
        raise TypeError(f"not a list of layers: {value!r}")
    for row in value:
        if not isinstance(row, Iterable):
            raise TypeError(f"not a layer: {row!r}")
        yield row


@dataclass
class CacheCells:
    """One KV cache's cells, sorted by position, as arrays that slice without copying."""

    format: CacheFormat | None  # None: no cells (llama.cpp then writes no data section)
    positions: np.ndarray  # int32, ascending
    meta: np.ndarray  # (cells, meta_size) uint8
    k: list[np.ndarray]  # per layer (cells, row)
    v: list[np.ndarray]  # per layer (cells, row), or (n_embd, cells, element) when transposed

    @property
    def count(self) -> int:
        return int(self.positions.shape[0])

    def payload(self, start: int, stop: int) -> bytes:
        """Cells [start, stop) as one page: meta, then K of every layer, then V."""
        parts = [self.meta[start:stop]]
        parts += [rows[start:stop] for rows in self.k]
        if self.format is not None and self.format.v_trans:
            parts += [np.ascontiguousarray(block[:, start:stop]) for block in self.v]
        else:
            parts += [rows[start:stop] for rows in self.v]
        return b"".join(part.tobytes() for part in parts)


@dataclass
class ParsedState:
    seq_id: int
    caches: list[CacheCells]


class _Reader:
    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.offset = 0

    def take(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.data):
            raise ValueError("truncated")
        (value,) = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += size
        return int(value)

    def block(self, size: int) -> np.ndarray:
        if size < 0 or self.offset + size > len(self.data):
            raise ValueError("truncated")
        array = np.frombuffer(self.data, dtype=np.uint8, count=size, offset=self.offset)
        self.offset += size
        return array


def _read_cache(reader: _Reader, meta_size: int) -> CacheCells:
    if reader.take("<I") != 1:
        raise ValueError("more than one stream")
    count = reader.take("<I")
    if count == 0:
        empty = np.zeros((0,), dtype=np.int32)
        return CacheCells(None, empty, np.zeros((0, meta_size), np.uint8), [], [])
    meta = reader.block(count * meta_size).reshape(count, meta_size)
    positions = meta[:, 0:4].copy().view("<i4").reshape(count)
    if not np.all(meta[:, 4:8].copy().view("<u4") == 1):
        raise ValueError("cells of more than one sequence")
    v_trans = reader.take("<I")
    n_layer = reader.take("<I")
    if v_trans not in (0, 1) or not 0 < n_layer <= _MAX_LAYERS:
        raise ValueError("not a KV cache section")
    k_layers: list[LayerFormat] = []
    k: list[np.ndarray] = []
    for _ in range(n_layer):
        type_id, row = reader.take("<i"), reader.take("<Q")
        k_layers.append(LayerFormat(type_id, row))
        k.append(reader.block(count * row).reshape(count, row))
    v_layers: list[LayerFormat] = []
    v: list[np.ndarray] = []  # (cells, row), or (n_embd, cells, element) when transposed
    for _ in range(n_layer):  # llama.cpp skips layers without V; none of the paged kinds have any
        type_id = reader.take("<i")
        if v_trans:
            element, n_embd = reader.take("<I"), reader.take("<I")
            v_layers.append(LayerFormat(type_id, element, n_embd))
            v.append(reader.block(n_embd * count * element).reshape(n_embd, count, element))
        else:
            row = reader.take("<Q")
            v_layers.append(LayerFormat(type_id, row))
            v.append(reader.block(count * row).reshape(count, row))
    fmt = CacheFormat(meta_size, bool(v_trans), tuple(k_layers), tuple(v_layers))
    cells = CacheCells(fmt, positions, meta, k, v)
    order = np.argsort(positions, kind="stable")
    if np.any(order != np.arange(count)):  # cells out of position order: sort them
        cells = CacheCells(
            fmt,
            positions[order],
            meta[order],
            [rows[order] for rows in k],
            [block[:, order] if v_trans else block[order] for block in v],
        )
    if np.any(np.diff(cells.positions) <= 0):
        raise ValueError("repeated positions")
    return cells


def parse_state(blob: bytes | bytearray | memoryview) -> ParsedState | None:
    """The sequence state as caches of cells; None when the layout is not recognised."""
    view = memoryview(blob).cast("B")
    for meta_size in (12, 12 + _EXT_SIZE):
        reader = _Reader(view)
        try:
            if reader.take("<I") != STATE_MAGIC:
                return None
            seq_id = reader.take("<i")
            caches = []
            while reader.offset < len(view):
                caches.append(_read_cache(reader, meta_size))
            if caches and len(caches) <= 2:
                return ParsedState(seq_id, caches)
        except ValueError:
            continue
    return None


@dataclass(frozen=True)
class Page:
    """Cells of one cache with positions [first, first + count), as stored bytes."""

    cache: int
    first_position: int
    count: int
    payload: bytes


@dataclass(frozen=True)
class PageBounds:
    """Where a page lies in a parsed state, before its bytes are copied out."""

    cache: int
    first_position: int
    count: int
    start: int  # cell index in its cache
    stop: int


def split_bounds(parsed: ParsedState, page_tokens: int = PAGE_TOKENS) -> list[PageBounds]:
    """The first cache in pages of ``page_tokens`` positions; any later cache as one page."""
    bounds: list[PageBounds] = []
    for index, cells in enumerate(parsed.caches):
        if cells.count == 0:
            continue
        if index > 0:
            bounds.append(PageBounds(index, int(cells.positions[0]), cells.count, 0, cells.count))
            continue
        buckets = cells.positions // page_tokens
        cuts = (np.flatnonzero(np.diff(buckets)) + 1).tolist()
        for start, stop in zip([0, *cuts], [*cuts, cells.count], strict=True):
            bounds.append(
                PageBounds(index, int(cells.positions[start]), stop - start, start, stop)
            )
    return bounds


def page_at(parsed: ParsedState, bounds: PageBounds) -> Page:
    """Copy one page's bytes out of the state (only pages not stored yet need it)."""
    cells = parsed.caches[bounds.cache]
    return Page(
        bounds.cache, bounds.first_position, bounds.count, cells.payload(bounds.start, bounds.stop)
    )


def split_pages(parsed: ParsedState, page_tokens: int = PAGE_TOKENS) -> list[Page]:
    """Every page of the state, with its bytes."""
    return [page_at(parsed, bounds) for bounds in split_bounds(parsed, page_tokens)]


def page_positions(page: Page, fmt: CacheFormat) -> np.ndarray:
    """The positions a page's cells hold (read from its own meta bytes)."""
    meta = np.frombuffer(page.payload, dtype=np.uint8, count=page.count * fmt.meta_size)
    return meta.reshape(page.count, fmt.meta_size)[:, 0:4].copy().view("<i4").reshape(page.count)


def join_pages(
    seq_id: int, formats: Sequence[CacheFormat | None], pages: Sequence[Page]
) -> bytearray:
    """One buffer for ``llama_state_seq_set_data``: the inverse of ``split_pages``."""
    out = bytearray(struct.pack("<Ii", STATE_MAGIC, seq_id))
    for index, fmt in enumerate(formats):
        mine = [page for page in pages if page.cache == index]
        count = sum(page.count for page in mine)
        out += struct.pack("<II", 1, count)
        if count == 0 or fmt is None:
            continue
        pieces = [_cut(page, fmt) for page in mine]
        out += b"".join(piece[0] for piece in pieces)
        out += struct.pack("<II", int(fmt.v_trans), len(fmt.k_layers))
        for layer, k in enumerate(fmt.k_layers):
            out += struct.pack("<iQ", k.type_id, k.size)
            out += b"".join(piece[1][layer] for piece in pieces)
        for layer, v in enumerate(fmt.v_layers):
            if fmt.v_trans:
                out += struct.pack("<iII", v.type_id, v.size, v.n_embd)
                blocks = [
                    np.frombuffer(piece[2][layer], dtype=np.uint8).reshape(v.n_embd, -1)
                    for piece in pieces
                ]
                out += np.concatenate(blocks, axis=1).tobytes()
            else:
                out += struct.pack("<iQ", v.type_id, v.size)
                out += b"".join(piece[2][layer] for piece in pieces)
    return out


def _cut(page: Page, fmt: CacheFormat) -> tuple[memoryview, list[memoryview], list[memoryview]]:
    view = memoryview(page.payload)
    if len(view) != page.count * fmt.cell_bytes():
        raise ValueError("a page's size does not match its cache's cell format")
    offset = page.count * fmt.meta_size
    meta = view[:offset]
    k_parts, v_parts = [], []
    for k in fmt.k_layers:
        size = page.count * k.bytes_per_cell()
        k_parts.append(view[offset : offset + size])
        offset += size
    for v in fmt.v_layers:
        size = page.count * v.bytes_per_cell()
        v_parts.append(view[offset : offset + size])
        offset += size
    return meta, k_parts, v_parts
