"""The allocation ladder built by every process through the study's storage: ``create``
scores nothing, each unit is scored exactly once by concurrent workers, a dead worker's unit
is re-queued, an interrupted build resumes, and the ladder equals the one-process ladder."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from processes import kill_while
from tiny_study import make_study, tiny_config

from autodecomp.cli import main
from autodecomp.config import load_config
from autodecomp.search import ladder_units
from autodecomp.search.allocate import OPTION_SCORES, Ladder, allocation_ladder
from autodecomp.search.baseline import load_baseline
from autodecomp.search.ladder_units import (
    UNIT_ATTR,
    enqueue_units,
    ladder_build,
    units_study_name,
)
from autodecomp.search.ladder_units import (
    ladder_units as units_of,
)
from autodecomp.search.storage import Heartbeat, open_storage
from autodecomp.search.study import prepare, run_search
from autodecomp.search.worker import run_worker

STUDY = tiny_config(
    name="tiny",
    space={"methods": ["tucker", "cp"]},
    proxy={"steps": 3, "batch_size": 32, "bn_batches": 1, "calibration_size": 16},
    budgets={"max_macs": 0.8},
    trials=2,
    initial_design={"plans": 2, "grid": 3, "tracks": 1},
)
UNITS = 2 * 3 + 2  # (tucker, cp) x 3 grid ratios + one uniform unit per method


pytestmark = pytest.mark.usefixtures("quiet_optuna")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A study folder with its baseline trained and cached."""
    return make_study(tmp_path_factory.mktemp("units"), STUDY).parent


@pytest.fixture(scope="module")
def one_process(template):
    """The ladder one process builds (:func:`allocation_ladder`), as the study stores it."""
    cfg = load_config(template / "study.yaml")
    prepared = prepare(cfg)
    baseline = load_baseline(cfg, prepared.model, prepared.splits)
    rungs = allocation_ladder(cfg, prepared.space, baseline, prepared.splits, 3)
    return [list(rung) for rung in rungs], rungs.scores


def _copy(template: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    shutil.copytree(template, folder)
    return folder


def _storage_url(kind: str, request, folder: Path) -> str:
    if kind == "postgres":
        return request.getfixturevalue("postgres").create_database()
    if kind == "journal":
        return f"journal:///{folder / 'study.journal'}"
    return f"sqlite:///{folder / 'study.db'}"


def _assert_same_ladder(study: optuna.Study, one_process) -> None:
    rungs, scores = one_process
    assert study.user_attrs[Ladder.ATTR]["rungs"] == rungs
    assert study.user_attrs[OPTION_SCORES] == scores
    first = next(t for t in study.get_trials(deepcopy=False) if Ladder.rung_of(t) is not None)
    assert Ladder.rung_of(first) == 0 and first.params == rungs[0][1]


def test_create_scores_nothing_and_enqueues_every_unit(template, tmp_path, monkeypatch):
    def scored(*args, **kwargs):
        raise AssertionError("create scored a unit")

    monkeypatch.setattr(ladder_units, "unit_options", scored)
    monkeypatch.setattr(ladder_units, "uniform_candidates", scored)
    folder = _copy(template, tmp_path)
    url = f"journal:///{folder / 'study.journal'}"
    assert main(["create", str(folder / "study.yaml"), "--storage", url]) == 0

    storage = open_storage(url)
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert Ladder.ATTR not in study.user_attrs and not study.get_trials()
    units = optuna.load_study(study_name=units_study_name("tiny"), storage=storage)
    trials = units.get_trials()
    assert [t.state for t in trials] == [TrialState.WAITING] * UNITS
    cfg = load_config(folder / "study.yaml")
    expected = units_of(cfg, prepare(cfg).space)
    claimed = [t.user_attrs[UNIT_ATTR] for t in trials]
    assert sorted(map(str, claimed)) == sorted(map(str, expected)) and len(expected) == UNITS
    # the dearest first: the uniform units, then the highest grid ratio of every method
    assert [u.get("index") for u in claimed] == [None, None, 2, 2, 1, 1, 0, 0]


def test_a_study_without_ladder_has_no_units(template, tmp_path):
    folder = _copy(template, tmp_path)
    url = f"journal:///{folder / 'study.journal'}"
    assert main(["create", str(folder / "study.yaml"), "--storage", url, "--set",
                 "initial_design.plans=0"]) == 0  # fmt: skip
    assert [s.study_name for s in open_storage(url).get_all_studies()] == ["tiny"]


def _worker(url: str, index: int, log: Path, grace: int = 5) -> subprocess.Popen:
    argv = ["worker", "--study", "tiny", "--storage", url, "--index", str(index)]
    argv += ["--trials-total", "1", "--heartbeat", "1", "--grace", str(grace)]
    return subprocess.Popen(
        [sys.executable, "-m", "autodecomp", *argv],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )


def _scored_units(*logs: Path) -> Counter:
    """How often each unit was scored, from the workers' lines ``ladder unit <unit>: ...``."""
    units = [m for log in logs for m in re.findall(r"ladder unit (.+?): ", log.read_text())]
    return Counter(units)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind", [pytest.param("postgres", marks=pytest.mark.postgres), "journal", "sqlite"]
)
def test_two_workers_score_each_unit_once_and_build_the_one_process_ladder(
    kind, request, template, tmp_path, one_process
):
    folder = _copy(template, tmp_path)
    url = _storage_url(kind, request, folder)
    assert main(["create", str(folder / "study.yaml"), "--storage", url]) == 0
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    workers = [_worker(url, i, log) for i, log in enumerate(logs)]
    try:
        for worker, log in zip(workers, logs, strict=True):
            assert worker.wait(timeout=240) == 0, log.read_text()
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()

    scored = _scored_units(*logs)
    assert len(scored) == UNITS and set(scored.values()) == {1}, scored
    storage = open_storage(url)
    assert [s.study_name for s in storage.get_all_studies()] == ["tiny"]  # units deleted
    study = optuna.load_study(study_name="tiny", storage=storage)
    record = ladder_build(study)
    assert record["completed"] == UNITS and record["failed"] == 0
    assert sum(record["by_process"].values()) == UNITS
    assert {str(w.pid) for w in workers} >= set(record["by_process"])
    assert sum("allocation ladder stored" in log.read_text() for log in logs) == 1
    _assert_same_ladder(study, one_process)


