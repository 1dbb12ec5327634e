"""Smoke tests of the caching benchmark on the real embedded model, tiny sizes.

They check the report's shape and that reuse really happened (token counts are
exact), never timings: the CPU may be shared while tests run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from app.bench.config import (
    HISTORY_FIRST,
    HISTORY_FIRST_LIVE,
    HISTORY_FIRST_WARM,
    LIMIT,
    NAIVE,
    REOPEN,
    STRATEGIES,
    SYSTEM_FIRST_PREFIX,
    BenchConfig,
    TurnSample,
)
from app.bench.report import BenchReport, compute_checks, summarize
from app.bench.strategies import run_benchmark

ROOT = Path(__file__).resolve().parents[1]
# One thread: on a shared 2-core machine two llama.cpp threads spin against other jobs
# and the run takes 4x longer; the figures checked here are token counts, not times.
TINY = {
    "history_tokens": 160, "instruction_tokens": 40, "message_tokens": 16, "turns": 2,
    "max_tokens": 3, "n_ctx": 1024, "n_threads": 1,
}
CLI_TINY = [
    "--history-tokens", "160", "--instruction-tokens", "40", "--message-tokens", "16",
    "--turns", "2", "--max-tokens", "3", "--n-ctx", "1024", "--threads", "1",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench_run() -> tuple[BenchReport, list[TurnSample]]:
    seen: list[TurnSample] = []
    report = run_benchmark(BenchConfig(**TINY), on_turn=seen.append)
    return report, seen


def _check_shape(data: dict, turns: int) -> None:
    assert set(data["strategies"]) == set(STRATEGIES)
    for name in STRATEGIES:
        entry = data["strategies"][name]
        assert entry["turns"] == turns
        assert entry["median_ttft_ms"] > 0
        assert entry["max_ttft_ms"] >= entry["median_ttft_ms"]
        assert isinstance(entry["prefill_tokens"], int | float)
    assert "prefill_tokens" in data["units"]
    for name in STRATEGIES:
        assert data["ratios"]["vs_naive"][name] > 0
        assert data["ratios"]["vs_system_first_prefix"][name] > 0
    assert data["ratios"]["reopen_vs_reprefill"] > 0
    assert len(data["turns"]) == turns * len(STRATEGIES)
    assert {check["goal"] for check in data["checks"]}
    assert data["cancelled"] is False


def _check_reuse(data: dict) -> None:
    prefill = {name: entry["prefill_tokens"] for name, entry in data["strategies"].items()}
    # Warm history-first evaluates only the new message on the critical path.
    assert prefill[HISTORY_FIRST_WARM] < prefill[HISTORY_FIRST] < prefill[NAIVE]
    assert prefill[REOPEN] == prefill[HISTORY_FIRST_WARM]
    # An edit near the start of a system-first block leaves almost nothing to reuse.
    assert prefill[SYSTEM_FIRST_PREFIX] > 0.9 * prefill[NAIVE]
    assert data["strategies"][HISTORY_FIRST_WARM]["background_tokens"] > 0
    assert data["strategies"][NAIVE]["background_tokens"] == 0
    # The floor: the same messages on a warm cache, the block never edited.
    assert prefill[LIMIT] == prefill[HISTORY_FIRST_WARM]
    # Typed ahead: send evaluates only the prompt's last token again, for its logits.
    live = data["strategies"][HISTORY_FIRST_LIVE]
    assert live["prefill_tokens"] == 1
    assert all(typed > 0 for typed in live["typed_tokens"])
    # The correction (a word deleted and retyped) throws tokens away every turn.
    assert all(thrown > 0 for thrown in live["discarded_tokens"])
    assert data["ratios"]["vs_limit"][LIMIT] == 1.0


def test_api_report_shape_and_reuse(bench_run: tuple[BenchReport, list[TurnSample]]) -> None:
    report, seen = bench_run
    assert len(seen) == 2 * len(STRATEGIES)  # on_turn fired once per strategy and turn
    assert {sample.turn for sample in seen} == {0, 1}
    # edit_every 1 by default; the floor (limit) never edits its block
    assert all(sample.edit == (sample.strategy != LIMIT) for sample in seen)
    data = json.loads(report.to_json())
    _check_shape(data, turns=2)
    _check_reuse(data)
    reopen = report.summaries[REOPEN]
    assert reopen.state_load_ms is not None  # the state came back from SQLite every turn
    assert reopen.state_bytes > 0
    assert report.summaries[NAIVE].state_load_ms is None
    table = report.format_table()
    for name in STRATEGIES:
        assert name in table


def test_plot_writes_png(bench_run: tuple[BenchReport, list[TurnSample]], tmp_path: Path) -> None:
    from app.bench.plot import write_ttft_plot

    target = write_ttft_plot(bench_run[0], tmp_path / "ttft.png", width=600)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_json() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "app", "bench", *CLI_TINY, "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    data = json.loads(completed.stdout)  # stdout holds one JSON object and nothing else
    _check_shape(data, turns=2)
    _check_reuse(data)


def test_cancel_returns_partial_report() -> None:
    cancel = threading.Event()
    seen: list[TurnSample] = []

    def stop_after_first(sample: TurnSample) -> None:
        seen.append(sample)
        cancel.set()

    config = BenchConfig(
        n_ctx=1024, n_threads=1, history_tokens=80, instruction_tokens=20, message_tokens=10,
        turns=3, max_tokens=2, strategies=(NAIVE, HISTORY_FIRST_WARM),
    )
    report = run_benchmark(config, on_turn=stop_after_first, cancel=cancel)
    assert report.cancelled
    assert len(report.samples) == len(seen) == 1
    assert json.loads(report.to_json())["cancelled"] is True


def test_checks_follow_the_goals() -> None:
    def sample(name: str, ttft: float) -> TurnSample:
        return TurnSample(name, 0, True, ttft, 10, 0, 10, ttft, 1, 0, 0.0)

    summaries = {
        name: summarize(name, [sample(name, ttft)])
        for name, ttft in ((NAIVE, 1000.0), (SYSTEM_FIRST_PREFIX, 900.0),
                           (HISTORY_FIRST_WARM, 40.0), (REOPEN, 30.0))
    }
    checks = {c["goal"]: c["met"] for c in compute_checks(summaries, edit_every=1)}
    # 25x, 22.5x; reopen 33x < 50x; reopen 0.75x the warm TTFT <= 1.2x
    assert list(checks.values()) == [True, True, False, True]
    no_edit = compute_checks(summaries, edit_every=0)
    assert [c["met"] for c in no_edit] == [True, False, True]


def test_live_checks_compare_with_the_floor() -> None:
    def sample(name: str, ttft: float) -> TurnSample:
        return TurnSample(name, 0, True, ttft, 10, 0, 10, ttft, 1, 0, 0.0)

    summaries = {
        name: summarize(name, [sample(name, ttft)])
        for name, ttft in ((NAIVE, 10000.0), (HISTORY_FIRST_WARM, 109.0),
                           (HISTORY_FIRST_LIVE, 60.0), (LIMIT, 100.0))
    }
    checks = {c["goal"]: c["met"] for c in compute_checks(summaries, edit_every=1)}
    assert checks["history-first-live / limit TTFT (x slower)"] is False  # 0.6x > 0.5x
    assert checks["history-first-live vs naive (x faster)"] is True  # 167x
    assert checks["history-first-warm / limit TTFT (x slower)"] is True  # 1.09x


def test_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="unknown strategies"):
        run_benchmark(BenchConfig(strategies=("fast",)))
    with pytest.raises(ValueError, match="compared with naive"):
        run_benchmark(BenchConfig(strategies=(REOPEN,)))
