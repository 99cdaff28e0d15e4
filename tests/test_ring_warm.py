"""Tensor-ring warm starts: anchors, bond resizing, determinism, exactness."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autodecomp as ad
from autodecomp.factorize.cache import FactorCache
from autodecomp.factorize.ring_warm import fit_ring, resize_ring, ring_anchor, ring_problems
from autodecomp.factorize.tensor_train import ring_tensor


def _ring(ranks, c=12, s=9, f=16, seed=0):
    ra, rb, re = ranks
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(*shape, generator=gen, dtype=torch.float64)
        for shape in ((ra, c, rb), (rb, s, re), (re, f, ra))
    )


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_anchors_follow_the_ladder_within_the_ring_bounds():
    shape = (256, 9, 256)
    assert ring_anchor(shape, (8, 8, 8)) == (8, 8, 8)  # every bond <= 8: its own anchor
    assert ring_anchor(shape, (10, 10, 10)) == (11, 11, 11)
    assert ring_anchor(shape, (13, 12, 12)) == (11, 11, 11)
    assert ring_anchor(shape, (14, 13, 13)) == (16, 11, 11)
    assert ring_anchor(shape, (7, 36, 36)) == (7, 32, 32)
    assert ring_anchor(shape, (6, 42, 42)) == (6, 42, 42)  # 45 clipped to 256 // 6
    assert ring_anchor((64, 9, 128), (6, 10, 20)) == (6, 10, 21)  # F // ra = 21
    assert ring_anchor((16, 1, 16), (1, 12, 12)) == (1, 11, 11)
    assert ring_anchor((10, 1, 16), (1, 10, 10)) == (1, 10, 10)  # (1, 8, 11): re > S*rb


def test_ring_problems_name_the_broken_bound():
    assert ring_problems((12, 9, 16), (2, 6, 8)) == []
    assert ring_problems((12, 9, 16), (2, 7, 8)) == ["ra*rb=14 must be <= C=12"]
    assert ring_problems((12, 1, 16), (1, 2, 3)) == ["re=3 must be <= kh*kw*rb=2"]


def test_resizing_a_ring_up_changes_its_tensor_by_little_and_back_down_restores_it():
    cores = _ring((2, 3, 4))
    truth = ring_tensor(*cores)
    grown = resize_ring(cores, (3, 5, 6), seed=1)
    assert [tuple(x.shape) for x in grown] == [(3, 12, 5), (5, 9, 6), (6, 16, 3)]
    assert 0 < _relative(ring_tensor(*grown), truth) < 1e-4
    back = resize_ring(grown, (2, 3, 4))
    assert _relative(ring_tensor(*back), truth) < 1e-4


def test_truncating_a_padded_ring_recovers_it_exactly():
    cores = _ring((2, 3, 3))
    u, k, v = cores  # the same ring with one zero slice more on each bond
    padded = (
        torch.zeros(3, 12, 4, dtype=torch.float64),
        torch.zeros(4, 9, 4, dtype=torch.float64),
        torch.zeros(4, 16, 3, dtype=torch.float64),
    )
    padded[0][:2, :, :3], padded[1][:3, :, :3], padded[2][:3, :, :2] = u, k, v
    truncated = resize_ring(padded, (2, 3, 3))
    assert _relative(ring_tensor(*truncated), ring_tensor(*cores)) < 1e-12


def _trained_like_conv(cin=16, cout=16, seed=3) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, padding=1).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # decaying spectrum: not an exact ring of any small rank
        base = torch.randn(cout, cin * 9, generator=gen, dtype=torch.float64)
        scale = torch.logspace(0, -2, cin * 9, dtype=torch.float64)
        conv.weight.copy_((base * scale).reshape(cout, cin, 3, 3))
    return conv


def test_a_warm_fit_does_not_depend_on_what_was_fitted_before():
    conv = _trained_like_conv()
    alone = ad.decompose_conv(conv, "tr", rank=[2, 7, 7], warm=True, cache=FactorCache())
    cache = FactorCache()
    for rank in ([2, 6, 6], [3, 5, 5], [2, 8, 8]):
        ad.decompose_conv(conv, "tr", rank=rank, warm=True, cache=cache)
    after = ad.decompose_conv(conv, "tr", rank=[2, 7, 7], warm=True, cache=cache)
    torch.testing.assert_close(after.dense_weight(), alone.dense_weight(), rtol=0, atol=0)


def test_a_warm_fit_starts_from_its_anchor_and_shares_the_anchors_cold_fit():
    conv = _trained_like_conv()
    cache = FactorCache()
    assert ring_anchor((16, 9, 16), (1, 10, 10)) == (1, 11, 11)
    anchor = ad.decompose_conv(conv, "tr", rank=[1, 11, 11], cache=cache)  # cold
    assert cache.misses == 2  # bases, cores
    warm = ad.decompose_conv(conv, "tr", rank=[1, 10, 10], warm=True, cache=cache)
    assert (cache.hits, cache.misses) == (2, 3)  # anchor and bases found; the warm fit new
    cold = ad.decompose_conv(conv, "tr", rank=[1, 10, 10], cache=cache)
    errors = [_relative(x.dense_weight(), conv.weight) for x in (anchor, warm, cold)]
    assert errors[0] < errors[1] < 1 and errors[1] == pytest.approx(errors[2], rel=0.02)


def test_a_warm_fit_of_an_exact_ring_is_exact():
    conv = nn.Conv2d(16, 16, 3, padding=1).double()
    truth = ring_tensor(*_ring((1, 10, 10), c=16, f=16, seed=5))  # (C, S, F)
    with torch.no_grad():
        conv.weight.copy_(truth.permute(2, 0, 1).reshape(16, 16, 3, 3))
    layer = ad.decompose_conv(conv, "tr", rank=[1, 10, 10], warm=True, cache=FactorCache())
    assert _relative(layer.dense_weight(), conv.weight) < 1e-9


def test_fit_ring_builds_nothing_for_a_cached_rank():
    cache = FactorCache()
    t = ring_tensor(*_ring((1, 4, 4), c=8, f=8))
    calls = []

    def tensor():
        calls.append("tensor")
        return t

    def bases():
        from autodecomp.decompositions.tr import _mode_bases

        calls.append("bases")
        return _mode_bases(t)

    first = fit_ring(tensor, t.shape, (1, 4, 4), bases, cache=cache, key="k")
    count = len(calls)
    again = fit_ring(tensor, t.shape, (1, 4, 4), bases, cache=cache, key="k")
    assert len(calls) == count and all(a is b for a, b in zip(first, again, strict=True))


def test_a_failing_anchor_falls_back_to_the_cold_fit(monkeypatch):
    import autodecomp.factorize.ring_warm as ring_warm

    conv = _trained_like_conv()
    cold = ad.decompose_conv(conv, "tr", rank=[1, 10, 10], cache=FactorCache())
    real_decompose = ring_warm.ring_decompose

    def decompose(t, ranks, bases, **kwargs):
        if tuple(ranks) == (1, 11, 11):  # the anchor
            raise torch.linalg.LinAlgError("singular")
        return real_decompose(t, ranks, bases, **kwargs)

    monkeypatch.setattr(ring_warm, "ring_decompose", decompose)
    warm = ad.decompose_conv(conv, "tr", rank=[1, 10, 10], warm=True, cache=FactorCache())
    torch.testing.assert_close(warm.dense_weight(), cold.dense_weight(), rtol=0, atol=0)
