"""`autodecomp search` keeps the guarantees of `autodecomp worker` (it runs the same loop):
a trial whose process was killed is failed and re-run, Ctrl-C / SIGTERM re-queue the running
plan, concurrent `search` processes on one study stop at exactly its total."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState
from processes import kill_while, wait_for
from tiny_study import make_study, tiny_config

from autodecomp.core.optuna_compat import constraints, set_constraints
from autodecomp.search.loop import COUNTED, run_trials
from autodecomp.search.storage import Heartbeat, open_storage, trial_start_lock

STUDY = tiny_config(
    name="tiny",
    space={"methods": ["tucker"], "keep": False},
    proxy={"steps": 60, "batch_size": 32, "bn_batches": 1},  # a trial trains ~0.5 s
    trials=4,
)


pytestmark = pytest.mark.usefixtures("quiet_optuna")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A study folder with its baseline trained and cached."""
    return make_study(tmp_path_factory.mktemp("guarantees"), STUDY).parent


@pytest.fixture
def folder(template, tmp_path) -> Path:
    shutil.copytree(template, tmp_path / "tiny")
    return tmp_path / "tiny"


def _url(kind: str, request, folder: Path) -> str:
    if kind == "postgres":
        return request.getfixturevalue("postgres").create_database()
    if kind == "journal":
        return f"journal:///{folder / 'study.journal'}"
    return f"sqlite:///{folder / 'study.db'}"


def _search(folder: Path, url: str, log: Path, *extra: str) -> subprocess.Popen:
    argv = ["search", str(folder / "study.yaml"), "--storage", url]
    argv += ["--heartbeat", "1", "--grace", "3", *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "autodecomp", *argv],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )


def _study(url: str) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=open_storage(url))


def _running_plan(url: str) -> optuna.trial.FrozenTrial | None:
    """The trial training now (its plan drawn), if any."""
    for trial in _study(url).get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "plan" in trial.user_attrs:
            return trial
    return None


def _training(url: str, process: subprocess.Popen, log: Path) -> optuna.trial.FrozenTrial:
    """The first trial seen training (its plan drawn) by ``process``."""
    deadline = time.monotonic() + 120
    return wait_for(process, lambda: _running_plan(url), deadline=deadline, describe=log.read_text)


def _finish(process: subprocess.Popen, log: Path, timeout: float = 150) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(log.read_text()) from None


def _check_rerun_once(trials: dict[int, optuna.trial.FrozenTrial], number: int) -> None:
    """Trial ``number`` FAILED and its parameters ran again, once, counted."""
    failed = trials[number]
    assert failed.state == TrialState.FAIL
    reruns = [t for t in trials.values() if t.system_attrs.get("failed_trial") == number]
    assert len(reruns) == 1 and reruns[0].params == failed.params
    assert reruns[0].state in COUNTED


# ---- SIGKILL: the killed trial is failed and re-run by the next search -------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_search_killed_mid_trial_then_rerun_ends_at_exactly_the_total(kind, request, folder):
    url = _url(kind, request, folder)
    log = folder / "search-1.log"
    first = _search(folder, url, log)
    try:
        killed = kill_while(first, lambda: _running_plan(url), describe=log.read_text)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    left = {t.number: t.state for t in _study(url).get_trials(deepcopy=False)}
    assert left[killed.number] == TrialState.RUNNING  # nobody ended it

    rerun_log = folder / "search-2.log"
    assert _finish(_search(folder, url, rerun_log), rerun_log) == 0, rerun_log.read_text()
    trials = {t.number: t for t in _study(url).get_trials(deepcopy=False)}
    assert not [t for t in trials.values() if t.state == TrialState.RUNNING]
    assert len([t for t in trials.values() if t.state in COUNTED]) == STUDY["trials"]
    _check_rerun_once(trials, killed.number)
    assert "4/4 trials counted" in rerun_log.read_text()
    table = pd.read_csv(folder / "trials.csv")  # the tables of the rerun: nothing RUNNING
    assert "RUNNING" not in set(table.state)


# ---- Ctrl-C and SIGTERM re-queue the running plan ------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_search_requeues_the_running_plan(sig, request, folder):
    url = _url("sqlite", request, folder)
    log = folder / "search-1.log"
    first = _search(folder, url, log)
    try:
        running = _training(url, first, log)
        first.send_signal(sig)
        assert _finish(first, log, timeout=60) == 130, log.read_text()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert "the running trial is re-queued" in log.read_text()
    trials = {t.number: t for t in _study(url).get_trials(deepcopy=False)}
    # a loaded machine may finish the trial seen training before the signal lands: then
    # the next one is the interrupted one
    (interrupted,) = [n for n, t in trials.items() if t.state == TrialState.FAIL]
    assert interrupted >= running.number
    waiting = [t for t in trials.values() if t.state == TrialState.WAITING]
    assert [t.system_attrs["failed_trial"] for t in waiting] == [interrupted]
    assert waiting[0].params == trials[interrupted].params
    assert "WAITING" in set(pd.read_csv(folder / "trials.csv").state)  # tables written

    rerun_log = folder / "search-2.log"
    assert _finish(_search(folder, url, rerun_log), rerun_log) == 0, rerun_log.read_text()
    trials = {t.number: t for t in _study(url).get_trials(deepcopy=False)}
    assert len([t for t in trials.values() if t.state in COUNTED]) == STUDY["trials"]
    assert not [t for t in trials.values() if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    _check_rerun_once(trials, interrupted)


# ---- two searches on one study -------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_searches_on_one_new_study_stop_at_exactly_the_total(kind, request, folder):
    url = _url(kind, request, folder)
    logs = [folder / f"search-{i}.log" for i in range(2)]
    processes = [_search(folder, url, log, "--trials", "6") for log in logs]
    try:
        codes = [_finish(p, log) for p, log in zip(processes, logs, strict=True)]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert codes == [0, 0], "\n".join(log.read_text() for log in logs)
    study = _study(url)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 6, states
    assert set(states) <= {*COUNTED, TrialState.FAIL}
    pids = {t.user_attrs["worker"]["pid"] for t in study.get_trials(deepcopy=False)}
    assert pids <= {p.pid for p in processes}
    assert all(t.user_attrs["worker"]["command"] == "search" for t in study.trials)


# ---- a re-queued trial sets its own constraints ------------------------------------------------
@pytest.mark.parametrize("named", [True, False], ids=["set_constraint", "set_constraints"])
def test_requeued_trial_sets_its_own_constraints_without_a_warning(tmp_path, named):
    url = f"journal:///{tmp_path / 'j.journal'}"
    storage = open_storage(url, Heartbeat(interval=1))
    study = optuna.create_study(study_name="t", storage=storage)
    calls = []

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        calls.append(x)
        value = len(calls) - 1.5  # -0.5 on the first run, then more
        if named:  # Optuna 5's own record (studies made before autodecomp's)
            trial.set_constraint("macs", value)
        else:
            set_constraints(trial, {"macs": value})
        if len(calls) == 1:
            raise KeyboardInterrupt
        return x

    lock = lambda: trial_start_lock(url, storage, "t")  # noqa: E731
    retry = Heartbeat(interval=1).retry_callback()
    with pytest.raises(KeyboardInterrupt):
        run_trials(study, objective, 1, lock, retry=retry)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna's "constraint value is ignored" is a UserWarning
        assert run_trials(study, objective, 1, lock, retry=retry) == 1
    failed, rerun = study.trials
    assert rerun.params == failed.params and rerun.system_attrs["failed_trial"] == 0
    assert constraints(failed) == {"macs": -0.5} and constraints(rerun) == {"macs": 0.5}
