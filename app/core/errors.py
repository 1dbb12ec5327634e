"""What the llama.cpp engine raises, importable without loading llama.cpp.

The GUI thread and the server engine catch these by type; defining them apart from
the backend keeps llama.cpp out of every process that never loads a local model.
"""

from __future__ import annotations

from app.core.models import ModelFileError


class ModelLoadError(ModelFileError):
    pass


class DecodeError(RuntimeError):
    pass


class ContextFullError(DecodeError):
    """The context has no free cells for the tokens asked for."""


class DecodeAborted(DecodeError):
    """llama_decode stopped early because its cancel flag was set (the abort callback)."""


class ModelLoadCancelled(ModelLoadError):
    """The load was cancelled (the progress callback returned False)."""
