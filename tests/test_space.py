"""Search-space invariants and the objective's budget handling (no training over budget)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from torch import nn

import autodecomp as ad
from autodecomp.config import Budgets, load_config, parse_space
from autodecomp.core.errors import ConfigError
from autodecomp.core.optuna_compat import constraints
from autodecomp.measure.plan_cost import PlanCost
from autodecomp.search import objective as objective_module
from autodecomp.search.baseline import Baseline
from autodecomp.search.objective import Objective
from autodecomp.search.space import (
    cheapest_cost,
    check_budgets,
    resolve_space,
    suggest_plan,
    uniform_params,
)
from autodecomp.workload.data import load_data
from autodecomp.workload.models import get_model

optuna.logging.set_verbosity(optuna.logging.WARNING)


NET_INPUT = (3, 8, 8)


class _Net(nn.Module):
    """A 3x3 conv, a 1x1 conv, a depthwise conv and a 5x5 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.c = nn.Conv2d(16, 12, 5, padding=2)

    def forward(self, x):
        return self.c(self.dw(self.b(self.a(x))))


def _run(space, n: int, seed: int = 0) -> list[optuna.trial.FrozenTrial]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    study.optimize(lambda t: (t.set_user_attr("plan", suggest_plan(t, space)), 0.0)[1], n)
    return study.trials


def test_choices_are_supporting_methods_fixed_per_layer(monkeypatch):
    # 3x3 convs support tucker and shift, the 1x1 conv only tucker, the 5x5 conv nothing
    def supporting(spec):
        return {(3, 3): ["shift", "tucker"], (1, 1): ["tucker"]}.get(spec.kernel_size, [])

    monkeypatch.setattr("autodecomp.search.space.supporting_methods", supporting)
    monkeypatch.setattr("autodecomp.search.space.conv_layers", lambda m: ["a", "b", "c"])
    space = resolve_space(
        _Net(), parse_space({"methods": ["shift", "tucker"], "keep": True}), NET_INPUT
    )
    choices = {layer.name: layer.choices for layer in space.layers}
    assert choices == {"a": ("shift", "tucker", "keep"), "b": ("tucker", "keep")}  # c: only keep

    seen: dict[str, optuna.distributions.BaseDistribution] = {}
    methods: dict[str, set[str]] = {"a": set(), "b": set()}
    for trial in _run(space, 40):
        plan = trial.user_attrs["plan"]
        assert sorted(plan) == ["a", "b"]
        for name, dist in trial.distributions.items():
            assert seen.setdefault(name, dist) == dist  # same distribution in every trial
        for layer in space.layers:
            method = trial.params[f"{layer.name}/method"]
            methods[layer.name].add(method)
            assert plan[layer.name]["method"] == method
            assert set(trial.params) >= {f"{layer.name}/method"}
            if method != "keep":
                ratio = trial.params[f"{layer.name}/{method}/ratio"]
                assert plan[layer.name] == {"method": method, "ratio": ratio}
                assert 0.1 <= ratio <= 0.8
        assert set(trial.params) <= {n for layer in space.layers for n in layer.param_names()}
    assert methods == {"a": {"shift", "tucker", "keep"}, "b": {"tucker", "keep"}}
    assert seen["a/method"].choices == ("shift", "tucker", "keep")

    monkeypatch.setattr("autodecomp.search.space.supporting_methods", lambda spec: [])
    with pytest.raises(ConfigError, match=r"layer 'a'.*keep is false"):
        resolve_space(_Net(), parse_space({"methods": ["tucker"], "keep": False}), NET_INPUT)


def test_real_registry_offers_only_supporting_methods():
    model = _Net()
    space = resolve_space(model, parse_space({"methods": "*", "keep": False}), NET_INPUT)
    assert "dw" not in space.names  # grouped conv: no dense method applies
    for layer in space.layers:
        spec = ad.ConvSpec.from_conv(model.get_submodule(layer.name))
        assert layer.choices == tuple(ad.supporting_methods(spec))


