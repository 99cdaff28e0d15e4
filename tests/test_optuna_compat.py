"""The Optuna compatibility door (autodecomp/core/optuna_compat.py) on the installed Optuna.

CI runs this file twice: on the newest Optuna the range allows, and on its floor (the
min-versions step of .ci/run), so each wrapped private API is checked at both ends.
"""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FixedTrial, TrialState, create_trial
from packaging.requirements import Requirement
from packaging.version import Version

from autodecomp.core import optuna_compat as compat
from autodecomp.search.storage import Heartbeat, HeartbeatJournalStorage

ROOT = Path(__file__).resolve().parents[1]


def _declared(name: str) -> Requirement:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (req,) = [r for r in map(Requirement, project["dependencies"]) if r.name == name]
    return req


def test_installed_optuna_is_inside_the_declared_range():
    declared = _declared("optuna").specifier
    assert str(declared) == str(Requirement(f"optuna{compat.SUPPORTED}").specifier)
    assert Version(optuna.__version__) in declared
    assert compat.version_supported()
    assert compat.version_supported("5.0.0") and compat.version_supported("5.9.1.dev0")
    assert not compat.version_supported("4.9.0") and not compat.version_supported("6.0.0")


def test_compute_hypervolume_is_exact():
    one = np.ones(2)
    assert compat.compute_hypervolume(np.array([[0.5, 0.5]]), one) == pytest.approx(0.25)
    two = np.array([[0.2, 0.6], [0.6, 0.2]])
    assert compat.compute_hypervolume(two, one) == pytest.approx(0.8 * 0.4 * 2 - 0.4 * 0.4)
    three = np.array([[0.5, 0.5, 0.5], [0.9, 0.9, 0.9]])  # the second is dominated
    assert compat.compute_hypervolume(three, np.ones(3)) == pytest.approx(0.125)


def test_heartbeat_protocol_fails_a_silent_trial(tmp_path):
    """Optuna drives our BaseHeartbeat subclass: a RUNNING trial without beats goes FAIL."""
    assert set(compat.BaseHeartbeat.__abstractmethods__) <= set(dir(HeartbeatJournalStorage))
    storage = HeartbeatJournalStorage(tmp_path / "j.journal", Heartbeat(interval=1, grace=1))
    assert isinstance(storage, compat.BaseHeartbeat)
    study = optuna.create_study(storage=storage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "heartbeat ... used with Study.optimize"
        trial = study.ask()
    storage.record_heartbeat(compat.trial_id(trial))
    time.sleep(1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    assert study.trials[0].state == TrialState.FAIL


def test_trial_id_is_the_storage_id():
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    for frozen in study.trials:
        assert storage.get_trial(compat.trial_id(frozen)).number == frozen.number


def test_constraints_are_named_and_read_by_optuna():
    study = optuna.create_study(directions=["maximize", "minimize"])

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        x = trial.suggest_float("x", 0.0, 1.0)
        compat.set_constraints(trial, {"macs": x - 0.5, "params": -1.0})
        assert compat.constraints(trial) == {"macs": x - 0.5, "params": -1.0}
        return x, x

    study.enqueue_trial({"x": 0.9})
    study.enqueue_trial({"x": 0.2})
    study.optimize(objective, n_trials=2)
    over, under = study.trials
    assert compat.constraints(over) == {"macs": pytest.approx(0.4), "params": -1.0}
    assert over.system_attrs["constraints"] == [pytest.approx(0.4), -1.0]  # the dashboard's
    assert over.constraints == {"0": pytest.approx(0.4), "1": -1.0}  # Optuna's samplers'
    assert study.best_trials == [under]  # the over-budget trial is infeasible to Optuna


def test_constraints_on_other_trials_and_older_records():
    fixed = FixedTrial({"x": 0.1})
    compat.set_constraints(fixed, {"macs": 0.5})
    assert compat.constraints(fixed) == {"macs": 0.5}
    compat.set_constraints(fixed, {})  # no budget: nothing written, nothing changed
    assert compat.constraints(fixed) == {"macs": 0.5}
    with pytest.raises(ValueError, match="NaN"):
        compat.set_constraints(fixed, {"macs": float("nan")})

    def frozen(**system_attrs):
        return create_trial(
            params={"x": 0.1},
            distributions={"x": FloatDistribution(0, 1)},
            value=0.1,
            system_attrs=system_attrs,
        )

    legacy = frozen(**{"constraints:macs": 0.25})  # Optuna 5's trial.set_constraint
    assert compat.constraints(legacy) == {"macs": 0.25}
    unnamed = frozen(constraints=[0.1, -0.2])  # a sampler's constraints_func
    assert compat.constraints(unnamed) == {"0": 0.1, "1": -0.2}
    assert compat.constraints(frozen()) == {}
    attrs = {"constraints": [1.0], compat.CONSTRAINT_NAMES_KEY: ["macs"], "constraints:x": 1}
    assert compat.without_constraints({**attrs, "failed_trial": 3}) == {"failed_trial": 3}


def test_a_study_made_before_keeps_its_constraint_form():
    """Resuming a study whose trials hold ``constraints:<name>`` keys: new trials write the
    same keys, so Optuna's GP sampler (one set of constraint names per study) still runs."""
    study = optuna.create_study(sampler=optuna.samplers.GPSampler(seed=0, n_startup_trials=2))
    for x in (0.1, 0.7):
        study.add_trial(
            create_trial(
                params={"x": x},
                distributions={"x": FloatDistribution(0, 1)},
                value=x,
                system_attrs={"constraints:macs": x - 0.5},
            )
        )

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        compat.set_constraints(trial, {"macs": x - 0.5})
        return x

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.optimize(objective, n_trials=2)
    new = study.trials[2:]
    assert all(t.state == TrialState.COMPLETE for t in new)
    assert all(t.constraints == {"macs": t.params["x"] - 0.5} for t in new)
    assert all("constraints" not in t.system_attrs for t in new)


def test_metric_names_without_a_warning():
    study = optuna.create_study(directions=["maximize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.set_metric_names(study, ("accuracy", "macs"))
    assert study.metric_names == ["accuracy", "macs"]


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("optuna._hypervolume", "compute_hypervolume"),
        ("optuna.storages._heartbeat", "BaseHeartbeat"),
    ],
)
def test_a_missing_private_api_is_one_clear_error(module, name):
    """An Optuna that renamed a private API: importing autodecomp's door says what to install."""
    code = f"import {module} as m\ndel m.{name}\nimport autodecomp.core.optuna_compat\n"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("autodecomp.core.optuna_compat.OptunaCompatError: autodecomp needs")
    assert f"{module}.{name}" in last and f"pip install 'optuna{compat.SUPPORTED}'" in last
