"""Zero-training proxies, their use as a pruning gate, and their rank correlation report."""

from __future__ import annotations

import optuna
import pandas as pd
import pytest
import torch
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from tiny_study import tiny_config
from torch import nn
from torch.utils.data import TensorDataset

import autodecomp as ad
from autodecomp.compress.surgery import apply_plan
from autodecomp.config import load_config
from autodecomp.measure.cost import count_macs
from autodecomp.results.proxy_stats import kendall_frame, proxy_frame, pruning_frame
from autodecomp.results.report import write_report
from autodecomp.search import objective as objective_module
from autodecomp.search.baseline import load_baseline
from autodecomp.search.objective import CATCH, Objective
from autodecomp.search.proxies import (
    Calibration,
    calibration_batch,
    kernel_errors,
    mean_error,
    relative_error,
)
from autodecomp.search.study import prepare


def _two_convs() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1, bias=False),
        nn.Flatten(),
    ).eval()


def _scaled_copy(model: nn.Sequential, layers: list[str]) -> nn.Sequential:
    """Each layer as an exact (full-rank) Tucker-2 whose three factors are doubled: 8 x W."""
    plan = {name: {"method": "tucker", "rank": [conv.in_channels, conv.out_channels]}
            for name, conv in model.named_children() if name in layers}  # fmt: skip
    compressed = ad.apply_plan(model, plan)
    with torch.no_grad():
        for name in layers:
            for param in compressed.get_submodule(name).parameters():
                param.mul_(2.0)
    return compressed


def test_relative_error_and_mean():
    exact = torch.tensor([3.0, 4.0])
    assert relative_error(exact * 1.5, exact) == pytest.approx(0.5, abs=1e-12)
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert mean_error({"a": 0.2, "c": 0.4}, ["a", "b", "c", "d"]) == pytest.approx(0.15)


def test_kernel_errors_of_decomposed_layers_only():
    model = _two_convs()
    exact = ad.apply_plan(model, {"2": {"method": "tucker", "rank": [6, 4]}, "0": "keep"})
    assert kernel_errors(model, exact, ["0", "2"]) == {"2": pytest.approx(0.0, abs=1e-5)}
    scaled = _scaled_copy(model, ["0", "2"])
    errors = kernel_errors(model, scaled, ["0", "2"])
    assert errors == {"0": pytest.approx(7.0, rel=1e-5), "2": pytest.approx(7.0, rel=1e-5)}


def test_layer_errors_use_the_baselines_inputs_and_network_errors_compound():
    model = _two_convs()
    inputs = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    calibration = Calibration(model, inputs, "cpu")
    scaled = _scaled_copy(model, ["0", "2"])
    # each layer alone is 8x its dense output; fed its own compressed input, conv2 would be 64x
    errors = calibration.layer_output_errors(scaled, ["0", "2"])
    assert errors == {"0": pytest.approx(7.0, rel=1e-5), "2": pytest.approx(7.0, rel=1e-5)}
    scores = calibration.output_errors(scaled)
    assert scores["output_error"] == pytest.approx(63.0, rel=1e-5)
    assert scores["output_kl"] > 0.1
    assert not model.training  # the baseline's mode is untouched


def test_network_errors_replace_one_layer_at_a_time():
    model = _two_convs()
    inputs = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    calibration = Calibration(model, inputs, "cpu")
    plan = {"0": {"method": "tucker", "rank": [2, 3]}, "2": {"method": "tucker", "rank": [3, 2]}}
    errors = calibration.network_errors(ad.apply_plan(model, plan), ["0", "2"])
    for name, entry in plan.items():
        alone = calibration.output_errors(ad.apply_plan(model, {name: entry}))
        assert errors[name] == pytest.approx(alone["output_error"], rel=1e-6)
    both = calibration.output_errors(ad.apply_plan(model, plan))["output_error"]
    assert 0.05 < errors["0"] < both and 0.05 < errors["2"] < both
    # conv "2" feeds the logits directly: its network error is its layer error
    layer = calibration.layer_output_errors(ad.apply_plan(model, plan), ["2"])
    assert errors["2"] == pytest.approx(layer["2"], rel=1e-6)
    scaled = calibration.network_errors(_scaled_copy(model, ["0", "2"]), ["0", "2"])
    assert scaled == {"0": pytest.approx(7.0, rel=1e-5), "2": pytest.approx(7.0, rel=1e-5)}
    assert not model.training and not model[0]._forward_hooks  # no hook left behind
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed


def test_kl_ignores_a_constant_logit_shift_but_the_relative_error_does_not():
    model = _two_convs()
    inputs = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    calibration = Calibration(model, inputs, "cpu")

    class Shifted(nn.Module):
        def forward(self, x):
            return model(x) + 1.0

    scores = Calibration(model, inputs, "cpu").output_errors(Shifted())
    logits = model(inputs)
    assert scores["output_kl"] == pytest.approx(0.0, abs=1e-12)
    expected = (torch.ones_like(logits).norm() / logits.norm()).item()
    assert scores["output_error"] == pytest.approx(expected, rel=1e-6)
    assert calibration.output_errors(model) == {"output_error": 0.0, "output_kl": 0.0}


