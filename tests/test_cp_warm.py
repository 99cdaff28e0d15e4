"""Search-precision CP fits, deterministic warm starts from anchor ranks, full-precision polish."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autodecomp as ad
from autodecomp.factorize.cache import FactorCache
from autodecomp.factorize.cp_als import cp_als, cp_to_tensor
from autodecomp.factorize.cp_warm import (
    PRECISIONS,
    SEARCH_TOL,
    WARM_ABOVE_CAP,
    anchor_rank,
    check_precision,
    fit_cp,
    warm_start,
)


def trained_like(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A decaying-weight rank-40 signal plus 30 % noise: no exact low-rank fit, as trained
    kernels at search ratios (relative errors 0.3-0.8)."""
    gen = torch.Generator().manual_seed(seed)
    terms = 40
    factors = [torch.randn(s, terms, generator=gen, dtype=torch.float64) for s in shape]
    signal = cp_to_tensor(torch.exp(-torch.arange(terms, dtype=torch.float64) / 8), factors)
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    return signal / signal.norm() + 0.3 * noise / noise.norm()


def relative_error(factors: list[torch.Tensor], x: torch.Tensor) -> float:
    ones = factors[0].new_ones(factors[0].shape[1])
    return float((cp_to_tensor(ones, factors) - x).norm() / x.norm())


def fit(x, rank, cache=None, **kwargs):
    return fit_cp(x, rank, cache=cache or FactorCache(), key="t", **kwargs)


# ---- the stopping rule -----------------------------------------------------------------------
def test_search_precision_stops_at_the_first_small_gain_and_full_goes_on():
    x = trained_like((24, 20, 9))
    errors: list[float] = []
    cp_als(x, 12, tol=0.0, max_iter=300, rescue=False, callback=lambda _, e: errors.append(e))
    expected = next(
        s for s in range(1, len(errors)) if errors[s - 1] - errors[s] < SEARCH_TOL * errors[s - 1]
    )
    search: list[int] = []
    cp_als(x, 12, **PRECISIONS["search"], callback=lambda s, _: search.append(s))
    full: list[int] = []
    cp_als(x, 12, **PRECISIONS["full"], callback=lambda s, _: full.append(s))
    assert len(search) == expected + 1  # the sweep whose gain fell short is the last one
    assert len(full) > len(search) + 5
    assert errors[len(full) - 1] < errors[len(search) - 1]


@pytest.mark.parametrize(
    ("shape", "rank"), [((12, 8, 3, 3), 8), ((12, 8, 9), 6), ((16, 16, 9), 10)]
)
def test_search_precision_still_recovers_exact_rank_tensors(shape, rank):
    gen = torch.Generator().manual_seed(1)
    factors = [torch.randn(s, rank, generator=gen, dtype=torch.float64) for s in shape]
    x = cp_to_tensor(torch.ones(rank, dtype=torch.float64), factors)
    assert relative_error(fit(x, rank), x) < 1e-10


def test_search_precision_rescues_a_swamp_close_to_exact():
    """An exact rank-8 (12, 8, 9) tensor on which ALS stalls at 0.104: the search precision's
    Levenberg-Marquardt polish (no random restarts) still recovers it."""
    gen = torch.Generator().manual_seed(32)
    a, b, c = (torch.randn(s, 8, generator=gen, dtype=torch.float64) for s in (12, 8, 9))
    x = cp_to_tensor(torch.ones(8, dtype=torch.float64), [a, b, c])
    stalled = cp_als(x, 8, **(PRECISIONS["search"] | {"rescue": False}))[2]
    assert stalled == pytest.approx(0.1041, abs=1e-4)
    assert cp_als(x, 8, **PRECISIONS["search"])[2] < 1e-12
    assert relative_error(fit(x, 8), x) < 1e-12


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown CP precision 'fast'; valid: search, full"):
        check_precision("fast")
    conv = nn.Conv2d(4, 6, 3)
    with pytest.raises(ValueError, match="'fast'; valid: search, full"):
        ad.decompose_conv(conv, "cp", rank=3, precision="fast")
    with pytest.raises(ValueError, match="warm must be true or false"):
        ad.decompose_conv(conv, "pdp", rank=3, warm="yes")


