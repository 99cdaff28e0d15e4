"""`space.init: data` in the search: data-aware layers in the trials, replayed by export."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from tiny_study import make_study, tiny_config

from autodecomp.config import load_config
from autodecomp.core.errors import ConfigError
from autodecomp.measure.cost import count_macs
from autodecomp.search.baseline import load_baseline
from autodecomp.search.objective import Objective
from autodecomp.search.space import uniform_params
from autodecomp.search.study import prepare
from autodecomp.ship import export, model_file

STUDY = tiny_config(
    baseline={"epochs": 3},
    space={"methods": ["tucker", "tr"], "init": "data"},
    proxy={"steps": 0, "bn_batches": 1, "calibration_size": 64},
    budgets={"max_macs": 0.9},
    trials=2,
    warm_start=[{"method": "tucker", "ratio": 0.2}, {"method": "tr", "ratio": 0.2}],
)


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory.mktemp("data_init"), STUDY, search=True)


def test_unknown_init_is_a_config_error(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    with pytest.raises(ConfigError, match=r"unknown space\.init 'kernel'; valid: weight, data"):
        load_config(path, ["space.init=kernel"])


def test_trials_fit_layer_outputs_better_than_weight_init(searched):
    cfg = load_config(searched)
    prepared = prepare(cfg)
    baseline = load_baseline(cfg, prepared.model, prepared.splits)
    errors = {}
    for init in ("weight", "data"):
        space = dataclasses.replace(prepared.space, init=init)
        objective = Objective(cfg, space, baseline, prepared.splits)
        study = optuna.create_study(directions=cfg.directions)
        for method in ("tucker", "tr"):
            study.enqueue_trial(uniform_params(space, method, 0.2))
        study.optimize(objective, n_trials=2)
        for trial in study.trials:
            plan = trial.user_attrs["plan"]
            assert all(e.get("init") == ("data" if init == "data" else None) for e in plan.values())
        errors[init] = [t.user_attrs["layer_output_error"] for t in study.trials]
    # same ranks, per-layer output error on the calibration batch: lower with data init
    for weight_error, data_error in zip(errors["weight"], errors["data"], strict=True):
        assert data_error < 0.8 * weight_error


def test_export_rebuilds_the_data_initialised_trial(searched, tmp_path):
    cfg = load_config(searched)
    study = optuna.load_study(study_name="tiny", storage=cfg.storage)
    trial = study.trials[0]
    assert all(e["init"] == "data" for e in trial.user_attrs["plan"].values())
    result = export.export_trial(cfg, 0, tmp_path / "t0.pt")
    assert count_macs(result.model, (1, 8, 8)) == trial.user_attrs["macs"]
    # steps = 0: the export's model is the search's (before the proxy), so the validation
    # accuracy after the same BN recalibration equals the trial's objective
    assert result.meta["metrics"]["val_accuracy"] == pytest.approx(trial.values[0])
    x = torch.ones(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model_file.load(result.path)(x), result.model.eval()(x))