def test_calibration_batch_is_a_fixed_seeded_draw():
    data = TensorDataset(torch.arange(10.0).view(10, 1), torch.zeros(10))
    batch = calibration_batch(data, 4, seed=3)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3))[:4]
    assert torch.equal(batch.view(-1), order.float())
    assert torch.equal(calibration_batch(data, 4, seed=3), batch)
    assert len(calibration_batch(data, 50, seed=3)) == 10
    with pytest.raises(ValueError, match="calibration size"):
        calibration_batch(data, 0, seed=3)


# ---- rank correlation and savings ------------------------------------------------------------
def test_kendall_frame_signs_and_counts():
    frame = pd.DataFrame(
        {
            "accuracy": [0.9, 0.8, 0.7, 0.6, None],
            "kernel_error": [0.1, 0.2, 0.3, 0.4, 0.5],  # lower error, higher accuracy: +1
            "pre_ft_accuracy": [0.1, 0.2, 0.3, 0.4, 0.5],  # backwards: -1
            "output_error": [0.1, None, 0.3, 0.2, 0.0],  # 3 usable rows, one swap
            "floor_accuracy": [None, None, 0.5, 0.4, None],  # too few rows
        }
    )
    table = kendall_frame(frame).set_index("proxy")
    assert table.loc["kernel_error", "tau"] == pytest.approx(1.0)
    assert table.loc["pre_ft_accuracy", "tau"] == pytest.approx(-1.0)
    assert table.loc["output_error", "n"] == 3
    assert table.loc["output_error", "tau"] == pytest.approx(1 / 3)
    assert table.loc["floor_accuracy", "n"] == 2 and pd.isna(table.loc["floor_accuracy", "tau"])
    assert list(table.index) == [  # the order of autodecomp.results.proxy_stats.PROXIES
        "kernel_error",
        "output_error",
        "pre_ft_accuracy",
        "floor_accuracy",
    ]


def _frozen(state, value, seconds, **attrs):
    return optuna.trial.create_trial(
        state=state,
        values=None if value is None else [value, 100.0],
        params={"x": 0.5},
        distributions={"x": FloatDistribution(0, 1)},
        user_attrs={"seconds": {"total": seconds}, **attrs},
    )


def _study_with_proxies() -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("config", {"objectives": ["accuracy", "macs"]})
    study.set_user_attr("baseline", {"accuracy": 0.95, "macs": 1000, "params": 100})
    study.add_trials(
        [
            _frozen(
                TrialState.COMPLETE,
                0.9,
                10.0,
                kernel_error=0.1,
                pre_ft_accuracy=0.8,
                macs=100,
                params=10,
            ),
            _frozen(
                TrialState.COMPLETE,
                0.8,
                12.0,
                kernel_error=0.3,
                pre_ft_accuracy=0.5,
                macs=100,
                params=10,
            ),
            _frozen(
                TrialState.COMPLETE,
                0.7,
                14.0,
                kernel_error=0.2,
                pre_ft_accuracy=0.6,
                macs=100,
                params=10,
            ),
            _frozen(
                TrialState.COMPLETE,
                0.0,
                1.0,
                kernel_error=0.0,
                over_budget=True,
                macs=2000,
                params=10,
            ),
            _frozen(TrialState.PRUNED, None, 0.5, kernel_error=0.9, pruned_at="output_error"),
            _frozen(TrialState.PRUNED, None, 4.0, kernel_error=0.8, pruned_at="floor"),
            _frozen(TrialState.PRUNED, None, 3.0, kernel_error=0.8, pruned_at="floor"),
        ]
    )
    return study


def test_proxy_frame_and_pruning_savings():
    study = _study_with_proxies()
    frame = proxy_frame(study)
    assert list(frame.number) == list(range(7))
    assert list(frame.accuracy.notna()) == [True, True, True, False, False, False, False]
    pruning = pruning_frame(study).set_index("stage")
    mean_trained = 12.0
    assert pruning.loc["over_budget", "trials"] == 1
    assert pruning.loc["output_error", "seconds_saved"] == pytest.approx(mean_trained - 0.5)
    assert pruning.loc["floor", "trials"] == 2
    assert pruning.loc["floor", "seconds_spent"] == pytest.approx(7.0)
    assert pruning.loc["floor", "seconds_saved"] == pytest.approx(2 * mean_trained - 7.0)
    assert pruning.loc["trained", "trials"] == 3
    assert pruning.loc["trained", "seconds_spent"] == pytest.approx(36.0)


