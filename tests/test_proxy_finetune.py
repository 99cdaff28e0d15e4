"""One proxy fine-tune for the search and export: with no extra epochs, an export rebuilds the
trial's fine-tuned model bit for bit and reproduces its validation accuracy exactly."""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from optuna.trial import TrialState
from tiny_study import make_study, tiny_config
from torch import nn
from torch.utils.data import TensorDataset

from autodecomp.config import load_config
from autodecomp.results.report import read_study
from autodecomp.search import objective
from autodecomp.search.study import prepare
from autodecomp.ship import export, model_file
from autodecomp.workload.data import make_loader
from autodecomp.workload.proxy import PHASES, proxy_finetune
from autodecomp.workload.train import evaluate

STUDY = tiny_config(
    baseline={"epochs": 3},
    space={"methods": ["tucker", "shift"]},
    # the search evaluates the floor batches mid-distillation and scores a calibration batch
    # before it, export does neither: neither may change the fine-tuned model
    proxy={"steps": 8, "batch_size": 32, "bn_batches": 2, "warmup_steps": 2, "floor_step": 4},
    trials=3,
    warm_start=[
        {"method": "tucker", "ratio": 0.3},
        {"method": "shift", "ratio": 0.3},
        {"method": "tucker", "ratio": 0.15},
    ],
)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A finished tiny study, and each trial's weights right after the search's fine-tune."""
    weights: dict[int, dict[str, torch.Tensor]] = {}

    def keep_weights(model, *args, number, **kwargs):
        result = proxy_finetune(model, *args, number=number, **kwargs)
        weights[number] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(objective, "proxy_finetune", keep_weights)
        path = make_study(tmp_path_factory.mktemp("proxy_finetune"), STUDY, search=True)
    return path, weights


def test_export_without_epochs_reproduces_the_search(searched, tmp_path):
    path, weights = searched
    cfg = load_config(path)
    study = read_study(cfg.storage, cfg.name)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and sorted(weights) == [0, 1, 2]
    val = make_loader(prepare(cfg).splits.val, batch_size=cfg.proxy.eval_batch_size, shuffle=False)
    column = cfg.objectives.index("accuracy")
    for trial in complete:
        assert trial.user_attrs["floor_accuracy"] >= 0  # the search's callback did run
        result = export.export_trial(
            cfg, trial.number, tmp_path / f"t{trial.number}.pt", finetune_epochs=0
        )
        loaded = model_file.load(result.path)
        state = loaded.state_dict()
        assert state.keys() == weights[trial.number].keys()
        for key, tensor in weights[trial.number].items():
            assert torch.equal(state[key], tensor), (trial.number, key)
        searched_accuracy = trial.values[column]
        assert evaluate(loaded, val) == searched_accuracy
        metrics = result.meta["metrics"]
        assert metrics["val_accuracy"] == metrics["proxy_val_accuracy"] == searched_accuracy
        assert metrics["search_val_accuracy"] == searched_accuracy
        assert result.meta["source"]["finetune"]["steps"] == 0


def _problem(n: int = 96) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _settings(**changes) -> SimpleNamespace:
    fields = {"steps": 5, "lr": 0.05, "batch_size": 16, "temperature": 4.0, "alpha": 0.9,
              "weight_decay": 0.0, "bn_batches": 2, "warmup": 1}  # fmt: skip
    return SimpleNamespace(**(fields | changes))


def _run(settings: SimpleNamespace):
    data, model, phases, pre, steps = _problem(), _net(), [], [], []

    @contextmanager
    def phase(name: str):
        phases.append(name)
        yield

    result = proxy_finetune(
        model, _net(), data, make_loader(data, batch_size=32, shuffle=False), settings,
        seed=3, number=2, phase=phase, on_pre_eval=pre.append,
        callback=lambda step, loss: steps.append(step),
    )  # fmt: skip
    return result, model, phases, pre, steps


def test_phases_hooks_and_determinism():
    result, model, phases, pre, steps = _run(_settings())
    assert phases == list(PHASES)
    assert pre == [result.pre_accuracy] and steps == [1, 2, 3, 4, 5]
    again, twin, *_ = _run(_settings())
    assert again == result
    for (key, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_no_steps_returns_the_pre_fine_tune_accuracy():
    result, _, phases, pre, steps = _run(_settings(steps=0, bn_batches=0))
    assert phases == ["pre_eval"] and steps == []
    assert result.accuracy == result.pre_accuracy == pre[0]
