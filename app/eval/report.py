"""What an eval run produced: verdicts per layout, Wilson intervals, agreement, JSON, table.

Every rate is computed here from the verdicts themselves (the mean of the booleans), so a
rate and its count can never disagree, and the interval is Wilson's score interval, which
always holds the rate (unlike the normal approximation near 0 or 1, where small models
and small samples live).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

from app.storage.records import EvalRate

#: Wilson's z for a 95% interval.
Z95 = NormalDist().inv_cdf(0.975)


def wilson(followed: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The 95% score interval of a proportion; (0, 1) when there is nothing to measure."""
    if total <= 0:
        return 0.0, 1.0
    rate = followed / total
    denominator = 1 + z * z / total
    centre = (rate + z * z / (2 * total)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / total + z * z / (4 * total * total)) / denominator
    # Clamped to the rate itself: rounding must not leave 0 or 1 just outside.
    return min(max(0.0, centre - half), rate), max(min(1.0, centre + half), rate)


def mean(verdicts: list[bool]) -> float | None:
    return sum(verdicts) / len(verdicts) if verdicts else None


@dataclass(frozen=True)
class CaseResult:
    """One scored reply: a case's turn under one layout (``probe``: a recall probe's last turn)."""

    layout: str
    case: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]
    turn: int  # 1-based
    reply: str
    followed: bool
    finish: str = "stop"
    probe: bool = False


@dataclass(frozen=True)
class LayoutSummary:
    cases: int
    followed: int
    rate: float | None
    ci95: tuple[float, float]

    @classmethod
    def of(cls, verdicts: list[bool]) -> LayoutSummary:
        followed = sum(verdicts)
        return cls(len(verdicts), followed, mean(verdicts), wilson(followed, len(verdicts)))


@dataclass
class EvalReport:
    model: dict[str, Any]
    layouts: tuple[str, ...]
    turns: int
    seed: int
    max_tokens: int
    results: list[CaseResult] = field(default_factory=list)
    elapsed_s: float = 0.0
    cancelled: bool = False

    # -- derived figures (always from the results) ----------------------------------

    def scored(self, layout: str, turn: int | None = None) -> list[CaseResult]:
        """A layout's instruction verdicts at ``turn`` (default: the last, the scored one)."""
        turn = self.turns if turn is None else turn
        return [r for r in self.results if r.layout == layout and r.turn == turn and not r.probe]

    def summary(self, layout: str, turn: int | None = None) -> LayoutSummary:
        return LayoutSummary.of([r.followed for r in self.scored(layout, turn)])

    def recall(self, layout: str) -> LayoutSummary:
        return LayoutSummary.of(
            [r.followed for r in self.results if r.layout == layout and r.probe]
        )

    def truncated(self, layout: str) -> int:
        """Scored replies that hit max_tokens (judged as they are, cut short)."""
        return sum(r.finish == "length" for r in self.scored(layout))

    def failures(self, layout: str) -> list[CaseResult]:
        return [r for r in self.scored(layout) if not r.followed]

    def agreement(self, turn: int | None = None) -> dict[str, dict[str, Any]]:
        """Per pair of layouts, over the cases both scored at ``turn`` (default: the last):
        how often they got the same verdict, and the very same greedy reply."""
        out: dict[str, dict[str, Any]] = {}
        for first, second in itertools.combinations(self.layouts, 2):
            left = {r.case: r for r in self.scored(first, turn)}
            right = {r.case: r for r in self.scored(second, turn)}
            common = sorted(left.keys() & right.keys())
            out[f"{first} vs {second}"] = {
                "cases": len(common),
                "same_verdict": mean([left[c].followed == right[c].followed for c in common]),
                "same_reply": mean([left[c].reply == right[c].reply for c in common]),
            }
        return out

    def instruction_rates(self, layout: str) -> dict[str, float | None]:
        """Rate per instruction id at the scored turn (small counts: a hint, not a result)."""
        by_id: dict[str, list[bool]] = {}
        for r in self.scored(layout):
            for instruction_id in r.instruction_ids:
                by_id.setdefault(instruction_id, []).append(r.followed)
        return {name: mean(verdicts) for name, verdicts in sorted(by_id.items())}

    def rates(self) -> list[EvalRate]:
        """Per layout, what the chats database keeps as the model's last measured rates."""
        rates = []
        for name in self.layouts:
            summary, recall = self.summary(name), self.recall(name)
            rates.append(
                EvalRate(
                    name,
                    summary.cases,
                    summary.followed,
                    *summary.ci95,
                    recall=recall.rate,
                    turns=self.turns,
                )
            )
        return rates

    # -- output -----------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        def summary(s: LayoutSummary) -> dict[str, Any]:
            return {"cases": s.cases, "followed": s.followed, "rate": s.rate, "ci95": list(s.ci95)}

        return {
            "model": self.model,
            "turns": self.turns,
            "scored_turn": self.turns,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
            "elapsed_s": round(self.elapsed_s, 1),
            "cancelled": self.cancelled,
            "layouts": {
                name: {**summary(self.summary(name)), "truncated": self.truncated(name)}
                for name in self.layouts
            },
            "first_turn": {name: summary(self.summary(name, 1)) for name in self.layouts},
            "recall": {name: self.recall(name).rate for name in self.layouts},
            "recall_detail": {name: summary(self.recall(name)) for name in self.layouts},
            "agreement": self.agreement(),
            "agreement_first_turn": self.agreement(1),
            "by_instruction": {name: self.instruction_rates(name) for name in self.layouts},
            "results": [_result_dict(r) for r in self.results],
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), ensure_ascii=False)

    def format_table(self) -> str:
        """The per-layout table, then agreement: what the CLI prints."""
        lines = [
            f"{self.model.get('file', '?')}: {len(self.scored(self.layouts[0]))} cases,"
            f" scored on turn {self.turns} of {self.turns}, greedy, {self.elapsed_s:.0f} s"
            + (" (stopped early)" if self.cancelled else ""),
            f"{'layout':<26} {'followed':>9} {'rate':>6} {'95% CI':>13} {'turn 1':>7}"
            f" {'recall':>7} {'cut':>4}",
        ]
        for name in self.layouts:
            s, first, recall = self.summary(name), self.summary(name, 1), self.recall(name)
            lines.append(
                f"{name:<26} {s.followed:>4}/{s.cases:<4} {_pct(s.rate):>6}"
                f" {_pct(s.ci95[0]):>6}-{_pct(s.ci95[1]):<6} {_pct(first.rate):>7}"
                f" {_pct(recall.rate):>7} {self.truncated(name):>4}"
            )
        lines.append("agreement at the scored turn (same verdict, same reply):")
        for pair, figures in self.agreement().items():
            lines.append(
                f"  {pair:<52} {_pct(figures['same_verdict']):>6} {_pct(figures['same_reply']):>6}"
            )
        return "\n".join(lines)


def _result_dict(result: CaseResult) -> dict[str, Any]:
    data = asdict(result)
    data["instruction_ids"] = list(result.instruction_ids)
    data["kwargs"] = list(result.kwargs)
    return data


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"