def test_report_writes_the_proxy_tables_and_section(tmp_path):
    out = write_report(_study_with_proxies(), tmp_path, plots=False)
    names = {p.name for p in out["paths"]}
    assert {"proxy_correlation.csv", "proxy_correlation.parquet", "pruning.csv"} <= names
    table = pd.read_csv(tmp_path / "proxy_correlation.csv").set_index("proxy")
    # accuracy 0.9 > 0.8 > 0.7; kernel error 0.1, 0.3, 0.2 (one swap); pre-ft 0.8, 0.5, 0.6
    assert table.loc["kernel_error", "tau"] == pytest.approx(1 / 3)
    assert table.loc["pre_ft_accuracy", "tau"] == pytest.approx(1 / 3)
    text = (tmp_path / "report.md").read_text()
    assert "## Proxy fidelity" in text and "| kernel error (weights) | 3 | +0.333 |" in text


# ---- the gate inside the objective -----------------------------------------------------------
TINY = tiny_config(
    space={"methods": ["tucker"], "keep": False, "ratio": {"range": [0.1, 0.5], "log": True}},
    proxy={
        "steps": 3,
        "batch_size": 32,
        "bn_batches": 1,
        "calibration_size": 16,
        "floor_step": 2,
        "floor_batches": 1,
    },
    trials=3,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("proxies")
    (folder / "study.yaml").write_text(yaml.safe_dump(TINY))
    cfg = load_config(folder / "study.yaml")
    prepared = prepare(cfg)
    baseline = load_baseline(cfg, prepared.model, prepared.splits)
    return folder / "study.yaml", prepared, baseline


def _optimize(tiny, overrides: list[str], trials: int = 3) -> optuna.Study:
    path, prepared, baseline = tiny
    cfg = load_config(path, overrides)
    study = optuna.create_study(directions=cfg.directions)
    study.optimize(Objective(cfg, prepared.space, baseline, prepared.splits), trials, catch=CATCH)
    return study


def test_objective_records_every_proxy(tiny):
    study = _optimize(tiny, [])
    for trial in study.trials:
        attrs = trial.user_attrs
        assert trial.state == TrialState.COMPLETE
        for key in ("kernel_error", "layer_output_error", "output_error", "output_kl"):
            assert attrs[key] > 0
        assert 0 <= attrs["floor_accuracy"] <= 1 and "pruned_at" not in attrs
        layers = attrs["layers"].values()
        assert all(rec["output_error"] > 0 and rec["rel_error"] > 0 for rec in layers)
        assert attrs["kernel_error"] == pytest.approx(sum(r["rel_error"] for r in layers) / 3)


def test_output_error_gate_prunes_before_any_training(tiny):
    study = _optimize(tiny, ["proxy.max_output_error=1e-6"], trials=2)
    for trial in study.trials:
        attrs = trial.user_attrs
        assert trial.state == TrialState.PRUNED and attrs["pruned_at"] == "output_error"
        assert attrs["pruned"].startswith("output error ") and attrs["output_error"] > 1e-6
        assert not {"bn_recal", "pre_eval", "distill"} & set(attrs["seconds"])


def test_floor_gate_records_its_stage(tiny):
    study = _optimize(tiny, ["proxy.accuracy_floor=1.0"], trials=1)
    attrs = study.trials[0].user_attrs
    assert study.trials[0].state == TrialState.PRUNED and attrs["pruned_at"] == "floor"
    assert attrs["floor_accuracy"] < 1.0 and "distill" in attrs["seconds"]


def test_calibration_off_records_only_kernel_errors(tiny):
    study = _optimize(tiny, ["proxy.calibration_size=0"], trials=1)
    attrs = study.trials[0].user_attrs
    assert "kernel_error" in attrs and "output_error" not in attrs
    assert all("output_error" not in rec for rec in attrs["layers"].values())


def test_an_over_budget_candidate_is_counted_but_never_fitted(tiny, monkeypatch):
    fitted = []
    monkeypatch.setattr(
        objective_module, "apply_plan", lambda *a, **k: fitted.append(1) or apply_plan(*a, **k)
    )
    study = _optimize(tiny, ["budgets.max_macs=0.01"], trials=2)
    assert not fitted
    for trial in study.trials:
        attrs = trial.user_attrs
        assert trial.state == TrialState.COMPLETE and trial.values[0] == 0.0
        assert attrs["over_budget"] and attrs["macs_ratio"] > 0.01
        assert set(attrs["seconds"]) == {"plan", "count", "record", "total"}
        assert all(rec["rel_error"] is None for rec in attrs["layers"].values())
        assert "kernel_error" not in attrs
    in_budget = _optimize(tiny, [], trials=1).trials[0].user_attrs
    assert in_budget["macs"] == pytest.approx(
        count_macs(apply_plan(tiny[2].model, in_budget["plan"]), tiny[2].input_shape)
    )
