"""Measured latency: cache per structure, config wiring, objective values and constraints.

No assertion here depends on how fast anything runs: the objective tests replace the timer.
"""

from __future__ import annotations

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from tiny_study import tiny_config
from torch import nn

from autodecomp.config import LatencyConfig, load_config
from autodecomp.core.errors import ConfigError
from autodecomp.core.optuna_compat import constraints
from autodecomp.decompositions import DecomposedConv
from autodecomp.measure.latency import LatencyMeter, measure_latency, structure_key
from autodecomp.results.report import hypervolume
from autodecomp.results.tables import format_front, pareto_frame, trials_frame
from autodecomp.search.baseline import load_baseline
from autodecomp.search.objective import CATCH, Objective
from autodecomp.search.study import prepare


class FakeTimer:
    """Stands in for :func:`measure_latency`: 1 ms for a dense model, ``compressed`` ms with
    any decomposed layer; records the device of every call."""

    def __init__(self, compressed: float = 2.0) -> None:
        self.compressed = compressed
        self.calls: list[str] = []

    def __call__(self, model: nn.Module, input_shape, *, device: str, **_options) -> float:
        self.calls.append(device)
        decomposed = any(isinstance(m, DecomposedConv) for m in model.modules())
        return self.compressed if decomposed else 1.0


LAYERS_A = {
    "conv2": {"method": "tucker", "rank": [4, 8]},
    "conv3": {"method": "keep", "rank": None},
}


def test_meter_measures_each_structure_once():
    timer = FakeTimer()
    meter = LatencyMeter(LatencyConfig(), (1, 8, 8), "cpu", measure=timer)
    dense = nn.Conv2d(1, 2, 3)
    first = meter(dense, structure_key(LAYERS_A))
    again = meter(dense, structure_key(dict(reversed(LAYERS_A.items()))))  # same structure
    assert first == again == {"cpu": 1.0} and timer.calls == ["cpu"] and meter.measurements == 1
    other = {**LAYERS_A, "conv2": {"method": "tucker", "rank": [4, 4]}}
    meter(dense, structure_key(other))
    assert timer.calls == ["cpu", "cpu"]
    meter.remember("seeded", {"cpu": 7.5})
    assert meter(dense, "seeded") == {"cpu": 7.5} and meter.measurements == 2
    assert meter.value({"cpu": 7.5}) == 7.5


def test_meter_on_a_gpu_study_also_times_the_cpu():
    timer = FakeTimer()
    cfg = LatencyConfig(device="cuda")
    meter = LatencyMeter(cfg, (1, 8, 8), "cuda:1", measure=timer)
    values = meter(nn.Conv2d(1, 2, 3), "k")
    assert timer.calls == ["cpu", "cuda:1"] and values == {"cpu": 1.0, "cuda": 1.0}
    assert meter.value({"cpu": 3.0, "cuda": 0.5}) == 0.5
    meter.remember("cpu only", {"cpu": 3.0})  # incomplete: not cached
    meter(nn.Conv2d(1, 2, 3), "cpu only")
    assert len(timer.calls) == 4


def test_measure_latency_restores_threads_and_mode():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).train()
    threads = torch.get_num_threads()
    ms = measure_latency(model, (1, 8, 8), batch_size=2, warmup=1, repeats=3, threads=1)
    assert ms > 0 and model.training and torch.get_num_threads() == threads


# ---- configuration ---------------------------------------------------------------------------
def _config(tmp_path, **extra):
    raw = {"model": "digits_cnn", "data": {"name": "digits", "image_size": 8}, **extra}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(raw))
    return load_config(tmp_path / "study.yaml")


