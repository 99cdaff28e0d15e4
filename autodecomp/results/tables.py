"""Study results as pandas tables: every trial, every layer of every trial, the Pareto front.

- ``trials.csv``: one row per trial: number, state, objectives, constraints and
  feasibility, measured latency (``latency_cpu_ms`` / ``latency_cuda_ms``, when measured),
  ``macs_ratio`` / ``params_ratio`` (fractions: compressed / baseline), the cheap proxies
  (pre-fine-tune accuracy, kernel / layer output / network output error, output KL, accuracy
  at the floor step),
  time, why and at which stage it ended early, and ``<layer>/method`` / ``<layer>/rank``
  (and ``<layer>/prune`` for shift-pruned entries).
- ``layers.csv``: long table, one row per (trial, layer or pruned shift block): method,
  rank (a pruned block's: its direction-group sizes), ratio, prune (the fraction of shift
  channels removed), rel_error (kernel), output_error (layer output on the calibration
  batch), macs, params.
- ``pareto.csv``: the feasible non-dominated trials (``study.best_trials``) sorted by MACs,
  with the plan as JSON so any row can be rebuilt with :func:`autodecomp.apply_plan`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from ..compress.plan import plan_summary
from ..config import StudyConfig
from ..core.files import atomic_write
from ..core.optuna_compat import constraints as named_constraints
from ..measure.objectives import registered
from ..search.loop import COUNTED, counted_text
from .study_view import value_names

__all__ = [
    "COST_COLUMNS",
    "PROXY_ATTRS",
    "SEARCH_FRONT",
    "format_cell",
    "format_front",
    "layers_frame",
    "measured_columns",
    "missing",
    "pareto_frame",
    "summarise_search",
    "trials_frame",
    "with_measured",
    "write_tables",
]

_log = logging.getLogger(__name__)

# Cheap proxy scores a trial records (see autodecomp.search.objective), besides pre_ft_accuracy.
PROXY_ATTRS = (
    "kernel_error",
    "layer_output_error",
    "output_error",
    "output_kl",
    "floor_accuracy",
)


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, list | tuple | dict) else value


def _row(trial: optuna.trial.FrozenTrial, names: list[str]) -> dict[str, Any]:
    attrs = trial.user_attrs
    row: dict[str, Any] = {"number": trial.number, "state": trial.state.name}
    values = dict(zip(names, trial.values or [None] * len(names), strict=True))
    for spec in registered():
        row |= spec.cells(values, attrs)
    constraints = named_constraints(trial)
    for key, value in sorted(constraints.items()):
        row[f"constraint_{key}"] = value
    row["feasible"] = all(v <= 0 for v in constraints.values()) if constraints else None
    row["macs_ratio"] = attrs.get("macs_ratio")
    row["params_ratio"] = attrs.get("params_ratio")
    row["pre_ft_accuracy"] = attrs.get("pre_ft_accuracy")
    for proxy in PROXY_ATTRS:
        row[proxy] = attrs.get(proxy)
    row["over_budget"] = attrs.get("over_budget")
    row["seconds"] = (attrs.get("seconds") or {}).get("total")
    row["ended"] = attrs.get("pruned") or attrs.get("fail_reason")
    row["pruned_at"] = attrs.get("pruned_at")
    row["methods"] = plan_summary(attrs.get("plan"))
    for layer, rec in (attrs.get("layers") or {}).items():
        row[f"{layer}/method"] = rec["method"]
        row[f"{layer}/rank"] = _cell(rec["rank"])
        if rec.get("prune") is not None:
            row[f"{layer}/prune"] = rec["prune"]
    return row


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial (all states), ordered by trial number."""
    names = value_names(study)
    rows = [_row(t, names) for t in study.get_trials(deepcopy=False)]
    frame = pd.DataFrame(rows)
    return frame.sort_values("number", ignore_index=True) if rows else frame


