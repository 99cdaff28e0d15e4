"""The MAC cap of a search space (``max_layer_macs``): no option costs more than that
fraction of its dense layer's MACs in sampled trials, ladder options or uniform plans."""

from __future__ import annotations

import math

import optuna
import pytest
import yaml
from torch import nn

import autodecomp as ad
from autodecomp.compress.surgery import skeleton
from autodecomp.config import load_config, parse_space
from autodecomp.core.errors import ConfigError
from autodecomp.decompositions import ConvSpec, get_method
from autodecomp.measure.plan_cost import PlanCost
from autodecomp.search.mac_cap import option_macs, ratio_ceiling
from autodecomp.search.space import (
    SearchSpace,
    layer_params,
    resolve_space,
    suggest_plan,
    uniform_params,
)
from autodecomp.search.study import prepare
from autodecomp.workload.models import get_model

optuna.logging.set_verbosity(optuna.logging.WARNING)

SHAPE = (3, 32, 32)


@pytest.fixture(scope="module")
def resnet20():
    model = get_model("resnet20").eval()
    return model, PlanCost(model, SHAPE, ad.conv_layers(model))


def _over(net, plan: dict, cap: float) -> list[str]:
    """The layers of ``plan`` whose fvcore MACs exceed ``cap`` x their dense MACs."""
    model, cost = net
    _, _, records = cost(skeleton(model, plan), plan)
    return [n for n, r in records.items() if r["macs"] > cap * cost.dense_macs(n)]


def _plan(space: SearchSpace, params: dict) -> dict:
    return suggest_plan(optuna.trial.FixedTrial(params), space)


