"""Cold prefill speed under llama.cpp settings, llama-server's for the same tokens, and the
greedy oracle (a reused cache continues exactly as a cold one) with flash attention on/off.

Measures llama-cpp-python's C API directly (not the app), one JSON line per run, so runs
can be interleaved from a shell loop on a shared machine (see README, "Prefill speed").

  python scripts/prefill_speed.py local --flash-attn off          # cold prefill, 3,597 tokens
  python scripts/prefill_speed.py server --port 8080               # the same tokens on a server
  python scripts/prefill_speed.py oracle --flash-attn on --model M # warm 48-token run vs cold
  python scripts/prefill_speed.py slots --port 8080                # warm turn on a pinned slot

The prompt is README.md and docs/architecture.md as text, tokenized by the model.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

import httpx
import llama_cpp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core.models import default_model_path  # noqa: E402

FLASH = {
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
}
_QUIET = llama_cpp.llama_log_callback(lambda level, text, data: None)


def load_model(path: Path, repack: bool = False) -> llama_cpp.llama_model_p:
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    params.use_extra_bufts = repack  # off in the app: AMX crashes on some Xeons
    return llama_cpp.llama_model_load_from_file(str(path).encode(), params)


def prompt_tokens(model: llama_cpp.llama_model_p, count: int) -> list[int]:
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "architecture.md").read_text()
    data = text.encode()
    buffer = (llama_cpp.llama_token * (len(data) + 16))()
    vocab = llama_cpp.llama_model_get_vocab(model)
    found = llama_cpp.llama_tokenize(vocab, data, len(data), buffer, len(buffer), True, False)
    if found < count:
        raise SystemExit(f"the text has only {found} tokens")
    return list(buffer[:count])


class Context:
    """One llama.cpp context as the app makes it (n_seq_max 2, unified, swa_full)."""

    def __init__(self, model: llama_cpp.llama_model_p, args: argparse.Namespace) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = args.n_ctx
        params.n_batch = args.batch
        params.n_ubatch = args.ubatch or args.batch
        params.n_seq_max = 2
        params.kv_unified = True
        params.n_threads = args.threads
        params.n_threads_batch = args.threads_batch or args.threads
        params.swa_full = True
        params.flash_attn_type = FLASH[args.flash_attn]
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_batch = args.batch
        self.batch = llama_cpp.llama_batch_init(args.batch, 0, 1)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))

    def run(self, tokens: list[int], start: int) -> np.ndarray:
        """Evaluate ``tokens`` at start.. in one llama_decode call; the last token's logits."""
        for index, token in enumerate(tokens):
            self.batch.token[index] = token
            self.batch.pos[index] = start + index
            self.batch.n_seq_id[index] = 1
            self.batch.seq_id[index][0] = 0
            self.batch.logits[index] = index == len(tokens) - 1
        self.batch.n_tokens = len(tokens)
        if llama_cpp.llama_decode(self.ctx, self.batch) != 0:
            raise SystemExit("llama_decode failed")
        logits = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).copy()

    def prefill(self, tokens: list[int], start: int = 0) -> np.ndarray:
        logits = np.zeros(0)
        for offset in range(0, len(tokens), self.n_batch):
            logits = self.run(tokens[offset : offset + self.n_batch], start + offset)
        return logits

    def greedy(self, logits: np.ndarray, position: int, count: int) -> list[int]:
        tokens: list[int] = []
        for _ in range(count):
            tokens.append(int(np.argmax(logits)))
            logits = self.run(tokens[-1:], position)
            position += 1
        return tokens


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def local(args: argparse.Namespace) -> dict[str, object]:
    model = load_model(args.model, args.repack)
    tokens = prompt_tokens(model, args.tokens)
    context = Context(model, args)
    if args.warm:  # only the last ``warm`` tokens are timed, on top of the rest
        context.prefill(tokens[: -args.warm])
        tokens, args.start = tokens[-args.warm :], len(tokens) - args.warm
    start, cpu = time.perf_counter(), time.process_time()
    context.prefill(tokens, args.start)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": round(seconds, 2), "tok_s": round(len(tokens) / seconds, 1),
            "cpu_s": round(cpu, 2)}  # fmt: skip


