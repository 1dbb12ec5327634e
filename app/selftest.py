"""``kvchat --self-test``: prove an install works end to end, without a window.

A packaged app can fail in ways a source checkout never does (a shared library or
the model left out of the bundle, a data dir that cannot be resolved), and a
double-clicked app shows nothing useful when it does. This runs the real path a
user takes: load the model, one turn, commit + warm-up + save, a "restart" (new
ChatSession and Store on the same file), the saved state restored and reused. It
prints one line per step and returns 0, or the failing step and 1.

No Qt import anywhere here: it must run before (and without) any GUI.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # imported where used: the import itself is a timed step
    from app.session.chat_session import ChatSession, GenerationOptions
    from app.storage.store import Store

T = TypeVar("T")

PREFIX = "self-test:"
FIRST_MESSAGE = "Say hello."
SECOND_MESSAGE = "Say it again."


class SelfTestFailure(Exception):
    """A check that did not hold, explained in one line."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvchat --self-test",
        description="load the model, chat, save, reopen and check the saved cache is reused",
    )
    parser.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--n-ctx", type=int, default=None, help="context size in tokens")
    parser.add_argument("--max-tokens", type=int, default=8, help="reply length per turn")
    return parser


class _Report:
    """Prints one aligned line per step so a log or a terminal shows where time went."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def line(self, step: str, detail: str, ms: float | None = None) -> None:
        timing = f"{ms:8.0f} ms" if ms is not None else " " * 11
        print(f"{PREFIX} {step:<10} {timing}  {detail}", flush=True)

    def timed(self, step: str, action: Callable[[], T], describe: Callable[[T], str]) -> T:
        started = time.perf_counter()
        try:
            result = action()
        except SelfTestFailure:
            raise
        except Exception as error:  # report any failure as this step's, with its type
            raise SelfTestFailure(f"{step}: {type(error).__name__}: {error}") from error
        self.line(step, describe(result), (time.perf_counter() - started) * 1000)
        return result

    def total_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


def _environment(report: _Report) -> None:
    """Where the app runs from and where it would keep chats (platformdirs)."""
    from platformdirs import user_data_path

    frozen = getattr(sys, "_MEIPASS", None)
    where = f"bundle {frozen}" if frozen else f"python {sys.executable}"
    report.line("runtime", f"{where} (pid {os.getpid()})")
    data_dir = user_data_path("kvchat", appauthor=False)
    report.line("data dir", f"{data_dir} (platformdirs; this test uses a temporary folder)")


@contextmanager
def _data_dir() -> Iterator[Path]:
    """A throwaway folder so the test never touches the user's real chats."""
    with tempfile.TemporaryDirectory(prefix="kvchat-selftest-") as folder:
        yield Path(folder)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise SelfTestFailure(message)


def _llama_library() -> str:
    """Import llama.cpp and say which shared library was loaded: in a bundle it must be
    the bundled copy under ``_internal/llama_cpp/lib``, not something found on the system."""
    import llama_cpp

    import app.session.chat_session  # noqa: F401 - the import is what is being timed and checked

    library = getattr(getattr(llama_cpp, "llama_cpp", None), "_lib", None)
    path = getattr(library, "_name", "unknown library")
    return f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')}, {path}"


def _run(options: argparse.Namespace, report: _Report) -> None:
    """The steps in the order a user meets them: import, model, a session that chats and
    saves, then a second session on the same file that must restore and reuse it."""
    _environment(report)
    report.timed("import", _llama_library, str)
    model = _find_model(options, report)
    with _data_dir() as folder:
        db_path = folder / "chats.db"
        chat_id = _chat_and_save(db_path, model, options, report)
        report.line("close", f"engine and database closed ({db_path.stat().st_size / 1e6:.2f} MB)")
        _reopen_and_reuse(db_path, model, chat_id, options, report)


def _greedy(options: argparse.Namespace) -> GenerationOptions:
    from app.session.chat_session import GenerationOptions

    return GenerationOptions(max_tokens=options.max_tokens, temperature=0.0, seed=0)


