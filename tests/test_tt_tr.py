"""Tensor-train (``tt``) and tensor-ring (``tr``) convolutions: exactness, rank specs, caching."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autodecomp as ad
from autodecomp.decompositions import ConvSpec, get_method
from autodecomp.decompositions.tt import default_factors
from autodecomp.factorize import default_cache
from autodecomp.factorize.tensor_train import left_factor, ring_tensor
from autodecomp.measure.cost import count_macs, uncounted_ops

TT, TR = get_method("tt"), get_method("tr")


def _conv(cin: int, cout: int, kernel, **kwargs) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel, **kwargs).double()
    with torch.no_grad():
        conv.weight.normal_(generator=torch.Generator().manual_seed(11))
    return conv


def _relative_error(layer: ad.DecomposedConv, weight: torch.Tensor) -> float:
    with torch.no_grad():
        return float((layer.dense_weight() - weight).norm() / weight.norm())


def _recover(method, conv: nn.Conv2d, rank, seed: int = 0) -> tuple[ad.DecomposedConv, float]:
    """Fill ``conv`` with a random kernel of exactly ``rank`` and decompose it at that rank."""
    spec = ConvSpec.from_conv(conv)
    truth = method.random(spec, rank, torch.Generator().manual_seed(seed)).double()
    with torch.no_grad():
        conv.weight.copy_(truth.dense_weight())
    layer = ad.decompose_conv(conv, method.name, rank=rank)
    return layer, _relative_error(layer, conv.weight)


@pytest.mark.parametrize("method", [TT, TR], ids=["tt", "tr"])
@pytest.mark.parametrize("kernel", [3, 1, (1, 3), (1, 2)], ids=["3x3", "1x1", "1x3", "1x2"])
def test_every_rank_on_the_ratio_path_is_recovered_exactly(method, kernel):
    conv = _conv(12, 16, kernel)
    for seed, rank in enumerate(method.rank_candidates(ConvSpec.from_conv(conv))):
        _, err = _recover(method, conv, rank, seed)
        assert err < 1e-9, f"{method.name} at rank {rank}: relative error {err:.2e}"


# ---- tt ---------------------------------------------------------------------------------------
TT_CASES = [
    # (C, F, kernel, rank spec): 1, 2 and 3 cores, unit factors, a prime C, non-square kernels
    (8, 12, 3, {"in": [8], "out": [12], "ranks": [5]}),
    (8, 12, 3, {"in": [4, 2], "out": [3, 4], "ranks": [4, 7]}),
    (8, 12, 3, {"in": [2, 4], "out": [4, 3], "ranks": [9, 5]}),
    (16, 16, 3, {"in": [2, 4, 2], "out": [4, 2, 2], "ranks": [6, 20, 3]}),
    (7, 10, (3, 5), {"in": [7, 1], "out": [2, 5], "ranks": [8, 5]}),
    (12, 6, 1, {"in": [3, 4], "out": [3, 2], "ranks": [1, 6]}),
    (3, 16, 3, [4, 6]),
]


@pytest.mark.parametrize("cin, cout, kernel, rank", TT_CASES)
def test_tt_recovers_constructed_kernels_exactly(cin, cout, kernel, rank):
    layer, err = _recover(TT, _conv(cin, cout, kernel, padding=1), rank)
    assert err < 1e-10, f"rank {layer.rank}: relative error {err:.2e}"


@pytest.mark.parametrize("cin, cout, kernel, rank", TT_CASES)
def test_tt_forward_and_macs_for_explicit_factorisations(cin, cout, kernel, rank):
    conv = _conv(cin, cout, kernel, stride=2, padding=1)
    layer = ad.decompose_conv(conv, "tt", rank=rank)
    x = torch.randn(2, cin, 9, 8, dtype=torch.float64)
    expected = F.conv2d(x, layer.dense_weight(), layer.bias, stride=2, padding=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-9, atol=1e-9)
    layer = layer.float()
    assert layer.macs(9, 8) == count_macs(layer, (cin, 9, 8))
    assert not uncounted_ops(layer, (cin, 9, 8))


def test_tt_default_factors_are_balanced_and_cover_primes():
    assert default_factors(64, 64, 3) == ((4, 4, 4), (4, 4, 4))
    assert default_factors(8, 12, 2) == ((4, 2), (3, 4))
    cs, fs = default_factors(3, 64, 2)
    assert (math.prod(cs), math.prod(fs)) == (3, 64)
    assert sorted(c * f for c, f in zip(cs, fs, strict=True)) == [12, 16]
    assert default_factors(7, 5, 2) == ((7, 1), (1, 5))


def test_tt_rank_specs_normalise_and_round_trip_through_json():
    spec = ConvSpec.create(8, 12, 3, padding=1)
    canonical = {"in": [4, 2], "out": [3, 4], "ranks": [4, 7]}
    for form in (
        canonical,
        ([4, 2], [3, 4], [4, 7]),
        {"in": (4, 2), "out": (3, 4), "ranks": (4, 7)},
    ):
        assert TT.normalize_rank(spec, form) == canonical
    # an int is every TT rank, capped at each bond's maximum (maximal TT ranks [9, 8])
    assert TT.normalize_rank(spec, 9)["ranks"] == [9, 8]
    assert TT.normalize_rank(spec, 5)["ranks"] == [5, 5]
    assert TT.normalize_rank(spec, [3, 5]) == {"in": [4, 2], "out": [3, 4], "ranks": [3, 5]}
    for rank in [*TT.rank_candidates(spec), TT.normalize_rank(spec, 4)]:
        assert TT.normalize_rank(spec, json.loads(json.dumps(rank))) == rank


def test_tt_bad_specs_are_value_errors_naming_the_valid_range():
    spec = ConvSpec.create(8, 12, 3, padding=1)
    with pytest.raises(ValueError, match=r"'in' \[3, 3\] must be positive and multiply to C=8"):
        TT.normalize_rank(spec, {"in": [3, 3], "out": [3, 4], "ranks": [2, 2]})
    with pytest.raises(ValueError, match=r"must be in \[1, 9\].*maximal TT ranks \[9, 8\]"):
        TT.normalize_rank(spec, 10)
    with pytest.raises(ValueError, match=r"r_0=10 not in \[1, 9\].*maximal TT ranks \[9, 8\]"):
        TT.normalize_rank(spec, {"in": [4, 2], "out": [3, 4], "ranks": [10, 5]})
    # within both maxima (9, 16) but inconsistent: r_1 = 12 needs r_0 * c_1 * f_1 >= 12
    with pytest.raises(ValueError, match=r"r_1=12 > r_0\*c_1\*f_1=6"):
        TT.normalize_rank(spec, {"in": [2, 4], "out": [3, 4], "ranks": [1, 12]})
    for bad in ({"ranks": [2, 2], "in": [4, 2]}, [2, "a"], True, 2.5, {"rank": 3}):
        with pytest.raises(ValueError, match="tt"):
            TT.normalize_rank(spec, bad)


def test_tt_1x1_conv_has_a_single_spatial_rank():
    conv = _conv(12, 8, 1)
    spec = ConvSpec.from_conv(conv)
    assert all(rank["ranks"][0] == 1 for rank in TT.rank_candidates(spec))
    assert TT.normalize_rank(spec, 5)["ranks"][0] == 1
    layer, err = _recover(TT, conv, TT.rank_for_ratio(spec, 0.5))
    assert err < 1e-10
    assert layer.spatial.weight.shape == (1, 1, 1, 1)


def test_tt_caches_each_svd_step_under_its_rank_prefix():
    conv = _conv(16, 16, 3, padding=1)
    factors = {"in": [4, 4], "out": [4, 4]}
    default_cache.clear()
    ad.decompose_conv(conv, "tt", rank={**factors, "ranks": [5, 10]})
    assert (default_cache.hits, default_cache.misses) == (0, 2)  # step 0, step 1 at r_0 = 5
    # same r_0: both steps are cached, nothing is factorised again (the warm rank change)
    layer = ad.decompose_conv(conv, "tt", rank={**factors, "ranks": [5, 16]})
    assert (default_cache.hits, default_cache.misses) == (2, 2)
    # new r_0: the first SVD is reused, only the step after it is new
    ad.decompose_conv(conv, "tt", rank={**factors, "ranks": [7, 16]})
    assert (default_cache.hits, default_cache.misses) == (3, 3)
    # a warm rank change gives what a cold start gives
    default_cache.clear()
    cold = ad.decompose_conv(conv, "tt", rank={**factors, "ranks": [5, 16]})
    torch.testing.assert_close(layer.dense_weight(), cold.dense_weight(), rtol=0, atol=0)


def test_tt_error_is_non_increasing_along_the_rank_path():
    conv = _conv(16, 24, 3, padding=1)
    spec = ConvSpec.from_conv(conv)
    errors = [
        _relative_error(ad.decompose_conv(conv, "tt", rank=rank), conv.weight)
        for rank in TT.rank_candidates(spec)
    ]
    assert all(b <= a * (1 + 1e-3) for a, b in itertools.pairwise(errors))
    assert errors[-1] < 1e-10  # the last rank is the full TT rank


def test_left_factor_matches_the_svd():
    a = torch.randn(6, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for matrix in (a, a.T):
        u, projected = left_factor(matrix)
        s = torch.linalg.svdvals(matrix)
        torch.testing.assert_close(projected.norm(dim=1)[: len(s)], s)
        torch.testing.assert_close(u @ projected, matrix)


# ---- tr ---------------------------------------------------------------------------------------
TR_CASES = [
    # (C, F, kernel, [ra, rb, re]): true rings (ra > 1), 5x5, 1x3, 1x1, prime channel counts
    (8, 12, 3, [4, 2, 2]),
    (8, 12, 3, [2, 4, 4]),
    (16, 16, 3, [3, 5, 5]),
    (8, 12, 5, [2, 3, 3]),
    (9, 12, (1, 3), [3, 3, 3]),
    (8, 12, 1, [2, 3, 3]),
    (7, 11, 3, [3, 2, 2]),
    (12, 8, 3, [1, 8, 8]),
]


@pytest.mark.parametrize("cin, cout, kernel, rank", TR_CASES)
def test_tr_recovers_constructed_rings_exactly(cin, cout, kernel, rank):
    _, err = _recover(TR, _conv(cin, cout, kernel), rank, seed=sum(rank))
    assert err < 1e-9, f"rank {rank}: relative error {err:.2e}"


def test_tr_plain_tr_svd_would_not_be_exact():
    """Why the algebraic start exists: TR-SVD mixes the two bonds of the first core."""
    spec = ConvSpec.create(8, 12, 3)
    truth = TR.random(spec, [4, 2, 2], torch.Generator().manual_seed(0)).double()
    w = truth.dense_weight().detach()
    t = w.reshape(12, 8, 9).permute(1, 2, 0)
    u, s, vh = torch.linalg.svd(t.reshape(8, -1), full_matrices=False)
    z = (s[:8, None] * vh[:8]).reshape(4, 2, 9, 12).permute(1, 2, 3, 0).reshape(18, 48)
    u2, s2, vh2 = torch.linalg.svd(z, full_matrices=False)
    cores = (
        u[:, :8].reshape(8, 4, 2).permute(1, 0, 2),
        u2[:, :2].reshape(2, 9, 2),
        (s2[:2, None] * vh2[:2]).reshape(2, 12, 4),
    )
    assert float((ring_tensor(*cores) - t).norm() / t.norm()) > 0.1


def test_tr_rank_path_stays_in_the_exact_family_with_growing_params():
    for cin, cout, kernel in ((8, 12, 3), (64, 64, 3), (3, 64, 7), (16, 32, 1), (8, 12, (1, 2))):
        spec = ConvSpec.create(cin, cout, kernel)
        ranks = list(TR.rank_candidates(spec))
        params = [TR.param_count(spec, r) for r in ranks]
        assert params == sorted(set(params))
        assert all(rb == re and ra * rb <= min(cin, cout) for ra, rb, re in ranks)
        assert ranks[0] == [1, 1, 1]
        if spec.kernel_area == 2:  # no exact start for rings of 2-tap kernels with ra > 1
            assert all(ra == 1 for ra, _, _ in ranks)


def test_tr_rank_specs_normalise_and_round_trip_through_json():
    spec = ConvSpec.create(8, 12, 3)
    assert TR.normalize_rank(spec, 2) == [2, 2, 2]
    assert TR.normalize_rank(spec, (4, 2, 3)) == [4, 2, 3]
    for rank in TR.rank_candidates(spec):
        assert TR.normalize_rank(spec, json.loads(json.dumps(rank))) == rank


def test_tr_bad_specs_are_value_errors_naming_the_valid_range():
    spec = ConvSpec.create(8, 12, 3)
    with pytest.raises(ValueError, match=r"ra\*rb=9 must be <= C=8"):
        TR.normalize_rank(spec, 3)
    with pytest.raises(ValueError, match=r"ra\*re=14 must be <= F=12"):
        TR.normalize_rank(spec, [2, 2, 7])
    with pytest.raises(ValueError, match=r"re=19 must be <= kh\*kw\*rb=9"):
        TR.normalize_rank(spec, [1, 1, 19])
    for bad in ([1, 2], [1, True, 1], "3", [1.5, 1, 1]):
        with pytest.raises(ValueError, match="tr rank"):
            TR.normalize_rank(spec, bad)


def test_tr_non_square_ranks_and_als_refinement():
    conv = _conv(8, 12, 3, padding=1)
    layer = ad.decompose_conv(conv, "tr", rank=[2, 3, 5])
    x = torch.randn(1, 8, 7, 7, dtype=torch.float64)
    expected = F.conv2d(x, layer.dense_weight(), layer.bias, padding=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-9, atol=1e-9)
    plain = ad.decompose_conv(conv, "tr", rank=[2, 3, 5], als_iters=0)
    assert _relative_error(layer, conv.weight) < _relative_error(plain, conv.weight) < 1


def test_tr_caches_mode_bases_per_weight_and_cores_per_rank():
    conv = _conv(16, 16, 3, padding=1)
    default_cache.clear()
    first = ad.decompose_conv(conv, "tr", rank=[2, 4, 4])
    assert (default_cache.hits, default_cache.misses) == (0, 2)  # mode bases, cores
    ad.decompose_conv(conv, "tr", rank=[3, 4, 4])
    assert (default_cache.hits, default_cache.misses) == (1, 3)  # bases reused
    again = ad.decompose_conv(conv, "tr", rank=[2, 4, 4])
    assert (default_cache.hits, default_cache.misses) == (2, 3)  # cores only: no bases lookup
    torch.testing.assert_close(first.dense_weight(), again.dense_weight(), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["tt", "tr"])
def test_non_finite_kernels_raise_a_decomposition_error(method):
    conv = _conv(8, 12, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ad.DecompositionError, match="NaN or inf"):
        ad.decompose_conv(conv, method, ratio=0.3)