def server(args: argparse.Namespace) -> dict[str, object]:
    tokens = prompt_tokens(load_model(args.model), args.tokens)
    body = {"prompt": tokens, "n_predict": 0, "cache_prompt": False}
    cpu = server_cpu_seconds(args.pid)
    reply = httpx.post(f"http://127.0.0.1:{args.port}/completion", json=body, timeout=3600)
    cpu = server_cpu_seconds(args.pid) - cpu
    timings = reply.json()["timings"]
    seconds = timings["prompt_ms"] / 1000
    return {"prompt_n": timings["prompt_n"], "seconds": round(seconds, 2),
            "tok_s": round(timings["prompt_n"] / seconds, 1), "cpu_s": round(cpu, 2)}  # fmt: skip


def server_cpu_seconds(pid: int) -> float:
    """The server process's user + system CPU time (0 without --pid): on a loaded machine
    the CPU a prefill costs is a fairer figure than its wall time, with one thread."""
    if not pid:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def oracle(args: argparse.Namespace) -> dict[str, object]:
    """Cold: the prompt in n_batch runs. Warm: all but the last ``tail`` tokens, then those
    in one run (what a reused cache does with a new message). 32 greedy tokens after each."""
    model = load_model(args.model)
    tokens = prompt_tokens(model, args.tokens)
    context = Context(model, args)
    cold_logits = context.prefill(tokens)
    cold = context.greedy(cold_logits, len(tokens), 32)
    llama_cpp.llama_memory_clear(context.memory, True)
    cut = len(tokens) - args.tail
    context.prefill(tokens[:cut])
    warm_logits = context.run(tokens[cut:], cut)
    warm = context.greedy(warm_logits, len(tokens), 32)
    differ = [index for index, (a, b) in enumerate(zip(cold, warm, strict=True)) if a != b]
    return {
        "max_logit_diff": float(np.abs(cold_logits - warm_logits).max()),
        "same_greedy": not differ,
        "first_differing_token": differ[0] if differ else None,
    }


def slots(args: argparse.Namespace) -> dict[str, object]:
    """Every slot holds its own history; then turns on slot 0 (48 new tokens each), each
    after a request on another slot, as the benchmark's strategies do on a 5-slot server."""
    tokens = prompt_tokens(load_model(args.model), args.tokens)
    url = f"http://127.0.0.1:{args.port}/completion"

    def post(slot: int, prompt: list[int]) -> dict[str, float]:
        body = {"prompt": prompt, "n_predict": 0, "cache_prompt": True, "id_slot": slot}
        found = httpx.post(url, json=body, timeout=3600).json()["timings"]
        return {"prompt_n": found["prompt_n"], "prompt_ms": round(found["prompt_ms"])}

    histories = [tokens[slot * 7 : slot * 7 + args.history] for slot in range(args.n_slots)]
    for slot, history in enumerate(histories):
        post(slot, history)
    turns, new = [], tokens[-48 * args.turns :]
    for turn in range(args.turns):
        other = 1 + turn % (args.n_slots - 1)
        post(other, histories[other])
        histories[0] = histories[0] + new[48 * turn : 48 * (turn + 1)]
        turns.append(post(0, histories[0]))
    return {"turns": turns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["local", "server", "oracle", "slots"])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=3597)
    parser.add_argument("--flash-attn", choices=list(FLASH), default="off")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--ubatch", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--threads-batch", type=int, default=0)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--repack", action="store_true", help="llama.cpp's extra buffer types")
    parser.add_argument("--tail", type=int, default=48)
    parser.add_argument("--warm", type=int, default=0, help="local: time only the last N tokens")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--pid", type=int, default=0, help="the server's process (CPU time)")
    parser.add_argument("--n-slots", type=int, default=5)
    parser.add_argument("--history", type=int, default=1500)
    parser.add_argument("--turns", type=int, default=2)
    args = parser.parse_args()
    args.start = 0
    args.model = args.model or default_model_path()
    if args.what == "oracle" and args.tokens == 3597:
        args.tokens = 1200
    result = {"local": local, "server": server, "oracle": oracle, "slots": slots}[args.what](args)
    settings = {"what": args.what, "model": args.model.name, "flash_attn": args.flash_attn,
                "batch": args.batch, "ubatch": args.ubatch or args.batch, "threads": args.threads,
                "tokens": args.tokens, "warm": args.warm}  # fmt: skip
    print(json.dumps({**settings, **result, "loadavg": load()}))


if __name__ == "__main__":
    main()