def _find_model(options: argparse.Namespace, report: _Report) -> Path:
    """The GGUF named on the command line (checked), or the embedded model."""
    from app.core.models import check_gguf_file, default_model_path

    return report.timed(
        "model",
        lambda: check_gguf_file(options.model) if options.model else default_model_path(),
        lambda path: f"{path} ({path.stat().st_size / 1e6:.1f} MB)",
    )


def _open_session(
    step: str,
    store: Store,
    model: Path,
    options: argparse.Namespace,
    report: _Report,
    describe: Callable[[ChatSession], str],
) -> ChatSession:
    from app.session.chat_session import ChatSession

    return report.timed(step, lambda: ChatSession(store, model, n_ctx=options.n_ctx), describe)


def _chat_and_save(db_path: Path, model: Path, options: argparse.Namespace, report: _Report) -> int:
    """Load the model, one turn, then commit + warm-up + save; returns the chat's id."""
    from app.storage.store import Store

    with Store(db_path, exclusive=True) as store:
        engine = _open_session(
            "load", store, model, options, report,
            lambda made: f"{made.backend.info.description}, n_ctx {made.n_ctx}",
        )  # fmt: skip
        try:
            chat_id = store.create_chat("self-test").id
            first = report.timed(
                "turn 1",
                lambda: engine.send(chat_id, FIRST_MESSAGE, _greedy(options)),
                lambda result: (
                    f"prefilled {result.metrics.prefill_tokens}, "
                    f"generated {result.metrics.decode_tokens} tokens: {result.reply.strip()!r}"
                ),
            )
            _check(first.metrics.decode_tokens > 0, "turn 1: the model generated no tokens")
            metrics = report.timed(
                "save",
                lambda: engine.after_reply(chat_id),
                lambda done: (
                    f"commit {done.commit_tokens} + warm-up {done.warmup_tokens} tokens, "
                    f"state {done.state_bytes / 1e6:.2f} MB for {done.cache_tokens} tokens"
                    if done
                    else "no metrics"
                ),
            )
            _check(metrics is not None and metrics.state_bytes > 0, "save: no KV state was written")
        finally:
            engine.close()
    return chat_id


def _reopen_and_reuse(
    db_path: Path, model: Path, chat_id: int, options: argparse.Namespace, report: _Report
) -> None:
    """A "restart": a new session and store on the same file restore the saved state and
    the next turn reuses it."""
    from app.storage.store import Store

    with Store(db_path, exclusive=True) as store:
        engine = _open_session(
            "reopen", store, model, options, report,
            lambda _made: "new ChatSession + Store on the same file",
        )  # fmt: skip
        try:
            load = report.timed(
                "restore",
                lambda: engine.activate(chat_id),
                lambda state: (
                    f"restored {state.tokens} tokens"
                    if state.restored
                    else f"not restored ({state.rejected or 'no saved state'})"
                ),
            )
            _check(load.restored, f"restore: the saved state was not restored ({load.rejected})")
            second = report.timed(
                "turn 2",
                lambda: engine.send(chat_id, SECOND_MESSAGE, _greedy(options)),
                lambda result: (
                    f"reused {result.metrics.reused_tokens}, "
                    f"prefilled {result.metrics.prefill_tokens} tokens, "
                    f"TTFT {result.metrics.ttft_ms:.0f} ms"
                ),
            )
            _check(
                second.metrics.reused_tokens > 0,
                "turn 2: no cached tokens were reused after the restart",
            )
        finally:
            engine.close()


def run_self_test(args: list[str]) -> int:
    """Run every step; 0 when all pass, 1 (with the failing step) otherwise."""
    options = _parser().parse_args(args)
    report = _Report()
    try:
        _run(options, report)
    except SelfTestFailure as failure:
        print(f"{PREFIX} FAILED {failure} (after {report.total_ms() / 1000:.1f} s)", flush=True)
        return 1
    except Exception as error:  # anything outside a step: still one line, still exit 1
        print(f"{PREFIX} FAILED {type(error).__name__}: {error}", flush=True)
        return 1
    print(f"{PREFIX} passed in {report.total_ms() / 1000:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_self_test(sys.argv[1:]))