def test_explicit_ranks_and_step():
    space = resolve_space(
        _Net(),
        parse_space(
            {
                "methods": ["tucker"],
                "keep": False,
                "layers": {"include": ["a", "c"]},
                "ratio": {"range": [0.1, 0.5], "step": 0.1},
                "overrides": [{"layers": "c", "ranks": {"tucker": [4, [2, 6], [2, 6]]}}],
            }
        ),
        NET_INPUT,
    )
    for trial in _run(space, 20):
        plan = trial.user_attrs["plan"]
        assert plan["c"]["rank"] in ([4, 4], [2, 6])  # canonical form, duplicates merged
        assert round(plan["a"]["ratio"] * 10, 9) in {1, 2, 3, 4, 5}
        model = ad.apply_plan(_Net(), plan)
        assert model.c.rank in ((4, 4), (2, 6))
    assert space.layers[1].param_names() == ["c/method", "c/tucker/rank"]
    assert space.layers[1].ranks == {"tucker": ("[4, 4]", "[2, 6]")}


def test_uniform_params_enqueue_to_uniform_plan():
    space = resolve_space(
        _Net(),
        parse_space(
            {
                "methods": ["tucker"],
                "layers": {"include": ["a", "b", "c"]},
                "ratio": {"range": [0.1, 0.5], "step": 0.1},
                "overrides": [
                    {"layers": "b", "ratio": [0.4, 0.9]},
                    {"layers": "c", "ranks": {"tucker": [2, 4, 8]}},
                ],
            }
        ),
        NET_INPUT,
    )
    params = uniform_params(space, "tucker", 0.33)
    # a: snapped to the 0.1 grid; b: clipped into [0.4, 0.9]; c: largest rank within 0.33
    # c (16 -> 12, 5x5): dense 4812 params; tucker (r, r) has 28 r + 25 r^2 + 12:
    # r=4 -> 524 <= 0.33 * 4812 = 1588 < 1836 <- r=8
    assert params == {
        "a/method": "tucker",
        "a/tucker/ratio": pytest.approx(0.3),
        "b/method": "tucker",
        "b/tucker/ratio": 0.4,
        "c/method": "tucker",
        "c/tucker/rank": "[4, 4]",
    }
    study = optuna.create_study()
    study.enqueue_trial(params)
    plan = _run_enqueued(study, space)
    assert {e["method"] for e in plan.values()} == {"tucker"}
    assert uniform_params(space, "keep") == {f"{n}/method": "keep" for n in ("a", "b", "c")}
    with pytest.raises(ConfigError, match="warm_start 'shift' is offered on no searched layer"):
        uniform_params(space, "shift", 0.3)
    mixed = resolve_space(
        _Net(),
        parse_space(
            {"methods": ["tucker"], "keep": False, "overrides": [{"layers": "c", "methods": "*"}]}
        ),
        NET_INPUT,
    )
    with pytest.raises(ConfigError, match="layer 'a' offers neither it nor keep"):
        uniform_params(mixed, "shift", 0.3)


def _run_enqueued(study, space):
    study.optimize(lambda t: (t.set_user_attr("plan", suggest_plan(t, space)), 0.0)[1], 1)
    return study.trials[0].user_attrs["plan"]


# ---- objective: budgets are constraints, over-budget candidates are never trained -----------
@pytest.fixture(scope="module")
def workload():
    splits = load_data("digits", image_size=8)
    torch.manual_seed(0)
    model = get_model("digits_cnn", in_channels=1).eval()
    shape = splits.input_shape
    base = Baseline(model, 0.5, ad.count_macs(model, shape), ad.count_params(model), shape, Path())
    return base, splits


def _config(tmp_path, **changes):
    raw = {
        "model": "digits_cnn",
        "data": {"name": "digits", "image_size": 8},
        "space": {"methods": ["tucker"], "layers": {"exclude": ["conv1"]}, "ratio": [0.1, 0.3]},
        "proxy": {"steps": 3, "batch_size": 32, "bn_batches": 1},
        "budgets": {"max_macs": 0.5},
    }
    raw.update(changes)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(raw))
    return load_config(tmp_path / "study.yaml")