@pytest.mark.parametrize("cap", [1.0, pytest.param(0.5, marks=pytest.mark.slow)])
def test_no_sampled_ladder_or_uniform_option_exceeds_the_cap(resnet20, cap):
    cfg = parse_space({"methods": "*", "keep": False, "ratio": [0.05, 0.8], "max_layer_macs": cap})
    space = resolve_space(resnet20[0], cfg, SHAPE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(8):
        assert _over(resnet20, suggest_plan(study.ask(), space), cap) == []
    for method in sorted({m for layer in space.layers for m in layer.choices}):
        for ratio in (0.8, 0.25):
            plan = _plan(space, uniform_params(space, method, ratio))
            assert _over(resnet20, plan, cap) == [], (method, ratio)
        for layer in space.layers:  # the ladder's options: each layer alone, at the top
            if method in layer.choices:
                plan = _plan(SearchSpace((layer,)), layer_params(layer, method, 0.8))
                assert _over(resnet20, plan, cap) == [], (method, layer.name)


def test_tt_at_a_quarter_of_the_parameters_is_capped(resnet20):
    model = resnet20[0]
    plain = resolve_space(model, parse_space({"methods": ["tt"], "keep": False}))
    capped = resolve_space(model, parse_space({"methods": ["tt"], "keep": False}), SHAPE)
    uncapped = _plan(plain, uniform_params(plain, "tt", 0.25))
    assert len(_over(resnet20, uncapped, 1.0)) > 10  # what a parameter ratio alone gives
    assert _over(resnet20, _plan(capped, uniform_params(capped, "tt", 0.25)), 1.0) == []
    layer = capped.layers[-1]  # layer3.2.conv2, 64 -> 64 on 8x8
    assert layer.ratio_range("tt").hi == layer.ceilings["tt"] < 0.1
    assert layer.ratio_range("tucker") == layer.ratio  # not offered, not capped


def test_the_ceiling_is_tight():
    spec = ConvSpec.from_conv(nn.Conv2d(64, 64, 3, padding=1, bias=False))
    cls = get_method("tt")
    ceiling = ratio_ceiling("tt", spec, (8, 8), 1.0, 0.8)
    dense = spec.dense_macs(8, 8)
    at = cls.rank_for_ratio(spec, ceiling)
    assert option_macs("tt", spec, at, (8, 8)) <= dense
    budget = ceiling * spec.dense_params()
    later = [r for r in cls.rank_candidates(spec) if cls.param_count(spec, r) > budget]
    assert option_macs("tt", spec, later[0], (8, 8)) > dense  # the next rank is over
    assert math.isclose(budget, cls.param_count(spec, at) + 0.5)
    assert ratio_ceiling("tt", spec, (8, 8), 100.0, 0.8) == 0.8  # nothing over: the range's top


def test_methods_and_ranks_over_the_cap_are_not_offered(resnet20):
    model = resnet20[0]
    ranks = {"layers": "layer3.2.*", "ranks": {"tucker": [[16, 16], [64, 64]]}}
    raw = {"methods": ["tt", "tucker"], "overrides": [ranks]}
    last = resolve_space(model, parse_space(raw), SHAPE).layers[-1]  # 64 -> 64, 8x8
    assert last.ranks == {"tucker": ("[16, 16]",)}  # [64, 64] costs more than the dense conv
    last = resolve_space(model, parse_space({**raw, "max_layer_macs": 0.02}), SHAPE).layers[-1]
    assert last.choices == ("tucker", "keep")  # tt's smallest rank costs 3.6 % of dense
    with pytest.raises(ConfigError) as info:
        tt_only = {"methods": ["tt"], "keep": False, "max_layer_macs": 0.001}
        resolve_space(model, parse_space(tt_only), SHAPE)
    assert str(info.value) == (
        "layer 'conv1': every option of tt costs more than space.max_layer_macs = 0.001 x its "
        "dense MACs and keep is false; raise max_layer_macs or allow keep"
    )


def test_step_ranges_end_on_the_grid_below_the_ceiling(resnet20):
    raw = {"methods": ["tt"], "ratio": {"range": [0.02, 0.5], "step": 0.02}}
    space = resolve_space(resnet20[0], parse_space(raw), SHAPE)
    layer = space.layers[-1]
    r = layer.ratio_range("tt")
    assert r.lo == 0.02 and r.hi <= layer.ceilings["tt"] < r.hi + 0.02
    assert round((r.hi - r.lo) / 0.02, 9) == round((r.hi - r.lo) / 0.02)


def test_a_study_space_is_capped(tmp_path):
    raw = {
        "model": {"name": "digits_cnn"},
        "data": {"name": "digits", "image_size": 8},
        "space": {"methods": ["tt"], "max_layer_macs": 0.5},
        "trials": 3,
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(raw))
    prepared = prepare(load_config(tmp_path / "study.yaml"))
    assert any(layer.ceilings for layer in prepared.space.layers)


@pytest.mark.parametrize("bad", [0, -0.5, "x", True, None])
def test_bad_max_layer_macs_is_a_one_line_error(bad):
    with pytest.raises(ConfigError) as info:
        parse_space({"max_layer_macs": bad})
    assert str(info.value) == (
        "space.max_layer_macs must be a number > 0 (a fraction of each dense layer's MACs, "
        f"e.g. 1.0), got {bad!r}"
    )


def test_default_cap_is_one_and_listed_in_valid_keys():
    assert parse_space({}).max_layer_macs == 1.0
    with pytest.raises(ConfigError, match="max_layer_macs"):
        parse_space({"max_layer_mac": 1.0})


@pytest.mark.parametrize(
    ("out", "inp", "k", "stride", "hw"),
    [(16, 3, 3, 1, 32), (32, 16, 3, 2, 32), (64, 32, 1, 2, 16), (128, 128, 3, 1, 8),
     (256, 128, 3, 2, 8), (512, 256, 1, 2, 4)],
)  # fmt: skip
def test_default_rank_paths_are_monotone_in_macs(out, inp, k, stride, hw):
    """What :func:`ratio_ceiling`'s bisection relies on, for every registered method."""
    spec = ConvSpec.from_conv(nn.Conv2d(inp, out, k, stride, k // 2, bias=False))
    for method in ad.methods():
        cls = get_method(method)
        if cls.unsupported_reason(spec) is not None:
            continue
        ranks = list(cls.rank_candidates(spec))
        sampled = ranks[:: max(1, len(ranks) // 150)] + ranks[-1:]
        costs = [
            (cls.param_count(spec, r), option_macs(method, spec, r, (hw, hw))) for r in sampled
        ]
        for column in zip(*costs, strict=True):  # parameters, then MACs
            assert list(column) == sorted(column), method
