"""GKPD and SeKron: exact recovery, optimality, geometry, rank specs, cache reuse."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn

import autodecomp as ad
from autodecomp.decompositions import ConvSpec, UnsupportedLayerError, get_method
from autodecomp.factorize import FactorCache, weight_key
from autodecomp.factorize.kronecker import best_ranks, preferred_structures, structures

GKPD = get_method("gkpd")
SEKRON = get_method("sekron")


def kron_sum(*stacks: torch.Tensor) -> torch.Tensor:
    """sum_r kron(stacks[0][r], stacks[1][r], ...) with torch.kron (independent of the library)."""
    total = 0
    for terms in zip(*stacks, strict=True):
        product = terms[0]
        for t in terms[1:]:
            product = torch.kron(product, t)
        total = total + product
    return total


def conv_with(weight: torch.Tensor, bias: bool = False, **geometry) -> nn.Conv2d:
    f, c, kh, kw = weight.shape
    conv = nn.Conv2d(c, f, (kh, kw), bias=bias, **geometry).double()
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias:
            conv.bias.normal_()
    return conv


def rel_error(layer, conv) -> float:
    return float((layer.dense_weight() - conv.weight).norm() / conv.weight.norm())


# ---- exact recovery and optimality ------------------------------------------------------------
@pytest.mark.parametrize(
    ("a_shape", "b_shape", "rank"),
    [
        ((4, 2, 3, 1), (3, 4, 1, 3), 3),
        ((2, 4, 1, 1), (6, 2, 3, 3), 5),
        ((3, 2, 1, 1), (4, 4, 1, 1), 2),
    ],
)
def test_gkpd_recovers_a_sum_of_kronecker_products(generator, a_shape, b_shape, rank):
    a = torch.randn(rank, *a_shape, generator=generator, dtype=torch.float64)
    b = torch.randn(rank, *b_shape, generator=generator, dtype=torch.float64)
    conv = conv_with(kron_sum(a, b))
    layer = ad.decompose_conv(conv, "gkpd", rank={"rank": rank, "a_shape": list(a_shape)})
    assert rel_error(layer, conv) < 1e-10
    assert layer.a_factors.shape == (rank, *a_shape)
    assert layer.b_factors.shape == (rank, *b_shape)
    torch.testing.assert_close(kron_sum(layer.a_factors, layer.b_factors), layer.dense_weight())


def test_sekron_recovers_a_three_factor_chain(generator):
    shapes, (r1, r2) = [(2, 2, 1, 3), (3, 2, 1, 1), (2, 2, 3, 1)], (3, 4)
    a1 = torch.randn(r1, *shapes[0], generator=generator, dtype=torch.float64)
    a2 = torch.randn(r1, r2, *shapes[1], generator=generator, dtype=torch.float64)
    a3 = torch.randn(r2, *shapes[2], generator=generator, dtype=torch.float64)
    weight = sum(
        torch.kron(torch.kron(a1[i], a2[i, j]), a3[j]) for i in range(r1) for j in range(r2)
    )
    conv = conv_with(weight)
    rank = {"shapes": [list(s) for s in shapes], "ranks": [r1, r2]}
    layer = ad.decompose_conv(conv, "sekron", rank=rank)
    assert layer.rank == rank
    assert rel_error(layer, conv) < 1e-10


def test_sekron_recovers_a_four_factor_chain(generator):
    structure = ((2, 2, 1, 1), (2, 2, 1, 1), (1, 2, 3, 1), (3, 1, 1, 3))
    ranks = [2, 3, 2]
    truth = SEKRON.random(
        ConvSpec.create(8, 12, 3, bias=False),
        {"shapes": [list(s) for s in structure], "ranks": ranks},
        generator,
    ).double()
    conv = conv_with(truth.dense_weight().detach())
    layer = ad.decompose_conv(conv, "sekron", rank=truth.rank)
    assert rel_error(layer, conv) < 1e-10


@pytest.mark.parametrize("a_shape", [(4, 2, 3, 1), (3, 4, 1, 1), (2, 4, 3, 3)])
def test_gkpd_error_is_the_svd_tail_of_the_rearranged_kernel(generator, a_shape):
    weight = torch.randn(12, 8, 3, 3, generator=generator, dtype=torch.float64)
    f1, c1, h1, w1 = a_shape
    f2, c2, h2, w2 = 12 // f1, 8 // c1, 3 // h1, 3 // w1
    rearranged = (
        weight.reshape(f1, f2, c1, c2, h1, h2, w1, w2)
        .permute(0, 2, 4, 6, 1, 3, 5, 7)
        .reshape(f1 * c1 * h1 * w1, -1)
    )
    s = torch.linalg.svdvals(rearranged)
    conv = conv_with(weight)
    for r in (1, 3, len(s) // 2, len(s) - 1):
        layer = ad.decompose_conv(conv, "gkpd", rank={"rank": r, "a_shape": list(a_shape)})
        tail = float(s[r:].square().sum().sqrt() / weight.norm())
        assert abs(rel_error(layer, conv) - tail) < 1e-10


def test_sekron_error_is_the_sum_of_level_tails_and_the_search_predicts_it(generator):
    weight = torch.randn(12, 8, 3, 3, generator=generator, dtype=torch.float64)
    structure = ((3, 2, 1, 1), (2, 2, 1, 3), (2, 2, 3, 1))
    cache = FactorCache()
    budget = 300
    squared, ranks = best_ranks(weight, weight_key(weight), structure, budget, cache)
    rank = {"shapes": [list(a) for a in structure], "ranks": list(ranks)}
    assert SEKRON.param_count(ConvSpec.from_conv(conv_with(weight)), rank) <= budget
    layer = ad.decompose_conv(conv_with(weight), "sekron", rank=rank, cache=cache)
    expected = math.sqrt(squared) / float(weight.norm())
    assert abs(rel_error(layer, conv_with(weight)) - expected) < 1e-10


def test_max_params_picks_the_structure_of_least_error_within_budget(generator):
    weight = torch.randn(16, 16, 3, 3, generator=generator, dtype=torch.float64)
    conv = conv_with(weight, bias=True)
    spec = ConvSpec.from_conv(conv)
    budget = math.floor(0.25 * spec.dense_params())
    for method in (GKPD, SEKRON):
        default = method.rank_for_ratio(spec, 0.25)
        assert "max_params" not in default  # a ratio gives the weight-free rank
        assert ad.decompose_conv(conv, method.name, ratio=0.25).rank == default
        asked = {**default, "max_params": budget}
        error = rel_error(ad.decompose_conv(conv, method.name, rank=default), conv)
        single = ad.decompose_conv(conv, method.name, rank=asked, candidates=1)
        best = ad.decompose_conv(conv, method.name, rank=asked, slack=0.0)
        assert "max_params" not in best.rank
        assert best.params() <= budget
        assert rel_error(best, conv) <= min(error, rel_error(single, conv)) + 1e-12
        cheap = ad.decompose_conv(conv, method.name, rank=asked, slack=0.05)
        assert cheap.params() <= budget
        assert rel_error(cheap, conv) <= 1.05 * rel_error(best, conv)
        assert cheap.macs(32, 32) <= best.macs(32, 32)


# ResNet-20 and ResNet-18 conv shapes: (out, in, kernel, stride, input size)
RESNET_CONVS = [
    (16, 3, 3, 1, 32),
    (16, 16, 3, 1, 32),
    (32, 16, 3, 2, 32),
    (32, 16, 1, 2, 32),
    (64, 3, 7, 2, 32),
    (64, 64, 3, 1, 8),
    (128, 64, 3, 2, 8),
    (128, 64, 1, 2, 8),
    (256, 256, 3, 1, 2),
    (512, 256, 3, 2, 2),
    (512, 256, 1, 2, 2),
    (512, 512, 3, 1, 1),
]


@pytest.mark.parametrize("method", [GKPD, SEKRON], ids=["gkpd", "sekron"])
def test_macs_and_params_fall_as_the_ratio_falls(method):
    ratios = [round(1.0 - 0.004 * i, 4) for i in range(247)]  # 1.0 down to 0.016
    for out, inp, k, stride, hw in RESNET_CONVS:
        spec = ConvSpec.from_conv(nn.Conv2d(inp, out, k, stride, k // 2, bias=False))
        costs = []
        for ratio in ratios:
            layer = method.empty_like(spec, method.rank_for_ratio(spec, ratio), torch.empty(0))
            costs.append((layer.macs(hw, hw), layer.params()))
        for (macs, params), (fewer_macs, fewer_params) in itertools.pairwise(costs):
            assert fewer_macs <= macs and fewer_params <= params, (spec, method.name)
        assert costs[-1] < costs[0]  # not constant: the grid spans ranks


@pytest.mark.parametrize("method", ["gkpd", "sekron"])
def test_a_fitted_ratio_layer_costs_what_fvcore_counts(generator, method):
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 128, 3, 2, 1, bias=False)
    spec = ConvSpec.from_conv(conv)
    for ratio in (0.25, 0.245, 0.215):
        layer = ad.decompose_conv(conv, method, ratio=ratio)
        assert layer.rank == get_method(method).rank_for_ratio(spec, ratio)
        assert layer.macs(16, 16) == ad.count_macs(layer, (64, 16, 16))
        assert layer.params() == ad.count_params(layer)


# ---- geometry ---------------------------------------------------------------------------------
GEOMETRIES = [
    # (in, out, kernel, stride, padding, dilation, bias, hw, gkpd a_shape, sekron shapes)
    (8, 12, 3, 2, 1, 1, True, (11, 10), [4, 2, 3, 1], [[2, 2, 1, 3], [3, 2, 1, 1], [2, 2, 3, 1]]),
    (
        8,
        12,
        3,
        1,
        "same",
        2,
        False,
        (9, 9),
        [2, 4, 1, 3],
        [[3, 2, 3, 1], [2, 2, 1, 3], [2, 2, 1, 1]],
    ),
    (
        8,
        12,
        (4, 3),
        2,
        (2, 1),
        2,
        True,
        (13, 12),
        [3, 4, 2, 1],
        [[2, 2, 2, 1], [3, 1, 1, 3], [2, 4, 2, 1]],
    ),
    (
        12,
        8,
        4,
        1,
        "same",
        1,
        True,
        (8, 7),
        [2, 3, 2, 2],
        [[2, 2, 2, 1], [2, 3, 1, 2], [2, 2, 2, 2]],
    ),
    (
        12,
        8,
        (2, 6),
        (3, 2),
        0,
        (1, 2),
        False,
        (14, 17),
        [8, 3, 2, 3],
        [[2, 2, 1, 3], [2, 3, 2, 1], [2, 2, 1, 2]],
    ),
    (12, 8, 1, 2, 0, 1, True, (7, 8), [2, 3, 1, 1], [[2, 2, 1, 1], [2, 3, 1, 1], [2, 2, 1, 1]]),
]


@pytest.mark.parametrize("geom", GEOMETRIES, ids=[f"g{i}" for i in range(len(GEOMETRIES))])
@pytest.mark.parametrize("method", ["gkpd", "sekron"])
def test_forward_and_macs_for_every_geometry(generator, method, geom):
    cin, cout, k, s, p, d, bias, hw, a_shape, shapes = geom
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, bias=bias).double()
    spec = ConvSpec.from_conv(conv)
    rank = (
        {"rank": 3, "a_shape": a_shape} if method == "gkpd" else {"shapes": shapes, "ranks": [2, 3]}
    )
    layer = get_method(method).random(spec, rank, generator).double()
    x = torch.randn(2, cin, *hw, generator=generator, dtype=torch.float64)
    expected = spec.dense_forward(x, layer.dense_weight(), layer.bias)
    assert expected.shape == conv(x).shape
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    assert layer.macs(*hw) == ad.count_macs(layer.float(), (cin, *hw))


def test_gkpd_macs_match_the_two_stage_formula():
    # A (F1, C1, 1, 1), B (F2, C2, 3, 3): the B stage takes the whole stride (h1 = w1 = 1).
    spec = ConvSpec.create(8, 12, 3, stride=2, padding=1, bias=False)
    layer = GKPD(spec, {"rank": 5, "a_shape": [3, 4, 1, 1]})
    ho, wo = spec.output_size(10, 11)
    f1, c1, f2, c2, r = 3, 4, 4, 2, 5
    assert layer.macs(10, 11) == c1 * r * f2 * c2 * 9 * ho * wo + f2 * f1 * r * c1 * ho * wo
    # A (F1, C1, 3, 1): rows of the B stage are all needed, columns only every second one.
    layer = GKPD(spec, {"rank": 5, "a_shape": [3, 4, 3, 1]})
    hz, wz = 12 - 1 + 1, (13 - 3) // 2 + 1
    assert layer.macs(10, 11) == c1 * r * f2 * c2 * 3 * hz * wz + f2 * f1 * r * c1 * 3 * ho * wo


# ---- rank specs and unsupported layers --------------------------------------------------------
def test_three_input_channel_1x1_conv_is_unsupported():
    conv = nn.Conv2d(3, 16, 1)
    spec = ConvSpec.from_conv(conv)
    for method in ("gkpd", "sekron"):
        assert "= 3 cannot be split" in get_method(method).unsupported_reason(spec)
        with pytest.raises(UnsupportedLayerError, match="cannot be split"):
            ad.decompose_conv(conv, method, ratio=0.5)
    assert GKPD.unsupported_reason(ConvSpec.from_conv(nn.Conv2d(3, 16, 3))) is None
    assert SEKRON.default_levels(ConvSpec.from_conv(nn.Conv2d(2, 16, 1))) == 2
    assert not structures((16, 3, 1, 1), 2)


def test_rank_specs_round_trip_through_json(generator):
    conv = conv_with(torch.randn(12, 8, 3, 3, generator=generator, dtype=torch.float64), bias=True)
    spec = ConvSpec.from_conv(conv)
    for method in (GKPD, SEKRON):
        for rank in (2, method.rank_for_ratio(spec, 0.3), next(iter(method.rank_candidates(spec)))):
            canonical = method.normalize_rank(spec, rank)
            assert method.normalize_rank(spec, json.loads(json.dumps(canonical))) == canonical
        layer = ad.decompose_conv(conv, method.name, ratio=0.3)
        again = ad.decompose_conv(conv, method.name, rank=json.loads(json.dumps(layer.rank)))
        torch.testing.assert_close(again.dense_weight(), layer.dense_weight())
    assert GKPD.normalize_rank(spec, 2) == {"rank": 2, "a_shape": list(GKPD.default_a_shape(spec))}
    assert SEKRON.normalize_rank(spec, {"ranks": [2]})["shapes"] == [
        list(a) for a in SEKRON.default_structure(spec, 2)
    ]


@pytest.mark.parametrize(
    ("method", "rank", "message"),
    [
        ("gkpd", {"rank": 28, "a_shape": [4, 8, 1, 1]}, r"must be in \[1, 27\]"),
        ("gkpd", {"rank": 2, "a_shape": [5, 8, 1, 1]}, "a_shape .* invalid"),
        (
            "gkpd",
            {"rank": 2, "a_shape": [12, 1, 1, 1]},
            "C1\\*h1\\*w1 and C2\\*h2\\*w2 must be >= 2",
        ),
        ("gkpd", {"rank": 2, "b_shape": [1, 1, 1, 1]}, "keys must be"),
        ("gkpd", (2, 3), "must be an int"),
        ("sekron", {"ranks": [2, 99]}, r"R2=99 out of range"),
        ("sekron", {"shapes": [[12, 1, 1, 1], [1, 8, 3, 3]], "ranks": [2]}, "invalid for kernel"),
        ("sekron", {"shapes": [[12, 8, 3, 3]], "ranks": [2]}, "len\\(ranks\\) \\+ 1"),
        ("sekron", {"ranks": [2], "max_params": 0}, "max_params"),
    ],
)
def test_bad_rank_specs_are_clear_value_errors(method, rank, message):
    spec = ConvSpec.create(8, 12, 3)
    with pytest.raises(ValueError, match=message):
        get_method(method).normalize_rank(spec, rank)


def test_default_structures_are_balanced_and_cheap_to_run():
    # 3x3: vertical/horizontal split (Tai et al. 2016) -- |A| = |B|, one use per weight
    candidates = preferred_structures((64, 64, 3, 3), 2, 6)
    assert set(candidates[:2]) == {
        ((64, 1, 1, 3), (1, 64, 3, 1)),
        ((64, 1, 3, 1), (1, 64, 1, 3)),
    }
    assert len({tuple((f[2], f[3]) for f in s) for s in candidates}) == 4  # every kernel split
    # 7x7 on RGB: a basis of R spatial filters shared by every channel pair
    assert preferred_structures((64, 3, 7, 7), 2, 1)[0] == ((64, 3, 1, 1), (1, 1, 7, 7))
    spec = ConvSpec.create(64, 64, 3, padding=1)
    tai = GKPD.from_weight(torch.randn(64, 64, 3, 3), None, spec, GKPD.normalize_rank(spec, 19))
    assert tai.macs(32, 32) * 4 < spec.dense_macs(32, 32)  # params ratio 0.2, MACs ~0.2


# ---- cache ------------------------------------------------------------------------------------
def test_one_svd_per_weight_and_factor_shape_serves_every_rank(generator):
    conv = conv_with(torch.randn(12, 8, 3, 3, generator=generator, dtype=torch.float64))
    cache = FactorCache()
    for r in (1, 4, 9):
        ad.decompose_conv(conv, "gkpd", rank={"rank": r, "a_shape": [4, 2, 3, 1]}, cache=cache)
    assert (cache.misses, cache.hits) == (1, 2)
    shapes = [[2, 2, 1, 3], [3, 2, 1, 1], [2, 2, 3, 1]]
    for r2 in (1, 2, 5):  # level 0 is GKPD's SVD for a_shape [2, 2, 1, 3]; level 1 per R1
        ad.decompose_conv(conv, "sekron", rank={"shapes": shapes, "ranks": [3, r2]}, cache=cache)
    assert (cache.misses, cache.hits) == (3, 7)
    chosen = ad.decompose_conv(conv, "gkpd", ratio=0.3, cache=cache).rank
    misses = cache.misses
    ad.decompose_conv(conv, "gkpd", ratio=0.3, cache=cache)
    ad.decompose_conv(conv, "gkpd", rank={**chosen, "rank": chosen["rank"] - 1}, cache=cache)
    assert cache.misses == misses
