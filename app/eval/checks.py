"""Verdicts: IFEval's own instruction checkers (from ``if-verifiable``) and exact recall.

Why a maintained package: IFEval's checkers are the reference for these instruction ids;
writing our own would measure something else under the same names. The package's one
checker that needs downloaded data (``length_constraints:number_sentences`` loads NLTK's
trained punkt model, which these machines cannot download) gets NLTK's punkt sentence
splitter with its default parameters instead: it ships with NLTK and splits at sentence
punctuation followed by a new sentence, which is what the shipped cases ask for.
``change_case:capital_word_frequency`` (NLTK's ``punkt_tab``) is not used by any case.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

#: Checkers whose data would have to be downloaded: no case may use them.
NEEDS_DOWNLOADED_DATA = frozenset({"change_case:capital_word_frequency"})


@functools.cache
def _ifeval() -> tuple[ModuleType, dict[str, Any]]:
    """Import the checkers once (the package is heavy to import: only when a verdict is due)."""
    from if_verifiable.ifeval import instructions_util
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    splitter = PunktSentenceTokenizer()  # default parameters: no data file to load
    instructions_util._get_sentence_tokenizer = lambda: splitter
    return instructions_util, dict(INSTRUCTION_DICT)


def instruction_ids() -> list[str]:
    """Every IFEval instruction id the checkers know."""
    return sorted(_ifeval()[1])


def _checker(instruction_id: str, kwargs: Mapping[str, Any]) -> Any:
    registry = _ifeval()[1]
    if instruction_id not in registry:
        raise ValueError(f"unknown IFEval instruction id: {instruction_id}")
    if instruction_id in NEEDS_DOWNLOADED_DATA:
        raise ValueError(f"{instruction_id} needs NLTK data that cannot be downloaded here")
    checker = registry[instruction_id](instruction_id)
    # As IFEval's evaluation does: unset arguments are left out (the checker would
    # otherwise draw random ones, so every case gives all of its own).
    checker.build_description(**{k: v for k, v in kwargs.items() if v is not None})
    return checker


def validate(instruction_ids_: Sequence[str], kwargs: Sequence[Mapping[str, Any]]) -> None:
    """Refuse a case whose ids or arguments the checkers would not accept."""
    if len(instruction_ids_) != len(kwargs) or not instruction_ids_:
        raise ValueError("a case needs one kwargs object per instruction id")
    for instruction_id, arguments in zip(instruction_ids_, kwargs, strict=True):
        try:
            _checker(instruction_id, arguments)
        except TypeError as error:
            raise ValueError(f"{instruction_id}: {error}") from error


def follows(
    instruction_ids_: Sequence[str], kwargs: Sequence[Mapping[str, Any]], reply: str
) -> bool:
    """IFEval's strict verdict: a non-empty reply that passes every instruction's check."""
    if not reply.strip():
        return False
    return all(
        _checker(instruction_id, arguments).check_following(reply)
        for instruction_id, arguments in zip(instruction_ids_, kwargs, strict=True)
    )


def _folded(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def recalls(answer: str, reply: str) -> bool:
    """Exact recall: the fact appears in the reply as a whole word (case-insensitive)."""
    pattern = r"(?<!\w)" + re.escape(_folded(answer)) + r"(?!\w)"
    return re.search(pattern, _folded(reply)) is not None