def layers_frame(study: optuna.Study) -> pd.DataFrame:
    """Long table: one row per (trial, layer) of every trial that got as far as counting."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        for layer, rec in (trial.user_attrs.get("layers") or {}).items():
            rows.append(
                {
                    "trial": trial.number,
                    "state": trial.state.name,
                    "layer": layer,
                    "method": rec["method"],
                    "rank": _cell(rec["rank"]),
                    "ratio": rec["ratio"],
                    "prune": rec.get("prune"),
                    "rel_error": rec["rel_error"],
                    "output_error": rec.get("output_error"),
                    "macs": rec["macs"],
                    "params": rec["params"],
                }
            )
    columns = ["trial", "state", "layer", "method", "rank", "ratio", "prune", "rel_error"]
    columns += ["output_error", "macs", "params"]
    return pd.DataFrame(rows, columns=columns)


def pareto_frame(study: optuna.Study) -> pd.DataFrame:
    """The feasible Pareto front (``study.best_trials``) sorted by MACs, with plans as JSON."""
    names = value_names(study)
    best = study.best_trials
    rows = []
    for trial in best:
        row = _row(trial, names)
        row["plan"] = json.dumps(trial.user_attrs.get("plan"), sort_keys=True)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if rows:
        frame = frame.sort_values(["macs", "number"], ignore_index=True)
    return frame


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def write_tables(study: optuna.Study, folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``trials.csv``, ``layers.csv`` and ``pareto.csv`` into ``folder`` (atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    frames = {
        "trials": trials_frame(study),
        "layers": layers_frame(study),
        "pareto": pareto_frame(study),
    }
    paths = {}
    for name, frame in frames.items():
        paths[name] = folder / f"{name}.csv"
        _write_csv(frame, paths[name])
    return paths


def missing(value: Any) -> bool:
    """``None`` or NaN: a cell with no value."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_cell(value: Any, spec: str | None) -> str:
    """``value`` formatted by ``spec`` (``",.0f"``; ``""`` or ``None``: as text), ``"-"`` when
    missing."""
    if missing(value):
        return "-"
    return format(value, spec) if spec else str(value)


def measured_columns(frame: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """The per-device columns of a trials / front table (``latency_cpu_ms``) as
    ``{column: (header, format spec)}``, from the objectives measured per device."""
    columns = list(frame.columns)
    return {
        column: (spec.header(column), f".{spec.decimals}f")
        for spec in registered()
        for column in spec.measured_columns(columns)
    }


def with_measured(
    front: pd.DataFrame, columns: Mapping[str, tuple[str, str | None]], after: str
) -> dict[str, tuple[str, str | None]]:
    """``columns`` (``{column: (header, format spec)}``) with the front's measured columns
    (:func:`measured_columns`) inserted after column ``after``."""
    out: dict[str, tuple[str, str | None]] = {}
    for key, value in columns.items():
        out[key] = value
        if key == after:
            out |= measured_columns(front)
    return out


# What a search prints of its front (a report shows more: autodecomp.results.front). The
# compression factors (baseline / compressed: "MACs ÷ 10.33") as the report shows them.
COST_COLUMNS: dict[str, tuple[str, str | None]] = {
    "macs": ("MACs", ",.0f"),
    "macs_compression": ("MACs ÷", ".2f"),
    "params": ("params", ",.0f"),
    "params_compression": ("params ÷", ".2f"),
}
SEARCH_FRONT: dict[str, tuple[str, str | None]] = {
    "number": ("trial", None),
    "accuracy": ("accuracy", ".4f"),
    "pre_ft_accuracy": ("pre-ft", ".4f"),
    **COST_COLUMNS,
    "methods": ("methods", ""),
}


def _with_compression(front: pd.DataFrame) -> pd.DataFrame:
    """``front`` with ``macs_compression`` / ``params_compression`` (baseline / compressed)
    derived from the stored ``*_ratio`` (compressed / baseline) where it lacks them."""
    out = front.copy()
    for name in ("macs", "params"):
        if f"{name}_compression" not in out and f"{name}_ratio" in out:
            out[f"{name}_compression"] = 1 / pd.to_numeric(out[f"{name}_ratio"], errors="coerce")
    return out


def format_front(
    front: pd.DataFrame, columns: Mapping[str, tuple[str, str | None]] | None = None
) -> str:
    """The Pareto front as a fixed-width text table.

    Args:
        front: a front table (:func:`pareto_frame` or :func:`~.front.front_frame`).
        columns: ``{column: (header, format spec)}`` to show (spec ``None``: the stored
            values, aligned as pandas aligns them); default :data:`SEARCH_FRONT` with the
            measured columns after the parameters.
    """
    if front.empty:
        return "(no feasible completed trial yet)"
    if columns is None:
        front = _with_compression(front)
        columns = with_measured(front, SEARCH_FRONT, after="params_compression")
    shown = pd.DataFrame(
        {
            header: front[column] if spec is None else [format_cell(v, spec) for v in front[column]]
            for column, (header, spec) in columns.items()
        }
    )
    return shown.to_string(index=False)


def summarise_search(study: optuna.Study, cfg: StudyConfig) -> dict[str, Path]:
    """Write the study's tables next to its config and log the counts and the Pareto front."""
    tables = write_tables(study, cfg.folder)
    counted = len(study.get_trials(deepcopy=False, states=COUNTED))
    failed = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)))
    _log.info(
        f"{counted_text(counted, cfg.trials, 'counted')} ({failed} failed); "
        f"tables: {', '.join(str(p) for p in tables.values())}"
    )
    _log.info("Pareto front (feasible, non-dominated):")
    _log.info(format_front(pareto_frame(study)))
    return tables
