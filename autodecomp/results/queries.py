"""Questions to a study: the best trial under a budget or within an accuracy drop.

Budgets (``--max-macs`` / ``--max-params``) take the forms of
:mod:`autodecomp.core.budget`: a number <= 1, ``"50%"`` or ``"0.5x"`` is a fraction of the
baseline, a larger number or ``"300k"`` / ``"2.5M"`` / ``"1G"`` an absolute count. An
accuracy-drop tolerance (``--max-drop``) is in accuracy units, ``0.01`` or ``"1%"`` meaning
one percentage point below the baseline's validation accuracy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import optuna
import pandas as pd

from ..core.budget import absolute_limit, parse_budget
from ..core.errors import ConfigError
from .front import enrich
from .study_view import study_baseline, usable
from .tables import trials_frame

__all__ = [
    "DEFAULT_QUERIES", "best_trial", "first_ranked", "parse_drop", "query_text", "ranked_trials",
]  # fmt: skip

# What a report answers when it is asked nothing.
DEFAULT_QUERIES = (
    {"max_drop": "1%"},
    {"max_macs": "0.5x"},
    {"max_macs": "0.25x"},
)


def parse_drop(value: float | str | None, name: str = "max_drop") -> float | None:
    """An accuracy-drop tolerance in accuracy units: ``0.01`` or ``"1%"`` is one point.

    Raises:
        ConfigError: not a finite number or percentage.
    """
    if value is None:
        return None
    text = str(value).strip()
    try:
        number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise ConfigError(f"{name} must be an accuracy drop like 0.01 or '1%', got {value!r}")
    return number


def _limit(value: float | str | None, baseline: float, name: str) -> float | None:
    budget = parse_budget(value, name)
    return None if budget is None else absolute_limit(budget, baseline)


def ranked_trials(
    study: optuna.Study,
    *,
    max_macs: float | str | None = None,
    max_params: float | str | None = None,
    max_drop: float | str | None = None,
) -> pd.DataFrame:
    """Every usable trial within the given limits, best first (the order of :func:`best_trial`),
    in the form of :func:`~.front.front_frame`.

    Raises:
        ConfigError: a limit in none of the accepted forms.
    """
    base = study_baseline(study)
    macs = _limit(max_macs, base["macs"], "max_macs")
    params = _limit(max_params, base["params"], "max_params")
    drop = parse_drop(max_drop)
    usable_numbers = [t.number for t in study.get_trials(deepcopy=False) if usable(t)]
    frame = trials_frame(study)
    frame = enrich(frame[frame["number"].isin(usable_numbers)] if len(frame) else frame, study)
    keep = pd.Series(True, index=frame.index)
    if macs is not None:
        keep &= frame["macs"].astype(float) <= macs
    if params is not None:
        keep &= frame["params"].astype(float) <= params
    if drop is not None:
        keep &= frame["accuracy_drop"].astype(float) <= drop + 1e-12
    frame = frame[keep].astype({"accuracy": float, "macs": float, "params": float})
    if drop is None:
        order, ascending = ["accuracy", "macs", "params", "number"], [False, True, True, True]
    else:
        order, ascending = ["macs", "params", "accuracy", "number"], [True, True, False, True]
    return frame.sort_values(order, ascending=ascending)


def best_trial(
    study: optuna.Study,
    *,
    max_macs: float | str | None = None,
    max_params: float | str | None = None,
    max_drop: float | str | None = None,
) -> pd.Series | None:
    """The best usable trial within the given limits, or ``None`` if none qualifies.

    Candidates are all COMPLETE, feasible, trained trials (not only the front: a trial
    dominated in the study's objectives can be the best under an extra limit). Without
    ``max_drop`` the most accurate wins (ties: fewer MACs, then parameters); with it, the
    smallest model within the tolerance wins (fewest MACs, then parameters, then most
    accurate). Limits take the forms in the module doc.

    Returns:
        The trial's row in the form of :func:`~.front.front_frame`, plus ``on_front`` and
        ``plan``.

    Raises:
        ConfigError: a limit in none of the accepted forms.
    """
    return first_ranked(
        study, ranked_trials(study, max_macs=max_macs, max_params=max_params, max_drop=max_drop)
    )


def first_ranked(study: optuna.Study, ranked: pd.DataFrame) -> pd.Series | None:
    """:func:`best_trial`'s answer from :func:`ranked_trials`'s frame (``None``: empty)."""
    if ranked.empty:
        return None
    row = ranked.iloc[0].copy()
    number = int(row["number"])
    row["on_front"] = number in {t.number for t in study.best_trials}
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    row["plan"] = json.dumps(trial.user_attrs.get("plan"), sort_keys=True)
    return row


def query_text(query: Mapping[str, Any], row: pd.Series | None) -> str:
    """One query and its answer in words (``"max-macs 0.5x: trial 1, accuracy 0.8500 ..."``)."""
    limits = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in query.items() if v is not None)
    if row is None:
        return f"{limits}: no trial qualifies"
    return (
        f"{limits}: trial {int(row['number'])}, accuracy {row['accuracy']:.4f} "
        f"(drop {row['accuracy_drop']:+.4f}), {int(row['macs']):,} MACs "
        f"({row['macs_compression']:.2f}x fewer), {int(row['params']):,} params "
        f"({row['params_compression']:.2f}x fewer){'' if row['on_front'] else ', off the front'}"
    )
