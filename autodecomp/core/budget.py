"""Budgets: the one parser of a MAC / parameter limit, wherever a user writes one.

Accepted forms (case-insensitive): a fraction of the baseline (``0.5``, ``"50%"``,
``"0.5x"``) or an absolute count (``700000``, ``"700k"``, ``"2.5M"``, ``"1g"``). A plain
number <= 1 is a fraction, a larger one a count. The parsed budget is that number (a
fraction <= 1 or a count > 1), the form study configs have always stored.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError

__all__ = ["absolute_limit", "parse_budget"]

_SUFFIXES = {"k": 1e3, "m": 1e6, "g": 1e9}
_FORMS = (
    "a fraction of the baseline (0.5, '50%', '0.5x') or an absolute count (700000, '700k', '2.5M')"
)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    try:
        if text.endswith("%"):
            number = float(text[:-1]) / 100
            return number if number <= 1 else None
        if text.endswith("x"):
            number = float(text[:-1])
            return number if number <= 1 else None
        if text and text[-1] in _SUFFIXES:
            return float(text[:-1]) * _SUFFIXES[text[-1]]
        return float(text)
    except ValueError:
        return None


def parse_budget(value: Any, where: str = "budget") -> float | None:
    """``None``, a fraction of the baseline (<= 1) or an absolute count (> 1).

    Raises:
        ConfigError: not a positive number in one of the accepted forms.
    """
    if value is None:
        return None
    number = _number(value)
    if number is None or not (number > 0 and math.isfinite(number)):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ConfigError(f"{where} must be {_FORMS}, got {shown}")
    return number


def absolute_limit(budget: float, baseline: float) -> float:
    """The absolute limit of a parsed budget against the baseline's count."""
    return budget * baseline if budget <= 1 else budget
