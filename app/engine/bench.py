"""Benchmark of caching strategies (filled in below)."""

from __future__ import annotations

import argparse


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true")


def run_bench(args: argparse.Namespace) -> int:
    raise NotImplementedError
