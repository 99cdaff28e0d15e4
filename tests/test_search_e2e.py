"""End to end: `autodecomp search` on a tiny digits study, its tables, resume and Ctrl-C."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from tiny_study import SHORT_PROXY, make_study, tiny_config

import autodecomp as ad
from autodecomp.cli import main
from autodecomp.config import load_config
from autodecomp.search import objective as objective_module
from autodecomp.search.baseline import cache_paths
from autodecomp.search.study import COUNTED
from autodecomp.workload.models import get_model

STUDY = tiny_config(
    baseline={"epochs": 3},
    space={"methods": ["tucker"]},
    proxy=SHORT_PROXY,
    budgets={"max_macs": 0.5},
    trials=6,
    # the dense model is over budget; tucker at 15% is well within it
    warm_start=[{"method": "keep"}, {"method": "tucker", "ratio": 0.15}],
)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A study folder with its baseline already trained and cached (copied by each test)."""
    return make_study(tmp_path_factory.mktemp("template"), STUDY).parent


@pytest.fixture
def study_yaml(template, tmp_path) -> Path:
    folder = tmp_path / "tiny"
    shutil.copytree(template, folder)
    return folder / "study.yaml"


def _load(path: Path) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{path.parent / 'study.db'}")


def _counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=COUNTED)


def _dominates(a: pd.Series, b: pd.Series) -> bool:
    better_or_equal = a.accuracy >= b.accuracy and a.macs <= b.macs
    return better_or_equal and (a.accuracy > b.accuracy or a.macs < b.macs)


def test_search_writes_a_feasible_nondominated_front(study_yaml, capsys):
    assert main(["search", str(study_yaml)]) == 0
    out = capsys.readouterr().out
    folder = study_yaml.parent
    study = _load(study_yaml)
    assert len(_counted(study)) == 6
    assert "baseline: reusing" in out and "Pareto front" in out

    trials = pd.read_csv(folder / "trials.csv")
    layers = pd.read_csv(folder / "layers.csv")
    front = pd.read_csv(folder / "pareto.csv")
    assert list(trials.number) == [t.number for t in study.trials]
    assert len(layers) == 3 * trials.methods.notna().sum()  # conv2..conv4 per counted trial

    dense = trials[trials.number == 0].iloc[0]  # the enqueued all-keep trial
    assert dense.over_budget and not dense.feasible and dense.accuracy == 0.0
    assert dense.macs_ratio == 1.0 and dense.constraint_macs == pytest.approx(1.0)
    assert pd.isna(dense.pre_ft_accuracy)

    assert sorted(front.number) == sorted(t.number for t in study.best_trials)
    assert len(front) >= 1 and front.feasible.all() and (front.constraint_macs <= 0).all()
    assert list(front.macs) == sorted(front.macs)
    done = trials[(trials.state == "COMPLETE") & (trials.feasible == True)]  # noqa: E712
    for _, row in front.iterrows():
        assert not any(_dominates(other, row) for _, other in done.iterrows())
        assert f"{row.accuracy:.4f}" in out

    cfg = load_config(study_yaml)
    baseline = get_model("digits_cnn", in_channels=1)
    baseline.load_state_dict(torch.load(cache_paths(cfg)[0], weights_only=True))
    for _, row in front.iterrows():
        model = ad.apply_plan(baseline, json.loads(row.plan))
        assert ad.count_macs(model, (1, 8, 8)) == row.macs
        assert ad.count_params(model) == row.params

    assert study.user_attrs["config"] == cfg.to_dict()
    assert study.user_attrs["baseline"]["macs"] == ad.count_macs(baseline, (1, 8, 8))


def test_resume_continues_without_duplicates(study_yaml, capsys):
    # no "keep": every trial draws three float ratios, so equal params would mean a replay
    search = ["search", str(study_yaml), "--set", "space.keep=false"]
    search += ["--set", "warm_start=[{method: tucker, ratio: 0.15}]"]
    assert main([*search, "--trials", "3"]) == 0
    assert len(_counted(_load(study_yaml))) == 3
    assert main([*search, "--trials", "5"]) == 0
    study = _load(study_yaml)
    assert len(_counted(study)) == len(study.trials) == 5
    assert [t.number for t in study.trials] == list(range(5))
    assert sum("warm_start" in t.user_attrs for t in study.trials) == 1  # enqueued once
    params = [json.dumps(t.params, sort_keys=True) for t in study.trials]
    assert len(set(params)) == 5
    assert len(pd.read_csv(study_yaml.parent / "trials.csv")) == 5
    assert main([*search, "--trials", "5"]) == 0  # already done: no new trial
    assert len(_load(study_yaml).trials) == 5
    capsys.readouterr()
    assert main([*search, "--trials", "3"]) == 0  # fewer than the study has
    out = capsys.readouterr().out
    assert "study 'tiny': 5 trials done (more than trials: 3); nothing to run" in out
    assert "5 trials counted (more than trials: 3) (0 failed)" in out and "5/3" not in out
    assert len(_load(study_yaml).trials) == 5

    # anything but trials / storage / device / threads must match the stored config
    assert main([*search, "--set", "proxy.steps=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("autodecomp: error: study 'tiny' was created with proxy.steps=4")
    assert len(err.splitlines()) == 1


def test_ctrl_c_writes_tables_requeues_the_plan_then_resumes(study_yaml, monkeypatch):
    calls = []
    run = objective_module.Objective._run

    def interrupted(self, trial, clock):
        calls.append(trial.number)
        if len(calls) == 3:  # Ctrl-C once the plan is drawn
            objective_module.suggest_plan(trial, self.space)
            raise KeyboardInterrupt
        return run(self, trial, clock)

    monkeypatch.setattr(objective_module.Objective, "_run", interrupted)
    assert main(["search", str(study_yaml), "--trials", "4"]) == 130
    trials = pd.read_csv(study_yaml.parent / "trials.csv")
    assert list(trials.state) == ["COMPLETE", "COMPLETE", "FAIL", "WAITING"]
    assert (study_yaml.parent / "pareto.csv").exists()
    failed, waiting = _load(study_yaml).trials[2:]
    assert waiting.params == failed.params and "conv2/method" in failed.params
    assert waiting.system_attrs["failed_trial"] == 2

    monkeypatch.setattr(objective_module.Objective, "_run", run)
    assert main(["search", str(study_yaml), "--trials", "4"]) == 0
    study = _load(study_yaml)
    assert len(_counted(study)) == 4 and len(study.trials) == 5
    rerun = study.trials[3]  # the re-queued plan ran first
    assert rerun.state in COUNTED and rerun.params == failed.params
