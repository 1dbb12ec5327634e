"""The one backend test double: the real llama.cpp backend, with recurrent memory's refusal.

LFM2, Granite 4.0-H, Mamba and Qwen3-Next keep a recurrent state instead of one cell per
token: llama.cpp refuses ``llama_memory_seq_rm`` for anything but the whole sequence and
leaves the memory as it was. This wrapper refuses exactly that and passes everything else
to the real backend (real model, real cells).
"""

from __future__ import annotations

from app.core.llama_backend import LlamaBackend


class NoPartialRemoval:
    """The real backend, except that removing part of the sequence is refused.

    ``announced``: it also says so up front, as llama.cpp's ``llama_model_is_recurrent``
    does for a real recurrent model; otherwise the engine learns it from a refusal.
    """

    def __init__(self, real: LlamaBackend, *, announced: bool = False) -> None:
        self._real = real
        self.refused: list[tuple[int, int]] = []
        if announced:
            self.memory_kind = "recurrent"
            self.partial_removal = False

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    def try_remove_cells(self, start: int, end: int = -1) -> bool:
        if start <= 0 and end < 0:
            return self._real.try_remove_cells(start, end)
        self.refused.append((start, end))
        return False

    def remove_cells(self, start: int, end: int = -1) -> None:
        raise AssertionError("the engine must use try_remove_cells and handle a refusal")
