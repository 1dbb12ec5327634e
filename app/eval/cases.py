"""The shipped eval cases (``cases.json`` beside this module) and the stratified sample.

A case is an instruction block holding verifiable instructions (IFEval ids and kwargs)
and a scripted chat of user questions; a recall probe states a fact in its first user
message and asks for it in its last. The IFEval prompt set lives on a data hub these
machines cannot reach, so the cases are the project's own.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from typing import Any

#: Ids sampled first, in this order, so that a small run still covers them.
FIRST_IDS = (
    "change_case:english_lowercase",
    "change_case:english_capital",
    "punctuation:no_comma",
    "startend:quotation",
)


@dataclass(frozen=True)
class Case:
    id: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]
    instructions: str  # the instruction block's text
    turns: tuple[str, ...]  # the user's messages, one per turn


@dataclass(frozen=True)
class RecallProbe:
    id: str
    instructions: str
    turns: tuple[str, ...]  # the fact is in the first, the question in the last
    answer: str


def _load() -> dict[str, Any]:
    text = resources.files("app.eval").joinpath("cases.json").read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def load_cases() -> list[Case]:
    return [
        Case(
            id=raw["id"],
            instruction_ids=tuple(raw["instruction_ids"]),
            kwargs=tuple(raw["kwargs"]),
            instructions=raw["instructions"],
            turns=tuple(raw["turns"]),
        )
        for raw in _load()["cases"]
    ]


def load_recall_probes() -> list[RecallProbe]:
    return [
        RecallProbe(raw["id"], raw["instructions"], tuple(raw["turns"]), raw["answer"])
        for raw in _load()["recall"]
    ]


def max_turns(cases: list[Case]) -> int:
    """The most turns every case can play."""
    return min(len(case.turns) for case in cases)


def stratified_sample(cases: list[Case], count: int | None, seed: int) -> list[Case]:
    """``count`` cases, every instruction id once before any id twice (None: all cases).

    The ids in ``FIRST_IDS`` come first, then the others in a seeded order; within an id
    the cases are in a seeded order too, so another seed gives another sample.
    """
    if count is None or count >= len(cases):
        return list(cases)
    rng = random.Random(seed)
    by_id: dict[str, list[Case]] = defaultdict(list)
    for case in cases:
        by_id[case.instruction_ids[0]].append(case)
    for group in by_id.values():
        rng.shuffle(group)
    others = sorted(set(by_id) - set(FIRST_IDS))
    rng.shuffle(others)
    order = [name for name in FIRST_IDS if name in by_id] + others
    picked: list[Case] = []
    depth = 0
    while len(picked) < count:
        for name in order:
            if depth < len(by_id[name]) and len(picked) < count:
                picked.append(by_id[name][depth])
        depth += 1
    return picked
