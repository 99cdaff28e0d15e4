from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from tiny_study import logged
from torch import nn
from torch.utils.data import TensorDataset

from autodecomp.workload.data import load_data, make_loader
from autodecomp.workload.models import get_model
from autodecomp.workload.train import (
    distill,
    evaluate,
    kd_loss,
    recalibrate_bn,
    set_seed,
    train_baseline,
)


def test_set_seed_seeds_all_generators():
    set_seed(11)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_seed(11)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


class _Lookup(nn.Module):
    """Predicts class int(x[0]) for every input row; has a parameter to carry the device."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(x[:, 0].long(), 4).float() * self.scale


def test_evaluate_exact_accuracy_and_restores_mode():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [1.0]])
    y = torch.tensor([0, 1, 2, 0, 0])
    model = _Lookup().train()
    loader = make_loader(TensorDataset(x, y), batch_size=2, shuffle=False)
    assert evaluate(model, loader) == 3 / 5
    assert model.training


def _bn_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, 4, generator=g) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1) + 5
    return TensorDataset(x, torch.zeros(n, dtype=torch.long))


def test_recalibrate_bn_cumulative_average_no_weight_change():
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm2d(3, momentum=0.3), nn.Flatten())
    bn = model[1]
    nn.init.normal_(bn.weight)
    weights = copy.deepcopy(model.state_dict())
    data = _bn_data()
    loader = make_loader(data, batch_size=16, shuffle=False)
    recalibrate_bn(model, loader, batches=6)  # cycles the 4-batch loader: batches 0-3, 0, 1
    x = data.tensors[0]
    batches = [x[i * 16 : (i + 1) * 16] for i in (0, 1, 2, 3, 0, 1)]
    # Dropout stays in eval mode, so the statistics are those of the raw inputs.
    mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    var = torch.stack([b.var(dim=(0, 2, 3)) for b in batches]).mean(0)
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(bn.running_var, var, atol=1e-4)
    assert bn.momentum == 0.3 and not model.training
    assert torch.equal(bn.weight, weights["1.weight"]) and torch.equal(bn.bias, weights["1.bias"])


def _mlp(seed: int, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(8, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 3)
    )


def _kd_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=g)
    y = torch.randint(0, 3, (128,), generator=g)
    return TensorDataset(x, y)


def _mean_kd(student, teacher, data):
    student.eval()
    with torch.no_grad():
        x, y = data.tensors
        return kd_loss(student(x), teacher(x), y, temperature=4.0, alpha=1.0).item()


def test_distill_reduces_kd_loss_and_leaves_teacher_alone():
    data = _kd_problem()
    teacher = _mlp(1).train()
    with torch.no_grad():
        teacher(data.tensors[0])  # non-trivial BN running statistics
    teacher_state = copy.deepcopy(teacher.state_dict())
    teacher.eval()
    before = _mean_kd(_mlp(2), teacher, data)
    teacher.train()
    student = _mlp(2)
    loader = make_loader(data, batch_size=32, shuffle=True, seed=0)
    result = distill(student, teacher, loader, steps=60, lr=0.05, alpha=1.0)
    assert result["steps"] == 60 and result["seconds"] > 0
    assert teacher.training  # mode restored
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key]), key
    after = _mean_kd(student, teacher.eval(), data)
    assert after < 0.25 * before
    assert not student.training


def test_kd_loss_formula():
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    y = torch.tensor([0])
    p_t, log_p_s = torch.softmax(t / 2, 1), torch.log_softmax(s / 2, 1)
    kl = (p_t * (p_t.log() - log_p_s)).sum()
    ce = nn.functional.cross_entropy(s, y)
    expected = 0.75 * 4 * kl + 0.25 * ce
    assert torch.allclose(kd_loss(s, t, y, temperature=2.0, alpha=0.75), expected)


def test_distill_stops_when_callback_raises():
    calls = []

    class Stop(Exception):
        pass

    def callback(step, loss):
        calls.append((step, loss))
        if step == 3:
            raise Stop

    teacher = _mlp(1).eval()
    loader = make_loader(_kd_problem(), batch_size=32, shuffle=True)
    with pytest.raises(Stop):
        distill(_mlp(2), teacher, loader, steps=50, lr=0.01, callback=callback)
    assert [step for step, _ in calls] == [1, 2, 3]
    assert all(loss > 0 for _, loss in calls)
    assert not teacher.training


def test_distill_zero_steps_and_adam():
    teacher, student = _mlp(1).eval(), _mlp(2)
    loader = make_loader(_kd_problem(), batch_size=32, shuffle=False)
    state = copy.deepcopy(student.state_dict())
    result = distill(student, teacher, loader, steps=0, lr=0.1)
    assert result["steps"] == 0 and np.isnan(result["final_loss"])
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())
    result = distill(student, teacher, loader, steps=5, lr=1e-3, optimizer="adam")
    assert result["steps"] == 5 and result["final_loss"] > 0


def test_distill_reports_non_finite_loss():
    teacher, student = _mlp(1).eval(), _mlp(2)
    with torch.no_grad():
        student[1].weight.fill_(float("nan"))
    loader = make_loader(_kd_problem(), batch_size=32, shuffle=False)
    with pytest.raises(FloatingPointError, match="step 1"):
        distill(student, teacher, loader, steps=5, lr=0.1)


def test_train_digits_cnn_baseline():
    # Measured: seed 0, 5 epochs at lr 0.1, batch 64 -> 0.978 test accuracy (about 2.5 s CPU).
    set_seed(0)
    splits = load_data("digits", seed=0)
    model = get_model("digits_cnn", in_channels=1)
    loader = make_loader(splits.train, batch_size=64, shuffle=True, seed=0)
    with logged() as lines:
        train_baseline(model, loader, epochs=5, lr=0.1)
    assert len(lines) == 5 and lines[0].startswith("epoch 1/5 loss")
    assert not model.training
    accuracy = evaluate(model, make_loader(splits.test, batch_size=256, shuffle=False))
    assert accuracy >= 0.95
