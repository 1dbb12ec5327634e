"""The benchmark's scripted conversation: deterministic text sized in model tokens."""

from __future__ import annotations

import random
from collections.abc import Callable

_SUBJECTS = (
    "the north bed", "the tomato seedlings", "our compost pile", "the rain barrel",
    "the tool shed", "the volunteer schedule", "the soil test", "the herb spiral",
    "the bean trellis", "the irrigation line", "the seed budget", "the school group",
    "the greenhouse door", "the pumpkin patch", "the bee hotel", "the mulch delivery",
)
_VERBS = (
    "needs", "depends on", "benefits from", "competes with", "should come before",
    "is limited by", "could share", "would improve with", "has to wait for", "works well with",
)
_OBJECTS = (
    "more morning light", "a thicker layer of mulch", "weekly watering", "a cheaper supplier",
    "two extra volunteers", "a sturdier fence", "the new wheelbarrow", "better drainage",
    "a written checklist", "the spare hoses", "a second key", "an earlier start",
)
_TAILS = (
    "before the first frost", "according to last year's notes", "if the budget allows",
    "during the dry weeks", "once the paths are finished", "on Saturday mornings",
    "after the council meeting", "while the days are still long",
)
_QUESTIONS = (
    "Could you check whether", "Do you think", "Please tell me if", "I wonder whether",
    "Would it be sensible to say that", "Can we agree that",
)
_PERSONAS = (
    "a patient head gardener", "a careful project planner", "a cheerful volunteer coach",
    "a frugal treasurer", "a strict safety officer", "a curious botanist",
    "a busy school teacher", "a retired farmer",
)
_TONES = ("calm", "brisk", "friendly", "formal", "playful", "plain")


class Script:
    """Deterministic texts sized in tokens of the benchmark's model."""

    def __init__(self, count: Callable[[str], int], seed: int) -> None:
        self._count = count
        self._rng = random.Random(seed)

    def _sentence(self) -> str:
        rng = self._rng
        text = " ".join(rng.choice(words) for words in (_SUBJECTS, _VERBS, _OBJECTS, _TAILS))
        return text[0].upper() + text[1:] + "."

    def _question(self) -> str:
        rng = self._rng
        return (
            f"{rng.choice(_QUESTIONS)} {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} "
            f"{rng.choice(_OBJECTS)} {rng.choice(_TAILS)}?"
        )

    def _fill(self, parts: list[str], target: int, make: Callable[[], str], sep: str = " ") -> str:
        """Whole sentences up to ``target`` tokens, then words off the end to land on it."""
        text = sep.join(parts)
        while self._count(text) < target:
            parts.append(make())
            text = sep.join(parts)
        words = text.split(" ")
        while len(words) > 1 and self._count(" ".join(words)) > target:
            words.pop()
        return " ".join(words)

    def user_message(self, target: int) -> str:
        return self._fill([self._question()], target, self._sentence)

    def reply(self, target: int) -> str:
        return self._fill(["Here is what I would suggest."], target, self._sentence)

    def rules(self, target: int) -> str:
        counter = iter(range(1, 10_000))
        return self._fill([], target, lambda: f"Rule {next(counter)}: {self._sentence()}", "\n")


def block_text(rules: str, revision: int) -> str:
    """The instruction block; the revision line comes first so an edit breaks prefix reuse."""
    persona = _PERSONAS[revision % len(_PERSONAS)]
    tone = _TONES[revision % len(_TONES)]
    return (
        f"Revision {revision}. For this reply act as {persona} and keep a {tone} tone.\n"
        f"You help a neighbourhood plan its community garden. Follow these rules:\n{rules}"
    )


# -- strategies ----------------------------------------------------------------------

