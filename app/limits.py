"""The accepted range of every number a user can type, checked in one place.

The CLI's argparse types, the GUI's spin boxes and the session's constructors all
use these limits, so a bad number gets the same one-line message everywhere and is
refused before anything is written or loaded.
"""

from __future__ import annotations

import math

#: llama.cpp's LLAMA_DEFAULT_SEED: given to its sampler it means "pick a random seed".
#: Written out (not imported) so the GUI can use these limits without llama.cpp.
LLAMA_RANDOM_SEED = 0xFFFFFFFF
#: Seeds a user may give: 0 .. LLAMA_RANDOM_SEED - 1 are fixed; -1 asks for random.
RANDOM_SEED = -1
MAX_SEED = LLAMA_RANDOM_SEED - 1
MAX_TEMPERATURE = 5.0
MAX_TOP_K = 1000  # 0 turns top-k off
MAX_REPEAT_PENALTY = 3.0  # 1.0 turns the penalty off
MAX_TOKENS = 32_768
MAX_TRIM_TOKENS = 1 << 24
#: Replies sampled at once from one prompt (``--alternatives``): each is a sequence of
#: the cache, and llama.cpp's context is sized for this many.
MAX_ALTERNATIVES = 8
#: Below this no chat template fits at all; the exact minimum depends on the template
#: and is checked when the model is loaded (see ChatSession).
MIN_N_CTX = 32
MAX_N_CTX = 1 << 20
#: Seconds a server may send no data (keep-alives do not count) before a reply is abandoned.
DEFAULT_SERVER_TIMEOUT_S = 600.0
MIN_SERVER_TIMEOUT_S = 1.0
MAX_SERVER_TIMEOUT_S = 86_400.0
#: The largest chat template source accepted (the largest known template is about 20 kB).
MAX_TEMPLATE_CHARS = 1 << 20


def check_temperature(value: float) -> float:
    if not math.isfinite(value) or not 0.0 <= value <= MAX_TEMPERATURE:
        raise ValueError(
            f"temperature {value} is out of range: use a number from 0 (greedy) "
            f"to {MAX_TEMPERATURE:g}"
        )
    return float(value)


def check_seed(value: int) -> int:
    if not RANDOM_SEED <= value <= MAX_SEED:
        raise ValueError(
            f"seed {value} is out of range: use 0 to {MAX_SEED}, or {RANDOM_SEED} for a random seed"
        )
    return int(value)


def llama_seed(value: int) -> int:
    """The seed as llama.cpp takes it: -1 becomes LLAMA_DEFAULT_SEED (random)."""
    check_seed(value)
    return LLAMA_RANDOM_SEED if value == RANDOM_SEED else value


def alternative_seed(seed: int, index: int) -> int:
    """Alternative ``index``'s sampler seed: the chat's seed for the first, the next ones
    after it (replies differ, and the same seed gives the same replies again); -1 stays
    random."""
    check_seed(seed)
    return seed if seed == RANDOM_SEED else (seed + index) % (MAX_SEED + 1)


def check_count(name: str, value: int, minimum: int, maximum: int) -> int:
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} {value} is out of range: use {minimum} to {maximum}")
    return int(value)


def check_max_tokens(value: int) -> int:
    return check_count("max tokens", value, 1, MAX_TOKENS)


def check_alternatives(value: int) -> int:
    return check_count("alternatives", value, 1, MAX_ALTERNATIVES)


def check_trim_tokens(value: int) -> int:
    return check_count("trim tokens", value, 1, MAX_TRIM_TOKENS)


def check_n_ctx(value: int) -> int:
    return check_count("context size", value, MIN_N_CTX, MAX_N_CTX)


def check_server_timeout(value: float) -> float:
    if not math.isfinite(value) or not MIN_SERVER_TIMEOUT_S <= value <= MAX_SERVER_TIMEOUT_S:
        raise ValueError(
            f"server timeout {value} is out of range: use {MIN_SERVER_TIMEOUT_S:g} to "
            f"{MAX_SERVER_TIMEOUT_S:g} seconds"
        )
    return float(value)


def check_sampling(top_k: int, top_p: float, min_p: float, repeat_penalty: float) -> None:
    """Top-k 0-1000 (0: off), top-p and min-p 0-1, repeat penalty 1-3 (1: off)."""
    check_count("top-k", top_k, 0, MAX_TOP_K)
    for name, value, low, high in (
        ("top-p", top_p, 0.0, 1.0),
        ("min-p", min_p, 0.0, 1.0),
        ("repeat penalty", repeat_penalty, 1.0, MAX_REPEAT_PENALTY),
    ):
        if not math.isfinite(value) or not low <= value <= high:
            raise ValueError(f"{name} {value} is out of range: use {low:g} to {high:g}")
