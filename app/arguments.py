"""argparse value types shared by every command (one wording for every bad number)."""

from __future__ import annotations

import argparse


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from error


def positive_int(text: str) -> int:
    """A count that must be at least 1."""
    value = _whole(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
    return value


def whole_number(text: str) -> int:
    """A count where 0 is meaningful (e.g. "never")."""
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value
