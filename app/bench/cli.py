"""``python -m app bench``: arguments, progress on stderr, the table or JSON on stdout."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from app.arguments import alternatives, positive_int, whole_number
from app.bench.config import STRATEGIES, BenchConfig, TurnSample
from app.bench.strategies import run_benchmark


def _strategy_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in STRATEGIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"use a comma-separated subset of {', '.join(STRATEGIES)}")
    return names


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench options (the model options --model/--kv-type/--n-ctx come from app.cli)."""
    defaults = BenchConfig()
    parser.add_argument("--history-tokens", type=positive_int, default=defaults.history_tokens,
                        help="size of the prefilled history (default %(default)s)")
    parser.add_argument("--instruction-tokens", type=positive_int,
                        default=defaults.instruction_tokens,
                        help="size of the instruction block (default %(default)s)")
    parser.add_argument("--message-tokens", type=positive_int, default=defaults.message_tokens,
                        help="size of each new user message (default %(default)s)")
    parser.add_argument("--turns", type=positive_int, default=defaults.turns,
                        help="measured turns (default %(default)s)")
    parser.add_argument("--edit-every", type=whole_number,
                        default=defaults.edit_every,
                        help="edit the instruction block every K turns; 0: never "
                        "(default %(default)s)")
    parser.add_argument("--max-tokens", type=positive_int, default=defaults.max_tokens,
                        help="reply tokens per turn, greedy (default %(default)s)")
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: all cores)")
    parser.add_argument("--strategies", type=_strategy_list, default=STRATEGIES,
                        help="comma-separated subset of: " + ", ".join(STRATEGIES))
    parser.add_argument("--server", metavar="URL",
                        help="play the strategies on this OpenAI-compatible server "
                        "(llama-server with --parallel 5 --slot-save-path DIR)")
    parser.add_argument("--server-model", metavar="NAME", help="model name on the server")
    parser.add_argument("--saves", type=_size_list, metavar="N,N,...",
                        help="instead: measure save and reopen costs at these history sizes "
                        "(e.g. 500,2000,4000,8000)")
    parser.add_argument("--branches", type=positive_int, metavar="N",
                        help="instead: N edits of the last question of a chat of"
                        " --history-tokens, each a branch; storage and reuse per branch")
    parser.add_argument("--gui-stall", action="store_true",
                        help="instead: how long the window's event loop is blocked during a"
                        " long prefill, a state save and a streaming reply (goal <= 50 ms)")
    parser.add_argument("--documents", action="store_true",
                        help="instead: two chats with the same document (second prefill,"
                        " storage) and independent questions from it (steps, TTFT)")
    parser.add_argument("--document-tokens", type=positive_int, default=1500,
                        help="document size for --documents (default %(default)s)")
    parser.add_argument("--questions", type=positive_int, default=10,
                        help="independent questions for --documents (default %(default)s)")
    parser.add_argument("--alternatives", type=alternatives, metavar="N",
                        help="instead: N sampled replies to one prompt against one reply "
                        "(wall time of each, and the ratio; goal <= 1.6 for N=3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--plot", metavar="FILE.png", help="write a chart of TTFT per turn")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        model_path=getattr(args, "model", None),
        n_ctx=getattr(args, "n_ctx", None),
        kv_type=getattr(args, "kv_type", "f16"),
        n_threads=args.threads,
        history_tokens=args.history_tokens,
        instruction_tokens=args.instruction_tokens,
        message_tokens=args.message_tokens,
        turns=args.turns,
        edit_every=args.edit_every,
        max_tokens=args.max_tokens,
        strategies=tuple(args.strategies),
        server_url=getattr(args, "server", None),
        server_model=getattr(args, "server_model", None),
    )


def _size_list(text: str) -> tuple[int, ...]:
    sizes = tuple(positive_int(part.strip()) for part in text.split(",") if part.strip())
    if not sizes:
        raise argparse.ArgumentTypeError("give history sizes in tokens, e.g. 500,2000")
    return sizes


def run_saves(args: argparse.Namespace) -> int:
    from app.bench.saves import format_saves, run_save_benchmark, saves_as_json

    def show(sample: object) -> None:
        print(f"bench: {sample}", file=sys.stderr, flush=True)

    samples = run_save_benchmark(
        getattr(args, "model", None), args.saves, n_threads=args.threads, on_sample=show
    )
    print(json.dumps(saves_as_json(samples)) if args.json else format_saves(samples))
    return 0


def run_branches(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from app.bench.saves import format_branches, run_branch_benchmark

    def show(sample: object) -> None:
        print(f"bench: {sample}", file=sys.stderr, flush=True)

    one_chat_mb, samples = run_branch_benchmark(
        getattr(args, "model", None), args.history_tokens, args.branches,
        block_tokens=args.instruction_tokens, n_threads=args.threads, on_sample=show,
    )
    if args.json:
        print(json.dumps({"one_chat_mb": one_chat_mb, "branches": [asdict(s) for s in samples]}))
    else:
        print(format_branches(one_chat_mb, samples))
    return 0


def run_documents(args: argparse.Namespace) -> int:
    from app.bench.documents import format_documents, run_document_benchmark

    def show(step: object) -> None:
        print(f"bench: {step}", file=sys.stderr, flush=True)

    report = run_document_benchmark(
        getattr(args, "model", None), args.document_tokens, args.questions,
        n_threads=args.threads, on_step=show,
    )  # fmt: skip
    print(report.as_json() if args.json else format_documents(report))
    return 0


def run_alternatives(args: argparse.Namespace) -> int:
    from app.bench.alternatives import run_alternatives_benchmark

    def show(run: object) -> None:
        print(f"bench: {run}", file=sys.stderr, flush=True)

    report = run_alternatives_benchmark(
        getattr(args, "model", None), args.alternatives, n_threads=args.threads, on_run=show
    )
    print(json.dumps(report.as_dict()) if args.json else report.format_table())
    return 0


def run_bench(args: argparse.Namespace) -> int:
    """``python -m app bench``: progress on stderr, the table (or one JSON object) on stdout."""
    if args.documents:
        return run_documents(args)
    if args.saves:
        return run_saves(args)
    if args.branches:
        return run_branches(args)
    if args.alternatives:
        return run_alternatives(args)
    config = config_from_args(args)
    plot_path: Path | None = None
    if args.plot:
        plot_path = Path(args.plot).expanduser()
        if not plot_path.parent.is_dir():
            raise ValueError(f"folder does not exist: {plot_path.parent}")

    def show_turn(sample: TurnSample) -> None:
        print(
            f"turn {sample.turn + 1}{'*' if sample.edit else ' '} {sample.strategy:<20} "
            f"TTFT {sample.ttft_ms:8.0f} ms  prefill {sample.prefill_tokens:5d}  "
            f"background {sample.background_tokens:5d}"
            + (f"  typed {sample.typed_tokens} (thrown away {sample.discarded_tokens})"
               if sample.typed_tokens else ""),
            file=sys.stderr,
            flush=True,
        )

    def show_status(text: str) -> None:
        if not text.startswith("turn "):
            print(f"bench: {text}", file=sys.stderr, flush=True)

    report = run_benchmark(config, on_turn=show_turn, on_status=show_status)
    if plot_path is not None:
        from app.bench.plot import write_ttft_plot  # Qt only when a chart is asked for

        write_ttft_plot(report, plot_path)
    if args.json:
        print(report.to_json())
    else:
        print(report.format_table())
    return 0
