"""Rank alignment (``space.rank_multiple``): ratio-chosen channel ranks rounded down."""

from __future__ import annotations

import optuna
import pytest
from torch import nn

import autodecomp as ad
from autodecomp.compress.surgery import skeleton
from autodecomp.config import parse_space
from autodecomp.core.errors import ConfigError
from autodecomp.decompositions import ConvSpec, get_method
from autodecomp.search.space import resolve_space, suggest_plan


def _widths(rank) -> tuple[int, ...]:
    return tuple(rank) if isinstance(rank, tuple) else (rank,)


def test_align_rank_rounds_channel_widths_down():
    spec = ConvSpec.from_conv(nn.Conv2d(64, 64, 3, padding=1))
    tucker, cp, pdp, tr = (get_method(m) for m in ("tucker", "cp", "pdp", "tr"))
    assert tucker.rank_for_ratio(spec, 0.25) == (25, 25)
    assert tucker.rank_for_ratio(spec, 0.25, 8) == (24, 24)
    gkpd = get_method("gkpd")  # overrides rank_for_ratio; its ranks are not channel widths
    assert gkpd.rank_for_ratio(spec, 0.25, 8) == gkpd.rank_for_ratio(spec, 0.25)
    assert tucker.align_rank(spec, (25, 25), 8) == (24, 24)
    assert tucker.align_rank(spec, (25, 6), 8) == (24, 6)  # widths below the multiple stay
    assert tucker.align_rank(spec, (25, 25), 1) == (25, 25)
    assert tucker.align_rank(spec, (25, 25), 16) == (16, 16)
    assert (cp.align_rank(spec, 68, 8), pdp.align_rank(spec, 66, 8)) == (64, 64)
    assert cp.align_rank(spec, 7, 8) == 7
    assert tr.align_rank(spec, [5, 12, 12], 8) == [5, 12, 12]  # not channel widths: kept
    for bad in (0, -8, 2.0, True):
        with pytest.raises(ValueError, match=f"rank_multiple must be an integer >= 1, got {bad}"):
            tucker.align_rank(spec, (25, 25), bad)


@pytest.mark.parametrize("method", ["tucker", "cp", "pdp"])
def test_decompose_conv_aligns_the_ratio_rank_within_the_budget(method):
    conv = nn.Conv2d(32, 24, 3, stride=2, padding=2, dilation=2, bias=True)
    spec = ConvSpec.from_conv(conv)
    plain = ad.decompose_conv(conv, method, ratio=0.3)
    aligned = ad.decompose_conv(conv, method, ratio=0.3, rank_multiple=8)
    assert aligned.rank == get_method(method).align_rank(spec, plain.rank, 8) != plain.rank
    assert all(w % 8 == 0 for w in _widths(aligned.rank))
    assert aligned.params() == ad.count_params(aligned) <= 0.3 * spec.dense_params()
    assert aligned.macs(16, 16) == ad.count_macs(aligned, (32, 16, 16))
    # an explicit rank is the user's: never aligned
    explicit = ad.decompose_conv(conv, method, rank=plain.rank, rank_multiple=8)
    assert explicit.rank == plain.rank


def test_search_plans_carry_rank_multiple_and_skeleton_costs_match():
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 40, 3, padding=1)
    ).eval()
    cfg = {"methods": ["tucker", "pdp"], "keep": False, "ratio": [0.2, 0.6]}
    space = resolve_space(model, parse_space({**cfg, "rank_multiple": 8}))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(6):
        plan = suggest_plan(study.ask(), space)
        assert {entry["rank_multiple"] for entry in plan.values()} == {8}
        compressed = ad.apply_plan(model, plan)
        for name in plan:
            widths = _widths(compressed.get_submodule(name).rank)
            assert all(w % 8 == 0 for w in widths if w >= 8)
        shape = (3, 12, 12)
        assert ad.count_macs(skeleton(model, plan), shape) == ad.count_macs(compressed, shape)
    # the default adds nothing to stored plans
    plain = resolve_space(model, parse_space(cfg))
    assert all("rank_multiple" not in e for e in suggest_plan(study.ask(), plain).values())


def test_rank_multiple_config_errors():
    with pytest.raises(ConfigError, match=r"space.rank_multiple must be an integer >= 1, got 0"):
        parse_space({"rank_multiple": 0})
    assert parse_space({"rank_multiple": 8}).rank_multiple == 8