@pytest.mark.slow
def test_a_dead_workers_unit_is_requeued(template, tmp_path, one_process):
    folder = _copy(template, tmp_path)
    url = f"journal:///{folder / 'study.journal'}"
    assert main(["create", str(folder / "study.yaml"), "--storage", url]) == 0
    units = optuna.load_study(study_name=units_study_name("tiny"), storage=open_storage(url))
    victim = _worker(url, 0, tmp_path / "victim.log", grace=3)
    try:
        kill_while(
            victim,
            lambda: units.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) or None,
            describe=(tmp_path / "victim.log").read_text,
        )
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    lost = units.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    assert len(lost) == 1

    result = run_worker("tiny", url, total=1, index=1, heartbeat=Heartbeat(interval=1, grace=3))
    assert result.finished
    study = optuna.load_study(study_name="tiny", storage=open_storage(url))
    record = ladder_build(study)
    assert record["failed"] == 1 and record["completed"] == UNITS
    _assert_same_ladder(study, one_process)


def test_an_interrupted_build_resumes(template, tmp_path, monkeypatch, one_process):
    folder = _copy(template, tmp_path)
    cfg = load_config(folder / "study.yaml")
    scored = ladder_units.unit_options
    calls: list[int] = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return scored(*args, **kwargs)

    monkeypatch.setattr(ladder_units, "unit_options", interrupted)
    result = run_search(cfg)
    assert result.interrupted and Ladder.ATTR not in result.study.user_attrs
    assert not result.study.get_trials()
    storage = open_storage(cfg.storage)
    units = optuna.load_study(study_name=units_study_name("tiny"), storage=storage)
    states = Counter(t.state for t in units.get_trials())
    # the 2 uniform units, 2 option units, the third interrupted and re-queued
    assert states == {TrialState.COMPLETE: 4, TrialState.FAIL: 1, TrialState.WAITING: UNITS - 4}

    monkeypatch.setattr(ladder_units, "unit_options", scored)
    result = run_search(cfg)
    assert not result.interrupted
    record = ladder_build(result.study)
    assert record["completed"] == UNITS and record["failed"] == 1
    _assert_same_ladder(result.study, one_process)
    assert len(result.study.get_trials(states=(TrialState.COMPLETE,))) == STUDY["trials"]


def test_a_leftover_companion_of_an_interrupted_create_is_replaced(template, tmp_path):
    folder = _copy(template, tmp_path)
    cfg = load_config(folder / "study.yaml")
    storage = open_storage(cfg.storage)
    space = prepare(cfg).space
    enqueue_units(storage, cfg, space)
    units = optuna.load_study(study_name=units_study_name("tiny"), storage=storage)
    units.enqueue_trial({}, user_attrs={UNIT_ATTR: {"kind": "uniform", "method": "tt"}})
    assert main(["create", str(folder / "study.yaml")]) == 0
    units = optuna.load_study(study_name=units_study_name("tiny"), storage=storage)
    assert len(units.get_trials()) == UNITS
