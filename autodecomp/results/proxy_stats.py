"""How well the cheap proxies predict the fine-tuned accuracy, and what early pruning saved.

Each trial records cheap scores before and during its short fine-tune (see
:mod:`autodecomp.search.objective`). :func:`kendall_frame` gives Kendall's tau-b between each of
them and a target accuracy over the trials that have both: the study's own final proxy
accuracy (:func:`proxy_correlation_frame`), or a longer fine-tune of the same plans
(``bench/proxy_correlation.py``). Error scores are negated first, so for every proxy a
positive tau means it orders candidates the way the target does (1: the same order).
:func:`pruning_frame` counts the trials dropped at each stage and estimates the seconds
saved as the mean time of a fully trained trial times their number, minus the time they
did spend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import optuna
import pandas as pd
from optuna.trial import TrialState
from scipy.stats import kendalltau

from ..measure.objectives import OBJECTIVES, objective
from .study_view import value_names

__all__ = ["PROXIES", "kendall_frame", "proxy_correlation_frame", "proxy_frame", "pruning_frame"]

# proxy column -> (label, sign): the score is sign * value, so that higher is better.
PROXIES: dict[str, tuple[str, int]] = {
    "kernel_error": ("kernel error (weights)", -1),
    "layer_output_error": ("layer output error (calibration)", -1),
    "output_error": ("network output error (calibration)", -1),
    "output_kl": ("network output KL (calibration)", -1),
    "pre_ft_accuracy": ("accuracy before fine-tune", 1),
    "floor_accuracy": ("accuracy at floor_step", 1),
}
_STAGES = {
    "over_budget": "over budget (not trained)",
    "output_error": "output error gate (no training)",
    "floor": "accuracy floor (after floor_step)",
}


def proxy_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per finished trial: number, state, final accuracy (trained COMPLETE trials
    only), every proxy it recorded, ``over_budget``, ``pruned_at`` and total seconds."""
    names = value_names(study)
    maximised = [i for i, n in enumerate(names) if n in OBJECTIVES and not objective(n).is_cost]
    index = maximised[0] if maximised else 0  # a study without config: its first value
    rows = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        attrs = trial.user_attrs
        trained = trial.state == TrialState.COMPLETE and not attrs.get("over_budget")
        row = {
            "number": trial.number,
            "state": trial.state.name,
            "accuracy": trial.values[index] if trained else None,
        }
        row.update({p: attrs.get(p) for p in PROXIES})
        row["over_budget"] = bool(attrs.get("over_budget"))
        row["pruned_at"] = attrs.get("pruned_at")
        row["seconds"] = (attrs.get("seconds") or {}).get("total")
        rows.append(row)
    columns = ["number", "state", "accuracy", *PROXIES, "over_budget", "pruned_at", "seconds"]
    return pd.DataFrame(rows, columns=columns)


def kendall_frame(
    frame: pd.DataFrame, target: str = "accuracy", proxies: Sequence[str] | None = None
) -> pd.DataFrame:
    """Kendall's tau-b between each proxy (error scores negated) and ``target``.

    Args:
        frame: one row per candidate with the proxy columns and ``target``.
        target: the accuracy the proxies should predict.
        proxies: columns to score (default: those of :data:`PROXIES` in ``frame``, and any
            other named column is taken as higher-is-better).

    Returns:
        One row per proxy: ``proxy``, ``label``, ``n`` (rows with both values), ``tau`` and
        ``p_value`` (NaN with fewer than 3 rows or a constant column).
    """
    proxies = [p for p in PROXIES if p in frame] if proxies is None else list(proxies)
    rows = []
    for proxy in proxies:
        label, sign = PROXIES.get(proxy, (proxy, 1))
        pair = frame[[proxy, target]].apply(pd.to_numeric, errors="coerce").dropna()
        tau = p_value = float("nan")
        if len(pair) >= 3 and pair[proxy].nunique() > 1 and pair[target].nunique() > 1:
            result = kendalltau(sign * pair[proxy], pair[target])
            tau, p_value = float(result.statistic), float(result.pvalue)
        rows.append(
            {"proxy": proxy, "label": label, "n": len(pair), "tau": tau, "p_value": p_value}
        )
    return pd.DataFrame(rows, columns=["proxy", "label", "n", "tau", "p_value"])


def proxy_correlation_frame(study: optuna.Study) -> pd.DataFrame:
    """:func:`kendall_frame` of the study's proxies against its final proxy accuracy."""
    return kendall_frame(proxy_frame(study))


def _stage(row: Mapping[str, object]) -> str | None:
    if row["over_budget"]:
        return "over_budget"
    return row["pruned_at"] if isinstance(row["pruned_at"], str) else None


def pruning_frame(study: optuna.Study) -> pd.DataFrame:
    """Trials ended before the full fine-tune, per stage, with the estimated time saved.

    Returns:
        One row per stage seen (``stage``, ``label``, ``trials``, ``seconds_spent``,
        ``seconds_saved``), then a ``trained`` row: fully trained trials and their time.
    """
    frame = proxy_frame(study)
    columns = ["stage", "label", "trials", "seconds_spent", "seconds_saved"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    seconds = pd.to_numeric(frame["seconds"], errors="coerce").fillna(0.0)
    stages = frame.apply(_stage, axis=1)
    trained = frame["accuracy"].notna()
    full = float(seconds[trained].mean()) if trained.any() else float("nan")
    rows = []
    for stage, label in _STAGES.items():
        hit = stages == stage
        if hit.any():
            spent = float(seconds[hit].sum())
            saved = int(hit.sum()) * full - spent
            rows.append(
                {"stage": stage, "label": label, "trials": int(hit.sum()),
                 "seconds_spent": spent, "seconds_saved": saved}
            )  # fmt: skip
    rows.append(
        {"stage": "trained", "label": "fully fine-tuned", "trials": int(trained.sum()),
         "seconds_spent": float(seconds[trained].sum()), "seconds_saved": 0.0}
    )  # fmt: skip
    return pd.DataFrame(rows, columns=columns)