def test_over_budget_trials_are_not_trained(tmp_path, workload, monkeypatch):
    base, splits = workload
    calls = []
    for name in ("distill", "recalibrate_bn", "evaluate"):
        monkeypatch.setattr(
            objective_module.train, name, lambda *a, _n=name, **k: calls.append(_n) or 0.25
        )
    cfg = _config(tmp_path)
    space = resolve_space(base.model, cfg.space, base.input_shape)
    study = optuna.create_study(directions=cfg.directions)
    study.enqueue_trial(uniform_params(space, "keep"))  # the dense model: 100% of the MACs
    study.enqueue_trial(uniform_params(space, "tucker", 0.1))  # well under half the MACs
    study.optimize(Objective(cfg, space, base, splits), n_trials=2)
    over, under = study.trials

    assert over.user_attrs["over_budget"] is True
    assert over.values == [0.0, base.macs]
    assert constraints(over) == {"macs": pytest.approx(1.0)}  # macs / (0.5 * macs) - 1
    assert over.constraints == {"0": pytest.approx(1.0)}  # what Optuna's samplers read
    assert "distill" not in over.user_attrs["seconds"]
    assert "pre_ft_accuracy" not in over.user_attrs
    assert calls == ["recalibrate_bn", "evaluate", "distill", "evaluate"]  # all from `under`

    assert under.user_attrs["over_budget"] is False
    assert constraints(under)["macs"] < 0
    assert under.values == [0.25, under.user_attrs["macs"]]
    assert under.user_attrs["macs_ratio"] == under.user_attrs["macs"] / base.macs
    assert {"bn_recal", "pre_eval", "distill", "eval"} <= set(under.user_attrs["seconds"])
    assert study.best_trials == [under]
    layers = under.user_attrs["layers"]
    assert sorted(layers) == ["conv2", "conv3", "conv4"]
    rebuilt = ad.apply_plan(base.model, under.user_attrs["plan"])
    for name, rec in layers.items():
        dense = base.model.get_submodule(name).weight.detach()
        approx = rebuilt.get_submodule(name).dense_weight().detach()
        assert rec["rel_error"] == pytest.approx(float((approx - dense).norm() / dense.norm()))
        assert 0 < rec["rel_error"] < 1
        assert rec["params"] == ad.count_params(rebuilt.get_submodule(name))


def test_floor_prunes_and_failures_are_recorded(tmp_path, workload, monkeypatch):
    base, splits = workload
    monkeypatch.setattr(objective_module.train, "recalibrate_bn", lambda *a, **k: None)
    monkeypatch.setattr(objective_module.train, "evaluate", lambda *a, **k: 0.1)
    cfg = _config(tmp_path, proxy={"steps": 5, "accuracy_floor": 0.5, "floor_step": 2})
    space = resolve_space(base.model, cfg.space, base.input_shape)

    def distill(student, teacher, loader, *, steps, callback, **kwargs):
        for step in range(1, steps + 1):
            callback(step, 1.0)

    monkeypatch.setattr(objective_module.train, "distill", distill)
    study = optuna.create_study(directions=cfg.directions)
    study.enqueue_trial(uniform_params(space, "tucker", 0.1))
    study.optimize(Objective(cfg, space, base, splits), n_trials=1)
    (pruned,) = study.trials
    assert pruned.state == optuna.trial.TrialState.PRUNED
    assert pruned.user_attrs["pruned"] == "accuracy 0.100 < floor 0.5 at step 2"
    assert constraints(pruned)["macs"] < 0  # constraints were set before training

    def diverge(*args, **kwargs):
        raise FloatingPointError("distillation loss became nan at step 1")

    monkeypatch.setattr(objective_module.train, "distill", diverge)
    study.enqueue_trial(uniform_params(space, "tucker", 0.1))
    study.optimize(Objective(cfg, space, base, splits), n_trials=1, catch=objective_module.CATCH)
    failed = study.trials[1]
    assert failed.state == optuna.trial.TrialState.FAIL
    assert failed.user_attrs["fail_reason"].startswith("FloatingPointError: distillation loss")


_ALS = ("cp", "pdp")  # initialised by ALS: seconds per layer


def _check_plan_cost(base, space, plans) -> None:
    cost = PlanCost(base.model, base.input_shape, space.names)
    assert cost.macs == base.macs
    applied = [ad.apply_plan(base.model, plan) for plan in plans]
    for plan, compressed in zip(plans * 2, applied * 2, strict=True):  # 2nd round: cached
        macs, params, layers = cost(compressed, plan)
        assert macs == ad.count_macs(compressed, base.input_shape)
        assert params == ad.count_params(compressed)
        for name, rec in layers.items():
            module = compressed.get_submodule(name)
            assert rec["params"] == ad.count_params(module)
            assert rec["prune"] == plan[name].get("prune")
            if rec["method"] == "prune":
                assert rec["rank"] == module.shift.group_sizes
            elif rec["method"] != "keep":
                assert rec["rank"] == json.loads(json.dumps(module.rank))