# ---- anchors and warm starts ------------------------------------------------------------------
def test_anchor_ranks_form_a_fixed_geometric_ladder():
    assert [anchor_rank(r, 1000) for r in (1, 5, 8, 9, 10, 13, 14, 40, 54, 55)] == [
        1, 5, 8, 8, 11, 11, 16, 45, 64, 64,
    ]  # fmt: skip
    ladder = {anchor_rank(r, 1000) for r in range(1, 1001)}
    assert all(anchor_rank(a, 1000) == a for a in ladder)
    assert anchor_rank(60, 50) == 45  # the largest anchor within the rank limit
    assert anchor_rank(50, 50) == 45


def test_warm_start_drops_the_weakest_or_grows_from_the_residual():
    x = trained_like((10, 9, 8))
    base = fit(x, 6, warm=False)
    scales = torch.stack([f.norm(dim=0) for f in base]).prod(dim=0)
    dropped = warm_start(x, base, 4)
    kept = torch.argsort(scales, descending=True)[:4]
    assert all(torch.equal(d, f[:, kept]) for d, f in zip(dropped, base, strict=True))
    grown = warm_start(x, base, 9)
    assert [tuple(g.shape) for g in grown] == [(10, 9), (9, 9), (8, 9)]
    assert all(torch.equal(g[:, :6], f) for g, f in zip(grown, base, strict=True))
    assert relative_error(grown, x) < relative_error(base, x)  # the new components fit residue


def test_a_rank_gets_the_same_factors_whatever_was_fitted_before(tmp_path):
    x = trained_like((20, 18, 9))
    rank = 13  # anchor 11: a warm fit
    assert anchor_rank(rank, 162) == 11
    alone = fit(x, rank)
    busy = FactorCache()
    for other in (9, 11, 16, 20, 12):
        fit(x, other, cache=busy)
    after_others = fit(x, rank, cache=busy)
    shared = FactorCache(directory=tmp_path)  # another worker filled the shared folder
    fit(x, 11, cache=shared)
    from_disk = fit(x, rank, cache=FactorCache(directory=tmp_path))
    for factors in (after_others, from_disk):
        assert all(torch.equal(a, b) for a, b in zip(alone, factors, strict=True))


def test_warm_fits_reach_the_cold_fits_error():
    x = trained_like((32, 28, 9))
    cache = FactorCache()
    ratios = []
    for rank in (10, 13, 14, 19, 20, 25, 27):
        assert anchor_rank(rank, 252) != rank
        warm = relative_error(fit(x, rank, cache=cache), x)
        cold = relative_error(fit(x, rank, warm=False), x)
        ratios.append(warm / cold)
    assert max(ratios) < 1.03  # a cold fit's own stopping point varies by about as much
    assert sum(ratios) / len(ratios) < 1.001


def test_full_precision_polishes_the_search_fit():
    x = trained_like((24, 20, 9))
    cache = FactorCache()
    search = relative_error(fit(x, 14, cache=cache), x)
    full = relative_error(fit(x, 14, cache=cache, precision="full"), x)
    cold_full = cp_als(x, 14)[2]
    assert full <= search
    assert full <= cold_full * 1.001


def test_large_problems_are_fitted_cold_without_an_anchor(monkeypatch):
    """Where a cold fit's sweep cap is at most WARM_ABOVE_CAP, warm and cold are the same
    single fit (an anchor would cost a second fit and save no sweeps)."""
    import autodecomp.factorize.cp_als as cp_als_module
    import autodecomp.factorize.cp_warm as cp_warm_module

    x, rank = trained_like((20, 18, 9)), 13
    calls: list[int] = []
    single: list[bool] = []

    def counted(*args, **kwargs):
        calls.append(args[1])
        single.append(kwargs.get("single_contractions", False))
        return cp_als(*args, **kwargs)

    monkeypatch.setattr(cp_warm_module, "cp_als", counted)
    fit(x, rank)
    assert calls == [11, 13]  # small: the anchor 11, then the warm fit
    per_sweep = 4 * x.numel() * rank
    for cap, fits in ((WARM_ABOVE_CAP + 1, [11, 13]), (WARM_ABOVE_CAP, [13])):
        monkeypatch.setattr(cp_als_module, "_SWEEP_FLOPS", per_sweep * cap)
        assert cp_als_module.default_max_iter(x.numel(), rank) == cap
        calls.clear()
        single.clear()
        warm = fit(x, rank)
        assert calls == fits
        assert single == [len(fits) == 1] * len(fits)  # large fits contract in float32
    cold = fit(x, rank, warm=False)
    assert all(torch.equal(a, b) for a, b in zip(warm, cold, strict=True))
