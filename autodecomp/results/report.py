"""Pareto analysis of a study, finished or still running: tables, hypervolume, queries, plots.

A study is read through any Optuna storage without writing to it (:func:`read_study`), so
a report can be made while workers still add trials: RUNNING trials are listed in the
trials table with their state and otherwise ignored. :func:`write_report` writes:

- ``trials`` and ``layers`` (the tables of :mod:`autodecomp.results.tables`), ``pareto`` (the
  feasible front sorted by MACs, :func:`front_frame`), ``method_usage`` and ``hypervolume``
  (history per trial), and, when the trials record proxy scores, ``proxy_correlation``
  (Kendall tau of each cheap proxy against the final proxy accuracy) and ``pruning``
  (trials dropped per stage and the time saved; :mod:`autodecomp.results.proxy_stats`), each as
  CSV and Parquet;
- ``report.md``: counts, baseline, the front, queries, method usage, hypervolume;
- ``pareto.png``, ``pareto.html`` (interactive, plotly embedded so it opens offline),
  ``hypervolume.png`` and ``method_map.png`` (see :mod:`autodecomp.results.plots`).

Hypervolume: every objective is made a normalised loss, ``1 - accuracy``, ``macs /
baseline_macs`` and (when they are objectives) ``params / baseline_params`` and ``latency /
baseline_latency`` (measured on ``latency.device``); the reference point is ``(1, 1[, 1])``,
i.e. accuracy 0 at the baseline's cost.
The hypervolume is the volume dominated by the COMPLETE, feasible trials inside that box,
computed exactly by Optuna's ``compute_hypervolume``; it lies in ``[0, 1]`` (1 would be
accuracy 1 at no cost) and a trial at or beyond a reference coordinate adds nothing. With
objectives ``[accuracy, macs]`` it is the area under the front's accuracy staircase over
the fraction of baseline MACs saved.

Budgets in queries (:func:`best_trial`, ``--max-macs`` / ``--max-params``): a number <= 1
or ``"50%"`` is a fraction of the baseline, ``"0.5x"`` a multiple of it, a larger number or
``"300k"`` / ``"2.5M"`` / ``"1G"`` an absolute count. An accuracy-drop tolerance
(``--max-drop``) is in accuracy units, ``0.01`` or ``"1%"`` meaning one percentage point
below the baseline's validation accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna._hypervolume import compute_hypervolume
from optuna.trial import FrozenTrial, TrialState

from ..compress.prune import PRUNE
from ..core.errors import ConfigError
from ..core.files import atomic_write
from .proxy_stats import proxy_correlation_frame, pruning_frame
from .tables import latency_columns, layers_frame, pareto_frame, trials_frame

__all__ = [
    "best_trial",
    "configure_parser",
    "front_frame",
    "hypervolume",
    "hypervolume_frame",
    "layers_frame",
    "method_usage_frame",
    "open_storage_readonly",
    "parse_drop",
    "parse_limit",
    "read_study",
    "snapshot",
    "trials_frame",
    "write_report",
]

_SUFFIXES = {"k": 1e3, "m": 1e6, "g": 1e9}
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
_TABLES = ("trials", "layers", "pareto", "method_usage", "hypervolume")
_PROXY_TABLES = ("proxy_correlation", "pruning")


# ---- reading a study -------------------------------------------------------------------------
def _shown(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url


def _is_sqlite(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(16) == b"SQLite format 3\x00"


def open_storage_readonly(storage: str) -> optuna.storages.BaseStorage:
    """An Optuna storage opened for reading: nothing is created or written.

    Args:
        storage: a database URL (``sqlite:///...``, ``postgresql://...``), a journal URL
            (``journal:///...``) or a file path: a SQLite database, or else an Optuna
            journal file (``JournalFileBackend``).

    Raises:
        ConfigError: a missing file or database, or a storage that cannot be opened.
    """
    from ..search.storage import journal_path

    journal = journal_path(storage)
    if journal is not None:
        if not journal.is_file():
            raise ConfigError(f"storage {storage!r}: no journal file (has the study been created?)")
        storage = str(journal)
    if "://" not in storage:
        path = Path(storage).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"storage {storage!r}: no such file (give a database URL, a SQLite file or an "
                "Optuna journal file)"
            )
        if not _is_sqlite(path):
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        storage = f"sqlite:///{path.resolve()}"
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        url = make_url(storage)
    except (ArgumentError, ValueError):
        raise ConfigError(f"storage {storage!r} is not a valid database URL") from None
    local = url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
    if local and not Path(url.database).expanduser().is_file():
        raise ConfigError(f"storage {storage!r}: no database file (has the search run?)")
    try:
        return optuna.storages.RDBStorage(storage, skip_table_creation=True)
    except (SQLAlchemyError, ImportError, OSError, RuntimeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"cannot open storage {_shown(storage)}: {first}") from None


def read_study(storage: str, study_name: str | None = None) -> optuna.Study:
    """Load a study for reading (see :func:`open_storage_readonly`).

    Args:
        storage: a database URL or a SQLite / journal file path.
        study_name: may be left out when the storage holds a single study.
    """
    backend = open_storage_readonly(storage)
    names = [s.study_name for s in backend.get_all_studies()]
    if study_name is None and len(names) == 1:
        study_name = names[0]
    if study_name not in names:
        what = "give --study-name; " if study_name is None else f"no study {study_name!r}; "
        raise ConfigError(
            f"storage {_shown(storage)}: {what}studies there: {', '.join(names) or 'none'}"
        )
    return optuna.load_study(study_name=study_name, storage=backend)


def _baseline(study: optuna.Study) -> dict[str, Any]:
    base = study.user_attrs.get("baseline")
    if not isinstance(base, Mapping) or not {"accuracy", "macs", "params"} <= set(base):
        raise ConfigError(
            f"study {study.study_name!r} has no baseline record (user attribute 'baseline'); "
            "was it created by autodecomp search?"
        )
    out = dict(base)
    latency = study.user_attrs.get("baseline_latency_ms")  # {device kind: ms}, when measured
    device = ((study.user_attrs.get("config") or {}).get("latency") or {}).get("device", "cpu")
    if isinstance(latency, Mapping) and device in latency:
        out["latency"] = float(latency[device])
    return out


def _objectives(study: optuna.Study) -> list[str]:
    names = (study.user_attrs.get("config") or {}).get("objectives")
    if not names or len(names) != len(study.directions) or "accuracy" not in names:
        raise ConfigError(
            f"study {study.study_name!r} does not record its objectives (user attribute "
            "'config'); was it created by autodecomp search?"
        )
    return list(names)


def _feasible(trial: FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def _usable(trial: FrozenTrial) -> bool:
    """COMPLETE, feasible and trained (an over-budget candidate returns accuracy 0)."""
    return (
        trial.state == TrialState.COMPLETE
        and _feasible(trial)
        and not trial.user_attrs.get("over_budget")
    )


# ---- tables --------------------------------------------------------------------------------
def _rank_text(rank: Any) -> str:
    return json.dumps(rank, separators=(",", ":"))


def _layer_summary(layers: Mapping[str, Mapping[str, Any]] | None) -> str:
    """Per-layer method and final rank, e.g. ``"conv2:tucker[5,9] conv3:keep"``; a shift-pruned
    entry shows its pruning ratio instead of a block's group sizes, e.g. ``"b1:prune0.31"``,
    ``"conv4:shift[1,2,1,2,3,2,1,2,1]prune0.25"``."""
    parts = []
    for name, rec in (layers or {}).items():
        rank, prune = rec.get("rank"), rec.get("prune")
        block = rec["method"] == PRUNE
        text = "" if rank is None or block else _rank_text(rank)
        text += "" if prune is None else f"{'' if block else 'prune'}{prune:.2f}"
        parts.append(f"{name}:{rec['method']}{text}")
    return " ".join(parts)


def _enrich(frame: pd.DataFrame, study: optuna.Study) -> pd.DataFrame:
    """Add drop vs baseline, compression factors (baseline / compressed) and the layer plan."""
    base = _baseline(study)
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
    return _enrich(pareto_frame(study), study)


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


# ---- hypervolume ---------------------------------------------------------------------------
def _reference(study: optuna.Study) -> dict[str, float]:
    """The reference point in the objectives' own units (accuracy 0, baseline MACs/params)."""
    base = _baseline(study)
    names = _objectives(study)
    if "latency" in names and "latency" not in base:
        raise ConfigError(
            f"study {study.study_name!r} has latency as an objective but no baseline latency "
            "(user attribute 'baseline_latency_ms'); run at least one trial first"
        )
    ref = {"accuracy": 0.0, "macs": float(base["macs"]), "params": float(base["params"])}
    return {name: ref[name] if name in ref else base[name] for name in names}


def _loss(trial: FrozenTrial, names: Sequence[str], base: Mapping[str, Any]) -> np.ndarray:
    values = dict(zip(names, trial.values, strict=True))
    scaled = {
        "accuracy": lambda v: 1.0 - v,
        "macs": lambda v: v / base["macs"],
        "params": lambda v: v / base["params"],
        "latency": lambda v: v / base["latency"],
    }
    return np.array([scaled[n](values[n]) for n in names], dtype=float)


def _hypervolume(points: list[np.ndarray]) -> float:
    inside = [p for p in points if np.all(p < 1.0)]
    if not inside:
        return 0.0
    return float(compute_hypervolume(np.stack(inside), np.ones(len(inside[0]))))


def hypervolume(study: optuna.Study) -> float:
    """Hypervolume of the study's COMPLETE, feasible trials (normalised space, module doc)."""
    return _last({"hypervolume": hypervolume_frame(study)})


def hypervolume_frame(study: optuna.Study) -> pd.DataFrame:
    """Hypervolume history: one row per trial (by number) with the hypervolume of the
    COMPLETE, feasible trials numbered up to it, and ``counted`` telling whether it is one."""
    names, base = _objectives(study), _baseline(study)
    points: list[np.ndarray] = []
    rows, current = [], 0.0
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        counted = _usable(trial)
        if counted:
            points.append(_loss(trial, names, base))
            current = _hypervolume(points)
        rows.append(
            {"number": trial.number, "state": trial.state.name, "counted": counted,
             "hypervolume": current}
        )  # fmt: skip
    return pd.DataFrame(rows, columns=["number", "state", "counted", "hypervolume"])


# ---- queries -------------------------------------------------------------------------------
def parse_limit(value: float | str | None, baseline: float, name: str = "limit") -> float | None:
    """An absolute MAC / parameter limit from a budget (formats in the module doc).

    Raises:
        ConfigError: not a positive number in one of the accepted forms.
    """
    if value is None:
        return None
    number: float | None = None
    text = str(value).strip().lower()
    try:
        if isinstance(value, bool):
            number = None
        elif text.endswith("x"):
            number = float(text[:-1]) * baseline
        elif text.endswith("%"):
            number = float(text[:-1]) / 100 * baseline
        elif text and text[-1] in _SUFFIXES:
            number = float(text[:-1]) * _SUFFIXES[text[-1]]
        else:
            number = float(text)
            number = number * baseline if number <= 1 else number
    except ValueError:
        number = None
    if number is None or not (number > 0 and math.isfinite(number)):
        raise ConfigError(
            f"{name} must be a fraction of the baseline (0.5, '50%', '0.5x') or an absolute "
            f"count (300000, '300k', '2.5M'), got {value!r}"
        )
    return number


def parse_drop(value: float | str | None, name: str = "max_drop") -> float | None:
    """An accuracy-drop tolerance in accuracy units: ``0.01`` or ``"1%"`` is one point."""
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
        The trial's row in the form of :func:`front_frame`, plus ``on_front`` and ``plan``.
    """
    base = _baseline(study)
    macs = parse_limit(max_macs, base["macs"], "max_macs")
    params = parse_limit(max_params, base["params"], "max_params")
    drop = parse_drop(max_drop)
    usable = {t.number: t for t in study.get_trials(deepcopy=False) if _usable(t)}
    frame = trials_frame(study)
    frame = _enrich(frame[frame["number"].isin(list(usable))] if len(frame) else frame, study)
    keep = pd.Series(True, index=frame.index)
    if macs is not None:
        keep &= frame["macs"].astype(float) <= macs
    if params is not None:
        keep &= frame["params"].astype(float) <= params
    if drop is not None:
        keep &= frame["accuracy_drop"].astype(float) <= drop + 1e-12
    frame = frame[keep].astype({"accuracy": float, "macs": float, "params": float})
    if frame.empty:
        return None
    if drop is None:
        order, ascending = ["accuracy", "macs", "params", "number"], [False, True, True, True]
    else:
        order, ascending = ["macs", "params", "accuracy", "number"], [True, True, False, True]
    row = frame.sort_values(order, ascending=ascending).iloc[0].copy()
    number = int(row["number"])
    row["on_front"] = number in {t.number for t in study.best_trials}
    row["plan"] = json.dumps(usable[number].user_attrs.get("plan"), sort_keys=True)
    return row


def _query_text(query: Mapping[str, Any], row: pd.Series | None) -> str:
    limits = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in query.items() if v is not None)
    if row is None:
        return f"{limits}: no trial qualifies"
    return (
        f"{limits}: trial {int(row['number'])}, accuracy {row['accuracy']:.4f} "
        f"(drop {row['accuracy_drop']:+.4f}), {int(row['macs']):,} MACs "
        f"({row['macs_compression']:.2f}x fewer), {int(row['params']):,} params "
        f"({row['params_compression']:.2f}x fewer){'' if row['on_front'] else ', off the front'}"
    )


# ---- writing -------------------------------------------------------------------------------
def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _parquet_ready(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns mixing strings with other values (int and list ranks) as JSON text."""
    out = frame.copy()
    for column in out.columns:
        values = [v for v in out[column] if not _missing(v)]
        if any(isinstance(v, str) for v in values) and not all(isinstance(v, str) for v in values):
            out[column] = [
                None if _missing(v) else v if isinstance(v, str) else json.dumps(v)
                for v in out[column]
            ]
    return out


def _write_table(frame: pd.DataFrame, folder: Path, name: str) -> list[Path]:
    csv, parquet = folder / f"{name}.csv", folder / f"{name}.parquet"
    atomic_write(csv, lambda tmp: frame.to_csv(tmp, index=False))
    ready = _parquet_ready(frame)
    atomic_write(parquet, lambda tmp: ready.to_parquet(tmp, index=False))
    return [csv, parquet]


def _fmt(value: Any, spec: str) -> str:
    if _missing(value):
        return "-"
    return format(value, spec) if spec else str(value)


def _markdown(frame: pd.DataFrame, columns: Mapping[str, tuple[str, str]]) -> str:
    """A Markdown table: ``columns`` maps a frame column to ``(header, format spec)``."""
    if frame.empty:
        return "(none yet)"
    lines = [
        "| " + " | ".join(h for h, _ in columns.values()) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for _, row in frame.iterrows():
        cells = [_fmt(row[c], spec).replace("|", "\\|") for c, (_, spec) in columns.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_FRONT_MD = {
    "number": ("trial", ""),
    "accuracy": ("accuracy", ".4f"),
    "accuracy_drop": ("drop", "+.4f"),
    "macs": ("MACs", ",.0f"),
    "macs_compression": ("MACs ÷", ".2f"),
    "params": ("params", ",.0f"),
    "params_compression": ("params ÷", ".2f"),
    "pre_ft_accuracy": ("pre-ft acc", ".4f"),
    "plan_layers": ("plan (layer:method[rank])", ""),
}


def _front_md(front: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """:data:`_FRONT_MD` plus the measured-latency columns the front has (after params)."""
    columns: dict[str, tuple[str, str]] = {}
    for key, value in _FRONT_MD.items():
        columns[key] = value
        if key == "params_compression":
            for column in latency_columns(front):
                device = column.removeprefix("latency_").removesuffix("_ms")
                columns[column] = (f"latency {device} ms", ".3f")
    return columns


def _budget_text(key: str, value: float, base: Mapping[str, Any]) -> str:
    text = f"{key} <= {value:,.3f} ms" if key == "latency" else f"{key} <= {value:,.0f}"
    return text + (f" ({value / base[key]:.2f}x baseline)" if key in base else "")


_PROXY_MD = {
    "label": ("proxy", ""),
    "n": ("trials", ""),
    "tau": ("Kendall tau", "+.3f"),
    "p_value": ("p", ".3g"),
}
_PRUNING_MD = {
    "label": ("stage", ""),
    "trials": ("trials", ""),
    "seconds_spent": ("seconds spent", ".1f"),
    "seconds_saved": ("seconds saved (est.)", ".1f"),
}


def _proxy_md(frames: Mapping[str, pd.DataFrame]) -> list[str]:
    """The "Proxy fidelity" section, when the trials record proxy scores."""
    if "proxy_correlation" not in frames:
        return []
    return [
        "## Proxy fidelity",
        "",
        "Kendall tau-b between each cheap proxy and the final proxy accuracy over the "
        "trained, completed trials (errors negated: +1 means the proxy orders candidates "
        "exactly as the fine-tune does). Pruned trials have no final accuracy and are left "
        "out. Tables: `proxy_correlation.csv`, `pruning.csv`.",
        "",
        _markdown(frames["proxy_correlation"], _PROXY_MD),
        "",
        "Trials ended before the full fine-tune (time saved = their number x the mean time "
        "of a fully fine-tuned trial - the time they took):",
        "",
        _markdown(frames["pruning"], _PRUNING_MD),
        "",
    ]


def _state_counts(study: optuna.Study) -> str:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"


_DEFAULT_QUERIES = (
    {"max_drop": "1%"},
    {"max_macs": "0.5x"},
    {"max_macs": "0.25x"},
)


def _last(frames: Mapping[str, pd.DataFrame]) -> float:
    history = frames["hypervolume"]
    return float(history["hypervolume"].iloc[-1]) if len(history) else 0.0


def _summary_md(
    study: optuna.Study,
    frames: Mapping[str, pd.DataFrame],
    queries: Sequence[tuple[dict[str, Any], pd.Series | None]],
    files: Sequence[str],
    source: str,
) -> str:
    base, limits = _baseline(study), study.user_attrs.get("limits") or {}
    ref = _reference(study)
    budget = ", ".join(_budget_text(k, v, base) for k, v in sorted(limits.items()))
    usage_columns = {
        c: (c, ".2f" if c == "mean_prune" else "") for c in frames["method_usage"].columns
    }
    history, hv = frames["hypervolume"], _last(frames)
    lines = [
        f"# Study `{study.study_name}`",
        "",
        f"Read from `{source}` at {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}. "
        f"Trials: {_state_counts(study)}. Objectives: {', '.join(_objectives(study))}.",
        "",
        f"Baseline (validation split): accuracy {base['accuracy']:.4f}, {base['macs']:,} MACs, "
        f"{base['params']:,} parameters. Budgets: {budget or 'none'}.",
        "",
        "## Pareto front (feasible, non-dominated, sorted by MACs)",
        "",
        "`drop` = baseline accuracy - accuracy; `÷` = baseline / compressed (compression "
        "factor). Accuracies are the search's proxy (short distillation) on the validation split.",
        "",
        _markdown(frames["pareto"], _front_md(frames["pareto"])),
        "",
        "## Queries",
        "",
        *[f"- {_query_text(q, row)}" for q, row in queries],
        "",
        "## Method usage on the front (trials per layer and method)",
        "",
        _markdown(frames["method_usage"], usage_columns),
        "",
        "## Hypervolume",
        "",
        f"**{hv:.4f}** over {int(history['counted'].sum()) if len(history) else 0} counted "
        "trials, in the normalised space (1 - accuracy, "
        + ", ".join(f"{n} / baseline {n}" for n in ref if n != "accuracy")
        + ") with reference point (1, ..., 1) = "
        + ", ".join(
            f"{n} {v:,.3f} ms" if n == "latency" else f"{n} {v:,.0f}" for n, v in ref.items()
        )
        + "; 1.0 would be accuracy 1 at no cost. History: `hypervolume.csv`, `hypervolume.png`.",
        "",
        *_proxy_md(frames),
        "## Files",
        "",
        ", ".join(f"`{name}`" for name in files),
    ]
    if "pareto.png" in files:
        lines += ["", "![Pareto front](pareto.png)", "", "![Method map](method_map.png)", ""]
        lines += ["![Hypervolume history](hypervolume.png)"]
    return "\n".join(lines) + "\n"


def _write_plots(
    study: optuna.Study, frames: Mapping[str, pd.DataFrame], folder: Path
) -> list[Path]:
    from . import plots

    usable = {t.number: t for t in study.get_trials(deepcopy=False) if _usable(t)}
    trials = frames["trials"]
    trials = trials[trials["number"].isin(list(usable))] if len(trials) else trials
    front = frames["pareto"]
    layers = {n: t.user_attrs.get("layers") or {} for n, t in usable.items()}
    limits = study.user_attrs.get("limits") or {}
    return [
        plots.plot_front(trials, front, _baseline(study), limits, folder / "pareto.png"),
        plots.plot_front_html(study, _objectives(study), folder / "pareto.html"),
        plots.plot_hypervolume(frames["hypervolume"], folder / "hypervolume.png"),
        plots.plot_method_map(front, layers, folder / "method_map.png"),
    ]


def snapshot(study: optuna.Study) -> optuna.Study:
    """An in-memory copy of ``study`` (trials and user attributes) as it is now.

    A live study changes while it is read; every table of one report comes from one
    snapshot, so they agree with each other (and a remote storage is queried once).
    """
    with _quiet():
        copy = optuna.create_study(study_name=study.study_name, directions=study.directions)
    for key, value in study.user_attrs.items():
        copy.set_user_attr(key, value)
    copy.add_trials(study.get_trials(deepcopy=False))
    return copy


def write_report(
    study: optuna.Study,
    folder: str | os.PathLike[str],
    *,
    max_macs: float | str | None = None,
    max_params: float | str | None = None,
    max_drop: float | str | None = None,
    plots: bool = True,
    source: str = "",
) -> dict[str, Any]:
    """Write every table, ``report.md`` and the plots into ``folder``.

    Args:
        study: the study (any state; nothing is written to its storage).
        folder: output folder (created).
        max_macs, max_params, max_drop: one query (:func:`best_trial`); without any, the
            report answers three default ones (1% drop, 0.5x and 0.25x MACs).
        plots: also write the PNG and HTML plots.
        source: where the study was read from, shown in ``report.md``.

    Returns:
        ``{"study": the snapshot reported on, "frames": {name: DataFrame}, "queries":
        [(limits, row or None)], "paths": [Path, ...], "hypervolume": float}``.
    """
    study = snapshot(study)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    frames = {
        "trials": trials_frame(study),
        "layers": layers_frame(study),
        "pareto": front_frame(study),
        "method_usage": method_usage_frame(study),
        "hypervolume": hypervolume_frame(study),
    }
    if any("kernel_error" in t.user_attrs for t in study.get_trials(deepcopy=False)):
        frames["proxy_correlation"] = proxy_correlation_frame(study)
        frames["pruning"] = pruning_frame(study)
    asked = {"max_macs": max_macs, "max_params": max_params, "max_drop": max_drop}
    wanted = [asked] if any(v is not None for v in asked.values()) else list(_DEFAULT_QUERIES)
    queries = [(q, best_trial(study, **q)) for q in wanted]
    paths: list[Path] = []
    for name in (*_TABLES, *_PROXY_TABLES):
        if name in frames:
            paths += _write_table(frames[name], folder, name)
    if plots:
        paths += _write_plots(study, frames, folder)
    report = folder / "report.md"
    text = _summary_md(study, frames, queries, [p.name for p in [*paths, report]], source)
    atomic_write(report, lambda tmp: Path(tmp).write_text(text))
    paths.append(report)
    return {
        "study": study,
        "frames": frames,
        "queries": queries,
        "paths": paths,
        "hypervolume": _last(frames),
    }


# ---- command line --------------------------------------------------------------------------
def _locate(args: argparse.Namespace) -> tuple[str, str | None, Path]:
    """``(storage, study name, default output folder)`` from the command-line arguments."""
    source = Path(args.study)
    if source.is_dir() or source.suffix in (".yaml", ".yml"):
        from ..config import load_config

        # the report runs on no device (and reads the stored config, not this one)
        cfg = load_config(source, ["device=cpu", "latency.device=cpu"])
        return args.storage or cfg.storage, args.study_name or cfg.name, cfg.folder / "report"
    storage = args.storage or args.study
    from ..search.storage import journal_path

    journal = journal_path(storage)
    if journal is not None:
        return storage, args.study_name, journal.resolve().parent / "report"
    if "://" not in storage:
        return storage, args.study_name, Path(storage).expanduser().resolve().parent / "report"
    from sqlalchemy.engine import make_url

    url = make_url(storage)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return storage, args.study_name, Path(url.database).expanduser().parent / "report"
    return storage, args.study_name, Path.cwd() / "report"


def _format_front(front: pd.DataFrame) -> str:
    if front.empty:
        return "(no feasible completed trial yet)"
    shown = pd.DataFrame(
        {
            header: [_fmt(v, spec) for v in front[column]]
            for column, (header, spec) in _front_md(front).items()
        }
    )
    return shown.to_string(index=False)


def configure_parser(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Add ``autodecomp report`` arguments to ``parser``; returns the handler."""
    parser.add_argument(
        "study",
        help="studies/<name>/study.yaml (or its folder), or a storage: SQLite or Optuna "
        "journal file, or database URL",
    )
    parser.add_argument("--storage", help="read this storage instead of the study's")
    parser.add_argument("--study-name", help="study in the storage (default: the config's)")
    parser.add_argument("-o", "--output", help="output folder (default: <study folder>/report)")
    parser.add_argument(
        "--max-macs", help="query: best trial with MACs <= this (0.5, 50%%, 0.5x, 300k, 2.5M)"
    )
    parser.add_argument("--max-params", help="query: best trial with params <= this")
    parser.add_argument(
        "--max-drop", help="query: smallest trial within this accuracy drop (0.01 or 1%%)"
    )
    parser.add_argument("--no-plots", action="store_true", help="write tables and report.md only")

    def run(args: argparse.Namespace) -> int:
        storage, name, default_folder = _locate(args)
        with _quiet():
            study = read_study(storage, name)
            result = write_report(
                study,
                Path(args.output) if args.output else default_folder,
                max_macs=args.max_macs,
                max_params=args.max_params,
                max_drop=args.max_drop,
                plots=not args.no_plots,
                source=_shown(storage),
            )
        study = result["study"]
        base = _baseline(study)
        print(
            f"study {study.study_name!r}: trials {_state_counts(study)}; baseline accuracy "
            f"{base['accuracy']:.4f}, {base['macs']:,} MACs, {base['params']:,} params"
        )
        print("Pareto front (feasible, non-dominated):")
        print(_format_front(result["frames"]["pareto"]))
        print(f"hypervolume {result['hypervolume']:.4f} (reference: accuracy 0, baseline cost)")
        for query, row in result["queries"]:
            print(f"best with {_query_text(query, row)}")
        folder = result["paths"][0].parent
        print(f"wrote {len(result['paths'])} files to {folder}")
        return 0

    return run


@contextmanager
def _quiet() -> Iterator[None]:
    """Optuna's info logs (e.g. on loading a study) are not part of the report's output."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)