def test_plan_cost_equals_fvcore_on_the_applied_plan(workload):
    base, _ = workload
    fast = [m for m in ad.methods() if m not in _ALS]
    space = resolve_space(
        base.model, parse_space({"methods": fast, "ratio": [0.05, 1.0]}), base.input_shape
    )
    plans = [t.user_attrs["plan"] for t in _run(space, 8, seed=3)]
    plans.append({name: {"method": "keep"} for name in space.names})
    _check_plan_cost(base, space, plans)


def test_plan_cost_equals_fvcore_with_shift_pruning(workload):
    base, _ = workload  # a plain CNN: layers that draw "shift" are pruned too
    cfg = {"methods": ["shift", "tucker"], "ratio": [0.05, 1.0], "shift_prune": [0.0, 0.7]}
    space = resolve_space(base.model, parse_space(cfg), base.input_shape)
    plans = [t.user_attrs["plan"] for t in _run(space, 4, seed=1)]
    assert sum("prune" in entry for plan in plans for entry in plan.values()) >= 2
    _check_plan_cost(base, space, plans)

    model = get_model("shiftresnet20", expansion=1).eval()
    shape = (3, 8, 8)
    shifted = Baseline(
        model, 0.5, ad.count_macs(model, shape), ad.count_params(model), shape, Path()
    )
    cfg = {"methods": ["tucker"], "shift_prune": {"range": [0.0, 0.8], "step": 0.1}}
    space = resolve_space(model, parse_space(cfg), shape)
    plans = [t.user_attrs["plan"] for t in _run(space, 2, seed=2)]
    plans.append({name: {"method": "keep"} for name in space.names})
    assert {entry["method"] for entry in plans[0].values()} >= {"prune"}
    _check_plan_cost(shifted, space, plans)


@pytest.mark.slow
def test_plan_cost_equals_fvcore_for_als_methods(workload):
    base, _ = workload
    space = resolve_space(base.model, parse_space({"methods": "*"}), base.input_shape)
    plans = [_uniform_plan(space, m, 0.1) for m in ad.methods() if m in _ALS]
    _check_plan_cost(base, space, plans)


def _uniform_plan(space, method: str, ratio: float) -> dict:
    params = uniform_params(space, method, ratio)
    plan = {}
    for layer in space.layers:
        chosen = params[f"{layer.name}/method"]
        plan[layer.name] = {"method": chosen}
        if chosen != "keep":
            plan[layer.name]["ratio"] = params[f"{layer.name}/{chosen}/ratio"]
    return plan


def test_cheapest_cost_and_an_impossible_budget():
    model = get_model("digits_cnn", in_channels=1).eval()
    shape = (1, 8, 8)
    raw = {"methods": ["tucker", "tt"], "layers": {"exclude": ["conv1"]}, "ratio": [0.2, 0.6]}
    space = resolve_space(model, parse_space({**raw, "keep": False}), shape)
    least = cheapest_cost(model, space, shape)
    macs, params = ad.count_macs(model, shape), ad.count_params(model)
    for layer in space.layers:  # brute force: each layer's cheapest fitted option
        costs = []
        for method in layer.choices:
            lowest = layer.ratio_range(method).lo  # 0.2, or TT's MAC ceiling below it
            small = ad.apply_plan(model, {layer.name: {"method": method, "ratio": lowest}})
            costs.append((ad.count_macs(small, shape), ad.count_params(small)))
        macs -= ad.count_macs(model, shape) - min(c[0] for c in costs)
        params -= ad.count_params(model) - min(c[1] for c in costs)
    assert least == {"macs": macs, "params": params}
    with_keep = cheapest_cost(model, resolve_space(model, parse_space(raw), shape), shape)
    assert with_keep == least  # the smallest options are cheaper than keeping a layer dense

    check_budgets(model, space, Budgets(max_macs=least["macs"]), shape)  # just feasible
    with pytest.raises(ConfigError) as info:
        check_budgets(model, space, Budgets(max_macs=least["macs"] - 1), shape)
    assert str(info.value) == (
        f"budgets.max_macs {least['macs'] - 1:,} is below the cheapest plan of the space "
        f"({least['macs']:,} MACs: every layer at its smallest option)"
    )
    with pytest.raises(ConfigError, match=r"budgets.max_params 0.01 \(333 params\) is below"):
        check_budgets(model, space, Budgets(max_params=0.01), shape)
