"""The `cp` (Lebedev 4-stage) and `pdp` (pointwise-depthwise-pointwise) methods."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autodecomp as ad
from autodecomp.decompositions import ConvSpec, DecompositionError, get_method
from autodecomp.factorize import FactorCache, default_cache


def conv(cin=8, cout=12, k=3, seed=0, **kwargs) -> nn.Conv2d:
    torch.manual_seed(seed)
    layer = nn.Conv2d(cin, cout, k, **kwargs).double()
    with torch.no_grad():
        layer.weight.normal_()
    return layer


def rel_err(layer, dense: nn.Conv2d) -> float:
    with torch.no_grad():
        return float((layer.dense_weight() - dense.weight).norm() / dense.weight.norm())


def test_cp_dense_weight_is_the_sum_of_rank_one_kernels():
    spec = ConvSpec.create(5, 7, (3, 2))
    layer = get_method("cp").random(spec, 4, torch.Generator().manual_seed(0)).double()
    first = layer.first.weight[:, :, 0, 0]  # (R, C)
    vertical = layer.vertical.weight[:, 0, :, 0]  # (R, kh)
    horizontal = layer.horizontal.weight[:, 0, 0, :]  # (R, kw)
    last = layer.last.weight[:, :, 0, 0]  # (F, R)
    expected = sum(
        last[:, r, None, None, None]
        * first[r, None, :, None, None]
        * vertical[r, None, None, :, None]
        * horizontal[r, None, None, None, :]
        for r in range(4)
    )
    torch.testing.assert_close(layer.dense_weight(), expected, rtol=1e-13, atol=1e-13)


def test_pdp_dense_weight_is_the_sum_of_rank_one_kernels():
    spec = ConvSpec.create(5, 7, (3, 2))
    layer = get_method("pdp").random(spec, 4, torch.Generator().manual_seed(0)).double()
    first, depthwise = layer.first.weight[:, :, 0, 0], layer.depthwise.weight[:, 0]
    last = layer.last.weight[:, :, 0, 0]
    expected = sum(
        last[:, r, None, None, None] * first[r, None, :, None, None] * depthwise[r]
        for r in range(4)
    )
    torch.testing.assert_close(layer.dense_weight(), expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(("method", "params"), [("cp", 5 * (8 + 3 + 5 + 12)), ("pdp", 5 * 35)])
def test_structure_and_parameter_formula(method, params):
    dense = conv(k=(3, 5), padding=(1, 2), stride=2, bias=False)
    layer = ad.decompose_conv(dense, method, rank=5)
    assert layer.params() == params == sum(p.numel() for p in layer.parameters())
    if method == "cp":
        assert layer.vertical.groups == layer.horizontal.groups == 5
        assert layer.vertical.stride == (2, 1) and layer.horizontal.stride == (1, 2)
        assert layer.vertical.padding == (1, 0) and layer.horizontal.padding == (0, 2)
    else:
        assert layer.depthwise.groups == 5 and layer.depthwise.stride == (2, 2)


def test_pdp_recovers_a_kernel_of_4d_cp_rank_r():
    # a 4D CP of rank R is also a 3-way CP of (F, C, kh*kw) of rank <= R
    spec = ConvSpec.create(8, 12, 3)
    truth = get_method("cp").random(spec, 6, torch.Generator().manual_seed(1)).double()
    dense = conv()
    with torch.no_grad():
        dense.weight.copy_(truth.dense_weight())
    assert rel_err(ad.decompose_conv(dense, "pdp", rank=6), dense) < 1e-6
    assert rel_err(ad.decompose_conv(dense, "cp", rank=6), dense) < 1e-6


@pytest.mark.parametrize("method", ["cp", "pdp"])
def test_one_by_one_conv_gets_the_optimal_low_rank_matrix(method):
    dense = conv(cin=10, cout=6, k=1)
    s = torch.linalg.svdvals(dense.weight.detach()[:, :, 0, 0])
    for rank in (1, 4, 6):
        layer = ad.decompose_conv(dense, method, rank=rank)
        assert rel_err(layer, dense) == pytest.approx(float(s[rank:].norm() / s.norm()), abs=1e-12)
    with pytest.raises(ValueError, match=r"range \[1, 6\]"):
        ad.decompose_conv(dense, method, rank=7)


@pytest.mark.parametrize("method", ["cp", "pdp"])
def test_factor_norms_are_balanced_across_stages(method):
    layer = ad.decompose_conv(conv(), method, rank=5)
    stages = [layer.first.weight.flatten(1), layer.last.weight.flatten(1).T]
    if method == "cp":
        stages += [layer.vertical.weight.flatten(1), layer.horizontal.weight.flatten(1)]
    else:
        stages.append(layer.depthwise.weight.flatten(1))
    norms = torch.stack([w.norm(dim=1) for w in stages])  # (stages, R)
    torch.testing.assert_close(norms, norms[:1].expand_as(norms), rtol=1e-10, atol=0)


@pytest.mark.parametrize("method", ["cp", "pdp"])
def test_repeat_decomposition_hits_the_cache(method):
    dense = conv(seed=3)
    cache = FactorCache()
    first = ad.decompose_conv(dense, method, rank=4, cache=cache)
    assert (cache.hits, cache.misses) == (0, 1)
    again = ad.decompose_conv(dense, method, rank=4, cache=cache)
    assert (cache.hits, cache.misses) == (1, 1)
    for a, b in zip(first.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)
    ad.decompose_conv(dense, method, rank=5, cache=cache)  # another rank: computed
    ad.decompose_conv(dense, method, rank=4, cache=cache, seed=1)  # other options: computed
    assert (cache.hits, cache.misses) == (1, 3)


def test_cp_and_pdp_share_the_default_cache_without_colliding():
    dense = conv(seed=4)
    hits, misses = default_cache.hits, default_cache.misses
    cp = ad.decompose_conv(dense, "cp", rank=3)
    pdp = ad.decompose_conv(dense, "pdp", rank=3)
    ad.decompose_conv(dense, "cp", rank=3)
    assert (default_cache.hits - hits, default_cache.misses - misses) == (1, 2)
    assert isinstance(cp, get_method("cp")) and isinstance(pdp, get_method("pdp"))


@pytest.mark.parametrize("method", ["cp", "pdp"])
def test_decomposition_is_deterministic(method):
    dense = conv(seed=5)
    a = ad.decompose_conv(dense, method, rank=7, cache=FactorCache())
    b = ad.decompose_conv(dense, method, rank=7, cache=FactorCache())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("method", ["cp", "pdp"])
def test_float32_layer_keeps_its_dtype(method):
    dense = conv(seed=6).float()
    layer = ad.decompose_conv(dense, method, rank=6)
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    x = torch.randn(2, 8, 9, 9)
    assert layer(x).shape == dense(x).shape


@pytest.mark.parametrize("method", ["cp", "pdp"])
def test_nan_weight_raises_a_decomposition_error(method):
    dense = conv(seed=7)
    with torch.no_grad():
        dense.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(DecompositionError, match="NaN"):
        ad.decompose_conv(dense, method, rank=3, cache=FactorCache())


@pytest.mark.parametrize("method", ["cp", "pdp"])
def test_rank_validation(method):
    dense = conv()  # (12, 8, 3, 3): max rank 8*3*3 = 72 (cp) and 8*9 = 72 (pdp)
    for bad in (0, 73, True, 2.0, (3,)):
        with pytest.raises(ValueError, match=r"must be an int in the range \[1, 72\]"):
            ad.decompose_conv(dense, method, rank=bad)
    with pytest.raises(ValueError, match=r"unknown (cp|pdp) option"):
        ad.decompose_conv(dense, method, rank=3, iters=5)
    assert list(get_method(method).rank_candidates(ConvSpec.from_conv(dense))) == list(range(1, 73))
