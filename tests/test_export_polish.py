"""Export's polish: CP / PDP factors refitted at full precision before extra fine-tuning, while
an export without extra epochs keeps exactly the trial's factors."""

from __future__ import annotations

import pytest
import torch
from optuna.trial import TrialState
from tiny_study import SHORT_PROXY, make_study, tiny_config

import autodecomp as ad
from autodecomp.config import load_config
from autodecomp.results.report import read_study
from autodecomp.ship import export

STUDY = tiny_config(
    space={"methods": ["cp", "pdp"], "ratio": {"range": [0.1, 0.5], "log": True}},
    proxy={**SHORT_PROXY, "floor_step": 2},
    trials=2,
    warm_start=[{"method": "cp", "ratio": 0.3}, {"method": "pdp", "ratio": 0.2}],
)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    return make_study(tmp_path_factory.mktemp("export_polish"), STUDY, search=True)


def test_polished_plan_marks_only_methods_with_a_precision():
    plan = {
        "a": {"method": "cp", "ratio": 0.3},
        "b": {"method": "pdp", "rank": 4, "precision": "search"},
        "c": {"method": "tucker", "ratio": 0.3},
        "d": "keep",
    }
    assert export.polished_plan(plan) == {
        "a": {"method": "cp", "ratio": 0.3, "precision": "full"},
        "b": {"method": "pdp", "rank": 4, "precision": "search"},
        "c": {"method": "tucker", "ratio": 0.3},
        "d": "keep",
    }


def test_polish_refits_the_factors_closer_to_the_kernels():
    torch.manual_seed(0)
    model = ad.get_model("resnet20", num_classes=10)
    plan = {
        "layer3.1.conv1": {"method": "cp", "ratio": 0.2},
        "layer3.2.conv2": {"method": "pdp", "ratio": 0.2},
    }

    def error(compressed, n):
        dense = model.get_submodule(n).weight
        return float((compressed.get_submodule(n).dense_weight() - dense).norm())

    errors = {}
    for name, built in (("search", plan), ("full", export.polished_plan(plan))):
        compressed = ad.apply_plan(model, built)
        errors[name] = [error(compressed, n) for n in plan]
    assert all(f < s for f, s in zip(errors["full"], errors["search"], strict=True))


def test_export_polishes_only_when_asked_or_fine_tuning(searched, tmp_path):
    cfg = load_config(searched)
    study = read_study(cfg.storage, cfg.name)
    number = next(t.number for t in study.trials if t.state == TrialState.COMPLETE)
    exact = export.export_trial(cfg, number, tmp_path / "exact.pt")
    polished = export.export_trial(cfg, number, tmp_path / "polished.pt", polish=True)
    assert "polish" not in exact.meta["source"]["finetune"]
    assert polished.meta["source"]["finetune"]["polish"] is True
    assert (
        exact.meta["metrics"]["proxy_val_accuracy"] == exact.meta["metrics"]["search_val_accuracy"]
    )
    first, second = exact.model.state_dict(), polished.model.state_dict()
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[k], second[k]) for k in first)
    tuned = export.export_trial(cfg, number, tmp_path / "tuned.pt", finetune_epochs=1)
    assert tuned.meta["source"]["finetune"]["polish"] is True
    kept = export.export_trial(cfg, number, tmp_path / "kept.pt", finetune_epochs=1, polish=False)
    assert "polish" not in kept.meta["source"]["finetune"]
