"""The torch CP-ALS solver: exact recovery, output conventions, guards, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from autodecomp.decompositions import DecompositionError
from autodecomp.factorize.cp_als import cp_als, cp_to_tensor


def exact_cp(shape: tuple[int, ...], rank: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    factors = [torch.randn(s, rank, generator=gen, dtype=torch.float64) for s in shape]
    return cp_to_tensor(torch.ones(rank, dtype=torch.float64), factors)


def border_rank_tensor(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """``sum_k a o .. o b (k-th mode) o .. o a``: rank N, but limit of rank-2 tensors."""
    gen = torch.Generator().manual_seed(seed)
    pairs = [torch.randn(2, n, generator=gen, dtype=torch.float64) for n in shape]
    out = torch.zeros(shape, dtype=torch.float64)
    for k in range(len(shape)):
        term = torch.ones((), dtype=torch.float64)
        for n, (a, b) in enumerate(pairs):
            term = torch.tensordot(term, b if n == k else a, dims=0)
        out += term
    return out


@pytest.mark.parametrize(
    ("shape", "rank"),
    [((12, 8, 3, 3), 8), ((12, 8, 9), 6), ((12, 8, 3, 3), 9), ((12, 8, 25), 15)],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_rank_tensor_is_recovered(shape, rank, seed):
    x = exact_cp(shape, rank, seed)
    weights, factors, err = cp_als(x, rank)
    assert err < 1e-6
    recon = cp_to_tensor(weights, factors)
    assert float((recon - x).norm() / x.norm()) == pytest.approx(err, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("seed", [2, 3])
def test_swamp_cases_with_rank_above_every_mode_are_recovered(seed):
    # seeds where plain ALS stalls for hundreds of sweeps (rank 23 > 12, 8, 5, 5)
    x = exact_cp((12, 8, 5, 5), 23, seed)
    assert cp_als(x, 23)[2] < 1e-6


def test_cp_to_tensor_matches_outer_products():
    gen = torch.Generator().manual_seed(0)
    factors = [torch.randn(s, 3, generator=gen, dtype=torch.float64) for s in (4, 3, 2, 5)]
    weights = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    expected = torch.einsum("r,ir,jr,kr,lr->ijkl", weights, *factors)
    torch.testing.assert_close(cp_to_tensor(weights, factors), expected, rtol=1e-13, atol=1e-13)


def test_balanced_and_normalised_outputs_describe_the_same_tensor():
    x = exact_cp((10, 6, 3, 3), 4, seed=5) + 0.01 * torch.randn(10, 6, 3, 3, dtype=torch.float64)
    ones, balanced, err_b = cp_als(x, 4)
    weights, unit, err_u = cp_als(x, 4, balance=False)
    assert err_b == err_u
    assert torch.equal(ones, torch.ones(4, dtype=torch.float64))
    norms = torch.stack([f.norm(dim=0) for f in balanced])  # (modes, rank)
    torch.testing.assert_close(norms, norms[:1].expand_as(norms), rtol=1e-12, atol=0)
    torch.testing.assert_close(norms.prod(dim=0), weights, rtol=1e-12, atol=0)
    for f in unit:
        torch.testing.assert_close(f.norm(dim=0), torch.ones(4, dtype=torch.float64))
    assert bool((weights[:-1] >= weights[1:]).all()), "components are sorted by weight"
    torch.testing.assert_close(cp_to_tensor(ones, balanced), cp_to_tensor(weights, unit))
    assert float((cp_to_tensor(weights, unit) - x).norm() / x.norm()) == pytest.approx(err_u)


def test_matrix_like_tensor_gets_the_truncated_svd():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(12, 8, 1, 1, generator=gen, dtype=torch.float64)
    s = torch.linalg.svdvals(x[:, :, 0, 0])
    for rank in (1, 3, 8):
        weights, factors, err = cp_als(x, rank, balance=False)
        assert [f.shape for f in factors] == [(12, rank), (8, rank), (1, rank), (1, rank)]
        assert err == pytest.approx(float(s[rank:].norm() / s.norm()), abs=1e-14)
        torch.testing.assert_close(weights, s[:rank], rtol=1e-12, atol=1e-12)


def test_zero_tensor_gives_zero_factors():
    weights, factors, err = cp_als(torch.zeros(3, 4, 5), 2)
    assert err == 0.0 and not weights.any() and not any(f.any() for f in factors)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises(bad):
    x = exact_cp((5, 4, 3), 2, seed=0)
    x[1, 2, 0] = bad
    with pytest.raises(DecompositionError, match="NaN or Inf"):
        cp_als(x, 2)


def test_diverging_cancelling_components_raise_a_clear_error():
    x = border_rank_tensor((6, 5, 4))
    with pytest.raises(DecompositionError, match=r"degenerate.*congruence -0\.9\d+.*lower rank"):
        cp_als(x, 2, max_spread=3.0)


def test_border_rank_tensor_stays_bounded_under_default_guard():
    x = border_rank_tensor((6, 5, 4))
    weights, _, err = cp_als(x, 2, balance=False)
    assert err < 1e-2  # the infimum is 0, approached only by diverging components
    assert float(weights.norm() / x.norm()) < 1e3


def test_exact_fit_passes_a_tight_degeneracy_guard():
    x = exact_cp((8, 6, 5), 3, seed=1)
    assert cp_als(x, 3, max_spread=3.0)[2] < 1e-6


def test_same_seed_is_deterministic_and_seeds_matter():
    x = torch.randn(10, 7, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    first = cp_als(x, 5, init="random", seed=11)
    again = cp_als(x, 5, init="random", seed=11)
    other = cp_als(x, 5, init="random", seed=12)
    assert first[2] == again[2]
    assert all(torch.equal(a, b) for a, b in zip(first[1], again[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first[1], other[1], strict=True))


def test_float32_input_is_solved_in_float64():
    x = exact_cp((9, 7, 4), 3, seed=3).float()
    weights, factors, err = cp_als(x, 3)
    assert weights.dtype == torch.float64 and all(f.dtype == torch.float64 for f in factors)
    assert err < 1e-6


@pytest.mark.parametrize("rank", [0, -2, 2.5, True, "3"])
def test_bad_rank_is_a_value_error(rank):
    with pytest.raises(ValueError, match="rank"):
        cp_als(torch.ones(3, 3, 3), rank)


def test_bad_options_are_value_errors():
    with pytest.raises(ValueError, match="init"):
        cp_als(torch.ones(3, 3, 3), 2, init="hosvd")
    with pytest.raises(ValueError, match="max_iter"):
        cp_als(torch.ones(3, 3, 3), 2, max_iter=0)


def test_sweep_cap_follows_max_iter():
    x = torch.randn(16, 12, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = [cp_als(x, 20, max_iter=n, tol=0.0, rescue=False)[2] for n in (1, 3, 30)]
    assert errors[0] > errors[1] > errors[2]
    assert math.isfinite(errors[2])


@pytest.mark.parametrize("shape", [(24, 20, 9), (12, 10, 3, 3)])
def test_single_precision_contractions_follow_the_double_precision_fit(shape):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    errors = {}
    for single in (False, True):
        weights, factors, err = cp_als(x, 30, max_iter=20, tol=0.0, single_contractions=single)
        assert factors[0].dtype == torch.float64
        truth = float(torch.linalg.vector_norm(cp_to_tensor(weights, factors) - x) / x.norm())
        assert err == pytest.approx(truth, rel=1e-9)
        errors[single] = err
    assert 0.1 < errors[False] < 0.9
    assert errors[True] == pytest.approx(errors[False], rel=1e-5)
