"""A stored study as the results read it: opened read-only, frozen, its baseline and objectives.

A study is read through any Optuna storage without writing to it (:func:`read_study`), so
results can be made while workers still add trials. :func:`snapshot` freezes it, so every
table of one report agrees with the others. What the search recorded is read back here:
the baseline's value of every objective (:func:`study_baseline`), the study's objectives as
registry entries (:func:`study_objectives`), and which trials count (:func:`usable`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..core.errors import ConfigError
from ..core.optuna_compat import set_metric_names
from ..measure.objectives import OBJECTIVES, ObjectiveSpec, objective, registered
from ..search.storage import open_storage_readonly, shown
from ..search.study import quiet_optuna

__all__ = [
    "feasible",
    "limits",
    "read_study",
    "snapshot",
    "state_counts",
    "study_baseline",
    "study_objectives",
    "usable",
    "value_names",
]


def read_study(storage: str, study_name: str | None = None) -> optuna.Study:
    """Load a study for reading (see :func:`~autodecomp.search.storage.open_storage_readonly`).

    Args:
        storage: a database URL or a SQLite / journal file path.
        study_name: may be left out when the storage holds a single study.

    Raises:
        ConfigError: no such storage or study (the message lists the studies there).
    """
    backend = open_storage_readonly(storage)
    names = [s.study_name for s in backend.get_all_studies()]
    if study_name is None and len(names) == 1:
        study_name = names[0]
    if study_name not in names:
        what = "give --study-name; " if study_name is None else f"no study {study_name!r}; "
        raise ConfigError(
            f"storage {shown(storage)}: {what}studies there: {', '.join(names) or 'none'}"
        )
    return optuna.load_study(study_name=study_name, storage=backend)


def snapshot(study: optuna.Study) -> optuna.Study:
    """An in-memory copy of ``study`` (trials and user attributes) as it is now.

    A live study changes while it is read; every table of one report comes from one
    snapshot, so they agree with each other (and a remote storage is queried once).
    """
    with quiet_optuna():
        copy = optuna.create_study(study_name=study.study_name, directions=study.directions)
        if study.metric_names is not None:
            set_metric_names(copy, study.metric_names)
    for key, value in study.user_attrs.items():
        copy.set_user_attr(key, value)
    copy.add_trials(study.get_trials(deepcopy=False))
    return copy


def study_baseline(study: optuna.Study) -> dict[str, Any]:
    """The baseline record (``accuracy``, ``macs``, ``params``, ...) plus the baseline's value
    of every measured objective recorded (e.g. ``latency`` on the config's latency device).

    Raises:
        ConfigError: the study has no baseline record (not made by autodecomp search).
    """
    attrs = study.user_attrs
    base = attrs.get("baseline")
    needed = {spec.name for spec in registered() if not spec.device}
    if not isinstance(base, Mapping) or not needed <= set(base):
        raise ConfigError(
            f"study {study.study_name!r} has no baseline record (user attribute 'baseline'); "
            "was it created by autodecomp search?"
        )
    out = dict(base)
    for spec in registered():
        value = spec.baseline_value(attrs) if spec.device else None
        if value is not None:
            out[spec.name] = value
    return out


def value_names(study: optuna.Study) -> list[str]:
    """The names of the study's values: its recorded objectives, else ``value_0``, ...."""
    names = (study.user_attrs.get("config") or {}).get("objectives")
    if names and len(names) == len(study.directions):
        return list(names)
    return [f"value_{i}" for i in range(len(study.directions))]


def study_objectives(study: optuna.Study) -> list[ObjectiveSpec]:
    """The study's objectives in their order, as :data:`~autodecomp.measure.objectives.OBJECTIVES`
    entries.

    Raises:
        ConfigError: the study does not record registered objectives matching its directions.
    """
    names = value_names(study)
    known = all(isinstance(n, str) and n in OBJECTIVES for n in names)
    specs = [objective(n) for n in names] if known else []
    if not any(not spec.is_cost for spec in specs):
        raise ConfigError(
            f"study {study.study_name!r} does not record its objectives (user attribute "
            "'config'); was it created by autodecomp search?"
        )
    return specs


def limits(study: optuna.Study) -> dict[str, float]:
    """The study's absolute budgets by objective name (``{"macs": 900.0}``)."""
    return dict(study.user_attrs.get("limits") or {})


def feasible(trial: FrozenTrial) -> bool:
    """Whether the trial meets every budget (no positive constraint)."""
    return all(v <= 0 for v in trial.constraints.values())


def usable(trial: FrozenTrial) -> bool:
    """COMPLETE, feasible and trained (an over-budget candidate returns accuracy 0)."""
    return (
        trial.state == TrialState.COMPLETE
        and feasible(trial)
        and not trial.user_attrs.get("over_budget")
    )


def state_counts(study: optuna.Study) -> str:
    """Trials per state, ``"5 COMPLETE, 1 PRUNED"`` (``"none"`` for an empty study)."""
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"
