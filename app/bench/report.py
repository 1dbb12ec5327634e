"""Summaries, ratios, goal checks and the text tables of a benchmark run."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from app.bench.config import (
    DESCRIPTIONS,
    HISTORY_FIRST_LIVE,
    HISTORY_FIRST_WARM,
    LIMIT,
    NAIVE,
    REOPEN,
    SYSTEM_FIRST_PREFIX,
    BenchConfig,
    TurnSample,
)

#: Goals of the issue, checked on every run (they are meant for the default sizes).
GOAL_WARM_VS_NAIVE = 20.0
GOAL_WARM_VS_SYSTEM_FIRST = 15.0
GOAL_NO_EDIT_SLOWDOWN = 1.3
GOAL_REOPEN = 50.0
#: A reopened chat (its state restored when selected) answers about as fast as one that
#: never left memory.
GOAL_REOPEN_VS_WARM = 1.2
#: The message prefilled while it is typed: below the floor of a client that starts at
#: send, and far below a stateless client; warm-up alone reaches that floor.
GOAL_LIVE_VS_LIMIT = 0.5
GOAL_LIVE_VS_NAIVE = 120.0
GOAL_WARM_VS_LIMIT = 1.1


@dataclass
class StrategySummary:
    """Per-strategy figures over the measured turns (``prefill_tokens``: median per turn)."""

    name: str
    description: str
    turns: int
    median_ttft_ms: float | None
    max_ttft_ms: float | None
    min_ttft_ms: float | None
    median_ttft_edit_ms: float | None
    median_ttft_no_edit_ms: float | None
    prefill_tokens: float | None
    prefill_tokens_total: int
    background_tokens: float | None
    background_tokens_total: int
    prompt_tokens: float | None
    state_bytes: int
    state_save_ms: float | None
    state_load_ms: float | None
    ttft_ms: list[float] = field(default_factory=list)
    #: Live prefill: tokens evaluated while typing, and thrown away, per measured turn.
    typed_tokens: list[int] = field(default_factory=list)
    discarded_tokens: list[int] = field(default_factory=list)


@dataclass
class BenchReport:
    config: dict[str, Any]
    model: dict[str, Any]
    script: dict[str, Any]
    samples: list[TurnSample]
    summaries: dict[str, StrategySummary]
    ratios: dict[str, Any]
    checks: list[dict[str, Any]]
    setup_s: float
    elapsed_s: float
    cancelled: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "units": {
                "ttft_ms": "engine-reported time to first token, per measured turn",
                "prefill_tokens": "median per measured turn, critical path",
                "background_tokens": "median per measured turn, commit + warm-up",
                "ratios": "reference median TTFT / strategy median TTFT (> 1: faster)",
            },
            "config": self.config,
            "model": self.model,
            "script": self.script,
            "strategies": {name: asdict(summary) for name, summary in self.summaries.items()},
            "ratios": self.ratios,
            "checks": self.checks,
            "turns": [asdict(sample) for sample in self.samples],
            "setup_s": round(self.setup_s, 2),
            "elapsed_s": round(self.elapsed_s, 2),
            "cancelled": self.cancelled,
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(_rounded(self.as_dict()), ensure_ascii=False, indent=indent)

    def format_table(self) -> str:
        return format_report(self)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value



def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def summarize(name: str, samples: list[TurnSample]) -> StrategySummary:
    ttft = [s.ttft_ms for s in samples]
    saves = [s.state_save_ms for s in samples if s.state_save_ms is not None]
    loads = [s.state_load_ms for s in samples if s.state_load_ms is not None]
    return StrategySummary(
        name=name,
        description=DESCRIPTIONS[name],
        turns=len(samples),
        median_ttft_ms=_median(ttft),
        max_ttft_ms=max(ttft) if ttft else None,
        min_ttft_ms=min(ttft) if ttft else None,
        median_ttft_edit_ms=_median([s.ttft_ms for s in samples if s.edit]),
        median_ttft_no_edit_ms=_median([s.ttft_ms for s in samples if not s.edit]),
        prefill_tokens=_median([s.prefill_tokens for s in samples]),
        prefill_tokens_total=sum(s.prefill_tokens for s in samples),
        background_tokens=_median([s.background_tokens for s in samples]),
        background_tokens_total=sum(s.background_tokens for s in samples),
        prompt_tokens=_median([s.prompt_tokens for s in samples]),
        state_bytes=max((s.state_bytes for s in samples), default=0),
        state_save_ms=_median(saves),
        state_load_ms=_median(loads),
        ttft_ms=ttft,
        typed_tokens=[s.typed_tokens for s in samples],
        discarded_tokens=[s.discarded_tokens for s in samples],
    )


def _ratio(reference: float | None, value: float | None) -> float | None:
    if reference is None or value is None or value <= 0:
        return None
    return reference / value


def compute_ratios(summaries: dict[str, StrategySummary]) -> dict[str, Any]:
    """Speed-ups: reference median TTFT / strategy median TTFT, all turns and edit turns."""
    ratios: dict[str, Any] = {}
    for key, reference in (("naive", NAIVE), ("system_first_prefix", SYSTEM_FIRST_PREFIX)):
        base = summaries.get(reference)
        if base is None:
            continue
        ratios[f"vs_{key}"] = {
            name: _ratio(base.median_ttft_ms, s.median_ttft_ms) for name, s in summaries.items()
        }
        if base.median_ttft_edit_ms is not None:
            ratios[f"edit_turns_vs_{key}"] = {
                name: _ratio(base.median_ttft_edit_ms, s.median_ttft_edit_ms)
                for name, s in summaries.items()
            }
    if LIMIT in summaries:
        floor = summaries[LIMIT].median_ttft_ms
        ratios["vs_limit"] = {  # < 1: faster than the floor of a client starting at send
            name: _ratio(s.median_ttft_ms, floor) for name, s in summaries.items()
        }
    if REOPEN in summaries and NAIVE in summaries:
        ratios["reopen_vs_reprefill"] = _ratio(
            summaries[NAIVE].median_ttft_ms, summaries[REOPEN].median_ttft_ms
        )
    return ratios


def compute_checks(summaries: dict[str, StrategySummary], edit_every: int) -> list[dict[str, Any]]:
    """The issue's acceptance goals, evaluated on whatever sizes were run."""
    checks: list[dict[str, Any]] = []

    def add(goal: str, value: float | None, target: float, at_least: bool) -> None:
        met = None if value is None else (value >= target if at_least else value <= target)
        checks.append({"goal": goal, "value": value, "target": target, "met": met})

    warm = summaries.get(HISTORY_FIRST_WARM)
    naive = summaries.get(NAIVE)
    prefix = summaries.get(SYSTEM_FIRST_PREFIX)
    if warm is not None and edit_every > 0:
        if naive is not None:
            add("history-first-warm vs naive, edit turns (x faster)",
                _ratio(naive.median_ttft_edit_ms, warm.median_ttft_edit_ms),
                GOAL_WARM_VS_NAIVE, True)
        if prefix is not None:
            add("history-first-warm vs system-first-prefix, edit turns (x faster)",
                _ratio(prefix.median_ttft_edit_ms, warm.median_ttft_edit_ms),
                GOAL_WARM_VS_SYSTEM_FIRST, True)
    if warm is not None and prefix is not None and edit_every == 0:
        add("history-first-warm / system-first-prefix TTFT, no edits (x slower)",
            _ratio(warm.median_ttft_ms, prefix.median_ttft_ms), GOAL_NO_EDIT_SLOWDOWN, False)
    if REOPEN in summaries and naive is not None:
        add("reopen vs re-prefill of the same history (x faster)",
            _ratio(naive.median_ttft_ms, summaries[REOPEN].median_ttft_ms), GOAL_REOPEN, True)
    if REOPEN in summaries and warm is not None:
        add("reopen / history-first-warm TTFT (x slower)",
            _ratio(summaries[REOPEN].median_ttft_ms, warm.median_ttft_ms),
            GOAL_REOPEN_VS_WARM, False)
    _live_checks(summaries, add)
    return checks


