"""The one door to what Optuna keeps private, and the budget-constraint record.

autodecomp relies on three things that are not Optuna's public API; each is looked up here
once, at import, so an Optuna release that moved one fails at once with a message naming
the supported range (:data:`SUPPORTED`, the same as pyproject's requirement) instead of deep
inside a search:

- ``optuna._hypervolume.compute_hypervolume`` (exact hypervolume, :func:`compute_hypervolume`);
- ``optuna.storages._heartbeat.BaseHeartbeat`` (the heartbeat protocol, :data:`BaseHeartbeat`);
- ``FrozenTrial._trial_id`` (a trial's storage id, :func:`trial_id`).

Budget constraints are written as the ``constraints`` system attribute, a list of floats in
the order of the names kept beside it (:func:`set_constraints`). That list is what
optuna-dashboard shows and colours infeasible trials by, and Optuna reads it as
``FrozenTrial.constraints`` (keys ``"0"``, ``"1"``, ...) for its samplers; Optuna 5's
``trial.set_constraint`` keys (``constraints:<name>``) are invisible to the dashboard.
:func:`constraints` reads either form back by name.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import FixedTrial, FrozenTrial, TrialState

__all__ = [
    "CONSTRAINTS_KEY",
    "CONSTRAINT_NAMES_KEY",
    "SUPPORTED",
    "BaseHeartbeat",
    "OptunaCompatError",
    "compute_hypervolume",
    "constraints",
    "set_constraints",
    "set_metric_names",
    "trial_id",
    "version_supported",
    "without_constraints",
]

SUPPORTED = ">=5.0,<6"  # keep equal to pyproject's optuna requirement (tests/test_optuna_compat)
_LOWEST, _BEYOND = (5, 0), (6, 0)
CONSTRAINTS_KEY = "constraints"  # read by optuna-dashboard and by FrozenTrial.constraints
CONSTRAINT_NAMES_KEY = "autodecomp:constraint_names"
_NAMED_PREFIX = f"{CONSTRAINTS_KEY}:"  # Optuna 5's trial.set_constraint keys (older studies)


class OptunaCompatError(ImportError):
    """The installed Optuna lacks an API autodecomp needs (outside :data:`SUPPORTED`)."""


def version_supported(version: str = optuna.__version__) -> bool:
    """Whether ``version`` (default: the installed Optuna's) is inside :data:`SUPPORTED`."""
    release = tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())
    return _LOWEST <= release < _BEYOND


def _missing(what: str, err: Exception) -> OptunaCompatError:
    return OptunaCompatError(
        f"autodecomp needs {what}, which optuna {optuna.__version__} lacks ({err}); "
        f"install a supported release: pip install 'optuna{SUPPORTED}'"
    )


try:
    from optuna._hypervolume import compute_hypervolume as _compute_hypervolume
except ImportError as err:
    raise _missing("optuna._hypervolume.compute_hypervolume", err) from None
try:
    from optuna.storages._heartbeat import BaseHeartbeat
except ImportError as err:
    raise _missing("optuna.storages._heartbeat.BaseHeartbeat", err) from None
if not hasattr(FrozenTrial, "constraints"):
    raise _missing("FrozenTrial.constraints", AttributeError("no such property"))


def compute_hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Exact hypervolume dominated by ``points`` (rows, minimised) up to ``reference``."""
    return float(_compute_hypervolume(np.asarray(points, float), np.asarray(reference, float)))


def set_metric_names(study: optuna.Study, names: Sequence[str]) -> None:
    """Name the study's values (shown by optuna-dashboard and ``trials_dataframe``); Optuna
    still marks ``set_metric_names`` experimental, and its warning is not the user's concern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(names))


def trial_id(trial: FrozenTrial | optuna.Trial) -> int:
    """The trial's id in its storage (not its number)."""
    try:
        return int(trial._trial_id)
    except AttributeError as err:
        raise _missing("the trial's storage id (_trial_id)", err) from None


def _system_attr_writer(trial: Any) -> Callable[[str, Any], None]:
    if isinstance(trial, optuna.Trial):
        storage, number = trial.storage, trial_id(trial)
        return lambda key, value: storage.set_trial_system_attr(number, key, value)
    if isinstance(trial, FrozenTrial | FixedTrial):
        return trial.system_attrs.__setitem__
    raise TypeError(f"cannot record constraints on a {type(trial).__name__}")


def _named_study(trial: Any) -> bool:
    """Whether the trial's study records constraints as ``trial.set_constraint`` keys (made
    before this record): it keeps that form, since Optuna's GP sampler needs one form."""
    if not isinstance(trial, optuna.Trial):
        return False
    for done in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if CONSTRAINTS_KEY in done.system_attrs:
            return False
        if any(key.startswith(_NAMED_PREFIX) for key in done.system_attrs):
            return True
    return False


def set_constraints(
    trial: optuna.Trial | FrozenTrial | FixedTrial, values: Mapping[str, float]
) -> None:
    """Record the trial's constraint values by name (feasible when each is <= 0).

    Written as the ``constraints`` list (what optuna-dashboard and Optuna's samplers read)
    with the names beside it; nothing is written for no constraint. In a study made before
    this record (``trial.set_constraint`` keys) the trial keeps the study's form.

    Raises:
        ValueError: a value is NaN.
    """
    if not values:
        return
    names = list(values)
    numbers = [float(values[name]) for name in names]
    if any(math.isnan(v) for v in numbers):
        raise ValueError(
            f"constraint values must not be NaN: {dict(zip(names, numbers, strict=True))}"
        )
    if _named_study(trial):
        for name, number in zip(names, numbers, strict=True):
            trial.set_constraint(name, number)
        return
    write = _system_attr_writer(trial)
    write(CONSTRAINT_NAMES_KEY, names)  # names first: values without names read as 0, 1, ...
    write(CONSTRAINTS_KEY, numbers)


def _system_attrs(trial: Any) -> Mapping[str, Any]:
    if isinstance(trial, optuna.Trial):
        return trial.storage.get_trial_system_attrs(trial_id(trial))
    return trial.system_attrs


def constraints(trial: optuna.Trial | FrozenTrial | FixedTrial) -> dict[str, float]:
    """The trial's constraint values by name (``{}`` when none was recorded).

    Reads :func:`set_constraints`' record, and also Optuna's own forms: ``trial.set_constraint``
    keys (studies made before this record) and an unnamed list (keys ``"0"``, ``"1"``, ...).
    """
    attrs = _system_attrs(trial)
    listed, names = attrs.get(CONSTRAINTS_KEY), attrs.get(CONSTRAINT_NAMES_KEY)
    out: dict[str, float] = {}
    if listed is not None:
        named = names is not None and len(names) == len(listed)
        keys = names if named else range(len(listed))
        out = {str(k): float(v) for k, v in zip(keys, listed, strict=True)}
    for key, value in attrs.items():
        if key.startswith(_NAMED_PREFIX):
            out[key[len(_NAMED_PREFIX) :]] = float(value)
    return out


def without_constraints(system_attrs: Mapping[str, Any]) -> dict[str, Any]:
    """``system_attrs`` less every constraint record (for a trial re-queued after a failure)."""
    return {
        key: value
        for key, value in system_attrs.items()
        if key not in (CONSTRAINTS_KEY, CONSTRAINT_NAMES_KEY) and not key.startswith(_NAMED_PREFIX)
    }
