"""The Pareto front of a study: the enriched front table, method usage, hypervolume.

- :func:`front_frame`: the feasible front sorted by MACs with the drop vs the baseline,
  compression factors (baseline / compressed) and each layer's method and rank.
- :func:`method_usage_frame`: how often each method appears per layer on the front.
- :func:`hypervolume` / :func:`hypervolume_frame`: every objective is made a normalised
  loss by its registry entry (:mod:`autodecomp.measure.objectives`): ``1 - accuracy``,
  ``macs / baseline_macs`` and so on for every cost objective (a measured one, e.g.
  latency, against the baseline's value on the device the config names); the reference
  point is ``(1, ..., 1)``, i.e. accuracy 0 at the baseline's cost. The hypervolume is the
  volume dominated by the COMPLETE, feasible trials inside that box, computed exactly by
  Optuna's ``compute_hypervolume``; it lies in ``[0, 1]`` (1 would be accuracy 1 at no
  cost) and a trial at or beyond a reference coordinate adds nothing. With objectives
  ``[accuracy, macs]`` it is the area under the front's accuracy staircase over the
  fraction of baseline MACs saved.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial

from ..compress.prune import PRUNE
from ..core.errors import ConfigError
from ..core.optuna_compat import compute_hypervolume
from ..measure.objectives import ObjectiveSpec
from .study_view import study_baseline, study_objectives, usable
from .tables import COST_COLUMNS, pareto_frame, with_measured

__all__ = [
    "enrich",
    "front_columns",
    "front_frame",
    "hypervolume",
    "hypervolume_frame",
    "last_hypervolume",
    "method_usage_frame",
    "reference",
]

_FRONT_FIRST = [
    "number",
    "accuracy",
    "accuracy_drop",
    "macs",
    "macs_ratio",
    "macs_compression",
    "params",
    "params_ratio",
    "params_compression",
    "pre_ft_accuracy",
    "plan_layers",
]
# What a report shows of the front: {column: (header, format spec)}.
_SHOWN = {
    "number": ("trial", ""),
    "accuracy": ("accuracy", ".4f"),
    "accuracy_drop": ("drop", "+.4f"),
    **COST_COLUMNS,
    "pre_ft_accuracy": ("pre-ft acc", ".4f"),
    "plan_layers": ("plan (layer:method[rank])", ""),
}


def front_columns(front: pd.DataFrame) -> dict[str, tuple[str, str | None]]:
    """The columns a report shows of :func:`front_frame` as ``{column: (header, format
    spec)}``: the measured ones (e.g. ``latency cpu ms``) after the parameters."""
    return with_measured(front, _SHOWN, after="params_compression")


# ---- the front -------------------------------------------------------------------------------
def _layer_summary(layers: Mapping[str, Mapping[str, Any]] | None) -> str:
    """Per-layer method and final rank, e.g. ``"conv2:tucker[5,9] conv3:keep"``; a shift-pruned
    entry shows its pruning ratio instead of a block's group sizes, e.g. ``"b1:prune0.31"``,
    ``"conv4:shift[1,2,1,2,3,2,1,2,1]prune0.25"``."""
    parts = []
    for name, rec in (layers or {}).items():
        rank, prune = rec.get("rank"), rec.get("prune")
        block = rec["method"] == PRUNE
        text = "" if rank is None or block else json.dumps(rank, separators=(",", ":"))
        text += "" if prune is None else f"{'' if block else 'prune'}{prune:.2f}"
        parts.append(f"{name}:{rec['method']}{text}")
    return " ".join(parts)


def enrich(frame: pd.DataFrame, study: optuna.Study) -> pd.DataFrame:
    """Add drop vs baseline, compression factors (baseline / compressed) and the layer plan
    to rows of :func:`~.tables.trials_frame` / :func:`~.tables.pareto_frame`."""
    base = study_baseline(study)
    if frame.empty:
        return pd.DataFrame(columns=_FRONT_FIRST)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    out = frame.copy()
    accuracy = pd.to_numeric(out["accuracy"], errors="coerce")
    out["accuracy_drop"] = base["accuracy"] - accuracy
    out["macs_compression"] = base["macs"] / pd.to_numeric(out["macs"], errors="coerce")
    out["params_compression"] = base["params"] / pd.to_numeric(out["params"], errors="coerce")
    out["plan_layers"] = [_layer_summary(trials[n].user_attrs.get("layers")) for n in out.number]
    return out[_FRONT_FIRST + [c for c in out.columns if c not in _FRONT_FIRST]]


def front_frame(study: optuna.Study) -> pd.DataFrame:
    """The feasible Pareto front sorted by MACs (:func:`~.tables.pareto_frame`) with
    ``accuracy_drop`` (baseline accuracy - accuracy), ``macs_compression`` / ``params_compression``
    (baseline / compressed) and ``plan_layers`` (each layer's method and final rank)."""
    return enrich(pareto_frame(study), study)


def method_usage_frame(study: optuna.Study) -> pd.DataFrame:
    """How often each method (``keep`` included) appears per layer among the front's trials.

    One row per layer (model order), one count column per method seen on the front, and
    ``front_trials``, the size of the front. When the front prunes shift blocks (method
    ``prune``, or a ``prune`` ratio on a decomposed layer), ``mean_prune`` is the mean
    fraction of shift channels removed per layer over the front trials that prune it.
    """
    front = study.best_trials
    counts: dict[str, dict[str, int]] = {}
    prunes: dict[str, list[float]] = {}
    for trial in front:
        for layer, entry in (trial.user_attrs.get("plan") or {}).items():
            row = counts.setdefault(layer, {})
            row[entry["method"]] = row.get(entry["method"], 0) + 1
            if entry.get("prune") is not None:
                prunes.setdefault(layer, []).append(entry["prune"])
    methods = sorted({m for row in counts.values() for m in row}, key=lambda m: (m == "keep", m))
    rows = [
        {"layer": layer, **{m: row.get(m, 0) for m in methods}, "front_trials": len(front)}
        for layer, row in counts.items()
    ]
    columns = ["layer", *methods, "front_trials"]
    if prunes:
        for row in rows:
            ratios = prunes.get(row["layer"])
            row["mean_prune"] = sum(ratios) / len(ratios) if ratios else None
        columns.insert(-1, "mean_prune")
    return pd.DataFrame(rows, columns=columns)


# ---- hypervolume -----------------------------------------------------------------------------
def reference(study: optuna.Study) -> dict[ObjectiveSpec, float]:
    """The reference point in the objectives' own units (accuracy 0, the baseline's costs).

    Raises:
        ConfigError: a cost objective whose baseline value is not recorded (yet).
    """
    base = study_baseline(study)
    specs = study_objectives(study)
    for spec in specs:
        if spec.is_cost and spec.name not in base:
            raise ConfigError(
                f"study {study.study_name!r} has {spec.name} as an objective but no baseline "
                f"{spec.name} (user attribute {spec.baseline_attr!r}); run at least one trial "
                "first"
            )
    return {spec: spec.reference(base) for spec in specs}


def _loss(
    trial: FrozenTrial, specs: Sequence[ObjectiveSpec], base: Mapping[str, Any]
) -> np.ndarray:
    return np.array([s.loss(v, base) for s, v in zip(specs, trial.values, strict=True)], float)


def _hypervolume(points: list[np.ndarray]) -> float:
    inside = [p for p in points if np.all(p < 1.0)]
    if not inside:
        return 0.0
    return compute_hypervolume(np.stack(inside), np.ones(len(inside[0])))


def hypervolume_frame(study: optuna.Study) -> pd.DataFrame:
    """Hypervolume history: one row per trial (by number) with the hypervolume of the
    COMPLETE, feasible trials numbered up to it, and ``counted`` telling whether it is one."""
    specs, base = list(reference(study)), study_baseline(study)
    points: list[np.ndarray] = []
    rows, current = [], 0.0
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        counted = usable(trial)
        if counted:
            points.append(_loss(trial, specs, base))
            current = _hypervolume(points)
        rows.append(
            {"number": trial.number, "state": trial.state.name, "counted": counted,
             "hypervolume": current}
        )  # fmt: skip
    return pd.DataFrame(rows, columns=["number", "state", "counted", "hypervolume"])


def last_hypervolume(history: pd.DataFrame) -> float:
    """The last value of a :func:`hypervolume_frame` (0 for an empty study)."""
    return float(history["hypervolume"].iloc[-1]) if len(history) else 0.0


def hypervolume(study: optuna.Study) -> float:
    """Hypervolume of the study's COMPLETE, feasible trials (normalised space, module doc)."""
    return last_hypervolume(hypervolume_frame(study))