def _live_checks(
    summaries: dict[str, StrategySummary], add: Callable[[str, float | None, float, bool], None]
) -> None:
    """The live prefill's goals: against the floor of a client that starts at send."""
    live, limit = summaries.get(HISTORY_FIRST_LIVE), summaries.get(LIMIT)
    warm, naive = summaries.get(HISTORY_FIRST_WARM), summaries.get(NAIVE)
    if live is not None and limit is not None:
        add("history-first-live / limit TTFT (x slower)",
            _ratio(live.median_ttft_ms, limit.median_ttft_ms), GOAL_LIVE_VS_LIMIT, False)
    if live is not None and naive is not None:
        add("history-first-live vs naive (x faster)",
            _ratio(naive.median_ttft_ms, live.median_ttft_ms), GOAL_LIVE_VS_NAIVE, True)
    if warm is not None and limit is not None:
        add("history-first-warm / limit TTFT (x slower)",
            _ratio(warm.median_ttft_ms, limit.median_ttft_ms), GOAL_WARM_VS_LIMIT, False)


# -- the run -------------------------------------------------------------------------



def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def format_report(report: BenchReport) -> str:
    """The human-readable tables: TTFT per turn, per-strategy summary, ratios, goals."""
    config, script = report.config, report.script
    every = config["edit_every"]
    edits = {0: "never edited", 1: "edited every turn"}.get(every, f"edited every {every} turns")
    lines = [
        f"KV Chat bench: {report.model['file']} ({report.model['description']}), "
        f"n_ctx {report.model['n_ctx']}, kv {report.model['kv_type']}, "
        f"{report.model['n_threads']} threads",
        f"history {script['history_tokens']} tokens, instruction block {script['block_tokens']} "
        f"tokens ({edits}), messages <= {script['max_message_tokens']} tokens, "
        f"{config['turns']} turns, replies <= {config['max_tokens']} tokens (greedy)",
        f"set-up {report.setup_s:.1f} s, total {report.elapsed_s:.1f} s"
        + ("  [CANCELLED: partial results]" if report.cancelled else ""),
        "",
        "TTFT per turn (ms; * = instruction edit before the turn)",
    ]
    names = list(report.summaries)
    width = max(len(name) for name in names) + 2
    turns = max((s.turns for s in report.summaries.values()), default=0)
    edit_flags = {s.turn: s.edit for s in report.samples}
    header = "".join(
        f"{('*' if edit_flags.get(t) else '') + 't' + str(t + 1):>9}" for t in range(turns)
    )
    lines.append(f"{'strategy':<{width}}{header}")
    for name in names:
        values = "".join(f"{v:>9.0f}" for v in report.summaries[name].ttft_ms)
        lines.append(f"{name:<{width}}{values}")
    lines.append("")
    lines.append(
        f"{'strategy':<{width}}{'median':>9}{'max':>9}{'prefill':>9}{'backgr.':>9}"
        f"{'prompt':>8}{'state':>9}{'save':>7}{'load':>7}{'x naive':>9}{'x sys-1st':>10}"
    )
    lines.append(
        f"{'':<{width}}{'TTFT ms':>9}{'TTFT ms':>9}{'tok/turn':>9}{'tok/turn':>9}"
        f"{'tokens':>8}{'MB':>9}{'ms':>7}{'ms':>7}{'':>9}{'':>10}"
    )
    vs_naive = report.ratios.get("vs_naive", {})
    vs_prefix = report.ratios.get("vs_system_first_prefix", {})
    for name in names:
        s = report.summaries[name]
        lines.append(
            f"{name:<{width}}{_fmt(s.median_ttft_ms):>9}{_fmt(s.max_ttft_ms):>9}"
            f"{_fmt(s.prefill_tokens):>9}{_fmt(s.background_tokens):>9}{_fmt(s.prompt_tokens):>8}"
            f"{_fmt(s.state_bytes / 1e6 if s.state_bytes else None, 1):>9}"
            f"{_fmt(s.state_save_ms):>7}{_fmt(s.state_load_ms):>7}"
            f"{_fmt_ratio(vs_naive.get(name)):>9}{_fmt_ratio(vs_prefix.get(name)):>10}"
        )
    lines.append("(prefill / background: median tokens per turn; x: reference median TTFT / "
                 "strategy median TTFT)")
    for key, label in (("edit_turns_vs_naive", "edit turns, x naive"),
                       ("edit_turns_vs_system_first_prefix", "edit turns, x system-first-prefix")):
        if key in report.ratios and config["edit_every"] > 1:
            values = ", ".join(f"{n} {_fmt_ratio(v)}" for n, v in report.ratios[key].items())
            lines.append(f"{label}: {values}")
    live = report.summaries.get(HISTORY_FIRST_LIVE)
    if live is not None and live.typed_tokens:
        lines.append(
            f"{HISTORY_FIRST_LIVE} while typing, per turn: evaluated "
            f"{', '.join(map(str, live.typed_tokens))} tokens; thrown away "
            f"{', '.join(map(str, live.discarded_tokens))} (the correction and word ends)"
        )
    if report.ratios.get("reopen_vs_reprefill") is not None:
        lines.append(
            f"reopen vs re-prefill of the same history: "
            f"{report.ratios['reopen_vs_reprefill']:.1f}x faster"
        )
    if report.checks:
        lines.append("")
        lines.append("goals (set for the default sizes):")
        for check in report.checks:
            mark = {True: "met", False: "MISSED", None: "n/a"}[check["met"]]
            relation = "<=" if "slower" in check["goal"] else ">="
            lines.append(
                f"  [{mark}] {check['goal']}: {_fmt(check['value'], 1)} "
                f"(goal {relation} {check['target']:g})"
            )
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------


def build_report(
    config: BenchConfig,
    model: dict[str, Any],
    script: dict[str, Any],
    samples: list[TurnSample],
    setup_s: float,
    elapsed_s: float,
    cancelled: bool,
) -> BenchReport:
    summaries = {
        name: summarize(name, [s for s in samples if s.strategy == name])
        for name in config.strategies
    }
    config_data = {key: value for key, value in asdict(config).items() if key != "model_path"}
    config_data["strategies"] = list(config.strategies)
    config_data["db_path"] = str(config.db_path) if config.db_path else None
    return BenchReport(
        config=config_data,
        model=model,
        script=script,
        samples=samples,
        summaries=summaries,
        ratios=compute_ratios(summaries),
        checks=compute_checks(summaries, config.edit_every),
        setup_s=setup_s,
        elapsed_s=elapsed_s,
        cancelled=cancelled,
    )