def test_config_wiring(tmp_path):
    cfg = _config(
        tmp_path,
        objectives=["accuracy", "macs", "latency"],
        budgets={"max_macs": 0.5, "max_latency_ms": 2.5},
        latency={"batch_size": 8, "repeats": 5},
    )
    assert cfg.directions == ["maximize", "minimize", "minimize"] and cfg.measures_latency
    assert cfg.latency == LatencyConfig(batch_size=8, repeats=5)
    assert cfg.budgets.limits(1000, 10) == {"macs": 500.0, "latency": 2.5}
    assert cfg.to_dict()["latency"]["device"] == "cpu"
    assert not _config(tmp_path).measures_latency
    assert _config(tmp_path, latency={"measure": True}).measures_latency


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"latency": {"device": "tpu"}}, "unknown latency.device 'tpu'; valid: cpu, cuda"),
        ({"latency": {"device": "cuda"}}, "latency.device 'cuda' needs the study on a GPU"),
        ({"latency": {"repeat": 3}}, "unknown key latency.repeat"),
        ({"latency": {"repeats": 0}}, "latency.repeats must be an integer >= 1"),
        ({"budgets": {"max_latency_ms": -1}}, "budgets.max_latency_ms must be a number"),
        (
            {"objectives": ["accuracy", "speed"]},
            "valid objectives: accuracy, macs, params, latency",
        ),
    ],
)
def test_bad_latency_config(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        _config(tmp_path, **extra)


# ---- the objective ---------------------------------------------------------------------------
TINY = tiny_config(
    baseline={"epochs": 1},
    space={"methods": ["tucker"], "keep": False, "ratio": {"range": [0.1, 0.5], "log": True}},
    proxy={"steps": 2, "batch_size": 32, "bn_batches": 1, "calibration_size": 8},
    objectives=["accuracy", "macs", "latency"],
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("latency")
    (folder / "study.yaml").write_text(yaml.safe_dump(TINY))
    cfg = load_config(folder / "study.yaml")
    prepared = prepare(cfg)
    baseline = load_baseline(cfg, prepared.model, prepared.splits)
    return folder / "study.yaml", prepared, baseline


def _objective(tiny, overrides, timer):
    path, prepared, baseline = tiny
    cfg = load_config(path, overrides)
    objective = Objective(cfg, prepared.space, baseline, prepared.splits)
    objective.latency.measure = timer
    return cfg, objective


def _study(cfg, baseline) -> optuna.Study:
    study = optuna.create_study(directions=cfg.directions)
    study.set_user_attr("config", cfg.to_dict())
    study.set_user_attr("baseline", baseline.info())
    return study


@pytest.mark.parametrize(("limit", "feasible"), [(2.5, True), (1.6, False)])
def test_latency_objective_and_budget(tiny, limit, feasible):
    timer = FakeTimer()
    cfg, objective = _objective(tiny, [f"budgets.max_latency_ms={limit}"], timer)
    study = _study(cfg, tiny[2])
    params = {"conv2/method": "tucker", "conv3/method": "tucker", "conv4/method": "tucker"}
    params |= {f"conv{i}/tucker/ratio": 0.2 for i in (2, 3, 4)}
    study.enqueue_trial(params)
    study.enqueue_trial(params)  # the same plan: latency from the cache
    study.optimize(objective, 2, catch=CATCH)
    first, second = study.trials
    assert timer.calls == ["cpu", "cpu"]  # the baseline, then the one structure
    assert study.user_attrs["baseline_latency_ms"] == {"cpu": 1.0}
    assert first.values[2] == second.values[2] == 2.0
    assert first.user_attrs["latency_ms"] == {"cpu": 2.0}
    assert constraints(first)["latency"] == pytest.approx(2.0 / limit - 1.0)
    assert first.user_attrs["over_budget"] is not feasible
    assert ("distill" in first.user_attrs["seconds"]) is feasible
    assert list(trials_frame(study).latency_cpu_ms) == [2.0, 2.0]
    if feasible:
        assert "latency cpu ms" in format_front(pareto_frame(study))
        assert hypervolume(study) == 0.0  # 2 ms lies past the reference point (baseline 1 ms)
    else:
        assert first.state == TrialState.COMPLETE and first.values[0] == 0.0


def test_hypervolume_scales_latency_by_the_baseline(tiny):
    cfg, objective = _objective(tiny, [], FakeTimer(compressed=0.25))
    study = _study(cfg, tiny[2])
    study.optimize(objective, 1, catch=CATCH)
    trial = study.trials[0]
    accuracy, macs_ratio = trial.values[0], trial.user_attrs["macs_ratio"]
    assert accuracy > 0
    assert hypervolume(study) == pytest.approx(accuracy * (1 - macs_ratio) * (1 - 0.25))


def test_a_resumed_study_reuses_stored_latencies(tiny):
    timer = FakeTimer()
    cfg, objective = _objective(tiny, [], timer)
    study = _study(cfg, tiny[2])
    study.optimize(objective, 1, catch=CATCH)
    stored = study.trials[0]
    later = FakeTimer()
    _, resumed = _objective(tiny, [], later)
    study.enqueue_trial(stored.params)
    study.optimize(resumed, 1, catch=CATCH)
    assert later.calls == []  # the baseline's and the plan's figures came from storage
    assert study.trials[1].user_attrs["latency_ms"] == stored.user_attrs["latency_ms"]
