"""``python -m app eval``: progress on stderr, the table (or one JSON object) on stdout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.arguments import positive_int, whole_number
from app.eval.report import EvalReport
from app.eval.runner import DEFAULT_MAX_TOKENS, LAYOUTS, EvalConfig, Progress, run_eval


def _layout_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names or any(name not in LAYOUTS for name in names):
        raise argparse.ArgumentTypeError(f"use a comma-separated subset of {', '.join(LAYOUTS)}")
    return tuple(dict.fromkeys(names))


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Eval options (the model options --model/--kv-type/--n-ctx come from app.cli)."""
    parser.add_argument(
        "--layouts",
        type=_layout_list,
        default=LAYOUTS,
        help="comma-separated subset of: " + ", ".join(LAYOUTS),
    )
    parser.add_argument(
        "--cases",
        type=positive_int,
        metavar="N",
        help="N cases, every instruction id before any repeats (default: all)",
    )
    parser.add_argument(
        "--turns",
        type=positive_int,
        default=3,
        help="turns per chat; the last is the scored one (default %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=whole_number,
        default=0,
        help="picks the --cases sample (replies are greedy; default %(default)s)",
    )
    parser.add_argument(
        "--max-tokens",
        type=positive_int,
        default=DEFAULT_MAX_TOKENS,
        help="reply tokens per turn (default %(default)s)",
    )
    parser.add_argument(
        "--probes",
        type=whole_number,
        metavar="N",
        help="recall probes per layout (default: all shipped; 0: none)",
    )
    parser.add_argument(
        "--threads", type=positive_int, help="CPU threads (default: all cores but one)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON report to FILE")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(
        model_path=args.model,
        n_ctx=args.n_ctx,
        kv_type=args.kv_type,
        n_threads=args.threads,
        layouts=tuple(args.layouts),
        cases=args.cases,
        turns=args.turns,
        seed=args.seed,
        max_tokens=args.max_tokens,
        probes=args.probes,
    )


def run_eval_command(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser() if args.out else None
    if out is not None and not out.parent.is_dir():
        raise ValueError(f"folder does not exist: {out.parent}")

    def show(progress: Progress) -> None:
        result = progress.result
        verdict = "ok  " if result.followed else "FAIL"
        print(
            f"eval: {progress.done}/{progress.total} {verdict} {result.layout:<24} "
            f"{result.case} turn {result.turn}",
            file=sys.stderr,
            flush=True,
        )

    def status(text: str) -> None:
        if not text.startswith("case "):
            print(f"eval: {text}", file=sys.stderr, flush=True)

    report: EvalReport = run_eval(config_from_args(args), on_result=show, on_status=status)
    if out is not None:
        out.write_text(report.to_json() + "\n", encoding="utf-8")
    print(report.to_json() if args.json else report.format_table())
    return 0
