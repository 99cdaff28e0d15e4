"""Data-aware initialisation: calibration statistics, whitened factorisations, refinement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autodecomp as ad
from autodecomp.compress.calibration import collect_input_stats
from autodecomp.compress.surgery import data_init_layers
from autodecomp.decompositions import ConvSpec, DecompositionError, get_method
from autodecomp.factorize import FactorCache
from autodecomp.factorize.input_stats import InputStats

METHODS = ad.methods()
C, F_OUT, HW = 8, 12, (9, 9)


def _conv(cin=C, cout=F_OUT, k=3, **kw) -> nn.Conv2d:
    torch.manual_seed(5)
    conv = nn.Conv2d(cin, cout, k, **kw).double()
    with torch.no_grad():
        conv.weight.normal_()
    return conv


def _inputs(n: int, seed: int, channels: int = C, dims: int = 2, noise: float = 0.01):
    """Inputs living near a ``dims``-dimensional channel subspace (strongly anisotropic)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(channels, dims, generator=torch.Generator().manual_seed(99)).double()
    z = torch.randn(n, dims, *HW, generator=gen).double()
    x = torch.einsum("cr,nrhw->nchw", mix, z)
    return x + noise * torch.randn(x.shape, generator=gen).double()


def _stats(conv: nn.Conv2d, *batches: torch.Tensor) -> InputStats:
    return collect_input_stats(nn.Sequential(conv), ["0"], batches)["0"]


def _rel_output_error(stats: InputStats, layer, conv) -> float:
    delta = layer.dense_weight().detach() - conv.weight
    return (stats.output_error(delta) / stats.output_error(conv.weight)) ** 0.5


@pytest.mark.parametrize(
    "kw",
    [
        {"padding": 1},
        {"stride": 2, "padding": 2, "dilation": 2, "bias": False},
        {"padding": "same", "k": 4},
    ],
    ids=["3x3", "s2-dil2", "same-even"],
)
def test_output_error_formula_equals_measured_output_change(kw):
    kw = dict(kw)
    conv = _conv(k=kw.pop("k", 3), **kw)
    batches = [_inputs(5, 1, noise=1.0), _inputs(3, 2, noise=1.0)]
    stats = _stats(conv, *batches)
    assert stats.samples == 8 and stats.moment.shape == (C * conv.kernel_size[0] ** 2,) * 2
    delta = torch.randn(conv.weight.shape, dtype=torch.float64)
    spec = ConvSpec.from_conv(conv)
    x = torch.cat(batches)
    measured = spec.dense_forward(x, delta, None).square().sum() / len(x)
    bias = conv.bias
    changed = spec.dense_forward(x, conv.weight + delta, bias) - conv(x)
    assert stats.output_error(delta) == pytest.approx(float(measured), rel=1e-10)
    assert float(changed.square().sum() / len(x)) == pytest.approx(float(measured), rel=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_data_init_lowers_output_error_at_the_same_rank(method):
    conv = _conv(padding=1)
    stats = _stats(conv, _inputs(32, 1))
    held_out = _stats(conv, _inputs(32, 2))
    weight_init = ad.decompose_conv(conv, method, ratio=0.25)
    data_init = ad.decompose_conv(conv, method, ratio=0.25, calibration=stats)
    assert data_init.params() == weight_init.params()
    norms = [float(p.norm()) for n, p in data_init.named_parameters() if n != "bias"]
    assert max(norms) < (1 + 1e-9) * min(norms), f"{method}: factors not balanced: {norms}"
    for s in (stats, held_out):
        data, weight = (
            _rel_output_error(s, data_init, conv),
            _rel_output_error(s, weight_init, conv),
        )
        assert data < 0.9 * weight, f"{method}: data {data:.4f} vs weight {weight:.4f}"


@pytest.mark.parametrize("method", METHODS)
def test_both_inits_are_exact_at_exact_rank(method):
    conv = _conv(padding=1)
    spec = ConvSpec.from_conv(conv)
    cls = get_method(method)
    rank = cls.rank_for_ratio(spec, 0.3)
    truth = cls.random(spec, rank, torch.Generator().manual_seed(3)).double()
    with torch.no_grad():
        conv.weight.copy_(truth.dense_weight())
    stats = _stats(conv, _inputs(16, 1, noise=0.1))
    for calibration in (None, stats):
        layer = ad.decompose_conv(conv, method, rank=rank, calibration=calibration)
        err = (layer.dense_weight() - conv.weight).norm() / conv.weight.norm()
        assert err < 1e-4, f"{method} ({'data' if calibration else 'weight'}): {err:.2e}"


def _tail(matrix: torch.Tensor, keep: int) -> float:
    return float(torch.linalg.svdvals(matrix)[keep:].square().sum())


def test_whitened_tucker_is_optimal_on_a_1x1_conv():
    conv = _conv(k=1)
    stats = _stats(conv, _inputs(16, 1, dims=3, noise=0.05))
    factor = torch.linalg.cholesky(stats.moment)
    optimum = _tail(conv.weight[:, :, 0, 0] @ factor, 3)
    layer = ad.decompose_conv(conv, "tucker", rank=3, calibration=stats, damping=0.0)
    error = stats.output_error(layer.dense_weight().detach() - conv.weight)
    assert error == pytest.approx(optimum, rel=1e-6)
    plain = ad.decompose_conv(conv, "tucker", rank=3)
    assert stats.output_error(plain.dense_weight().detach() - conv.weight) > 1.5 * optimum


def test_whitened_tucker_output_mode_is_optimal_for_any_statistics():
    conv = _conv(padding=1)
    stats = _stats(conv, _inputs(16, 1, dims=3, noise=0.05))
    factor = torch.linalg.cholesky(stats.moment)
    optimum = _tail(conv.weight.reshape(F_OUT, -1) @ factor, 5)
    layer = ad.decompose_conv(
        conv, "tucker", rank=(C, 5), calibration=stats, damping=0.0, refine_steps=0
    )
    error = stats.output_error(layer.dense_weight().detach() - conv.weight)
    assert error == pytest.approx(optimum, rel=1e-6)


def test_whitened_tucker_input_mode_is_optimal_without_spatial_correlation():
    conv = _conv(padding=1)
    spec = ConvSpec.from_conv(conv)
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(C, C, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, C)
    channel = a @ a.T
    stats = InputStats(torch.kron(channel, torch.eye(9, dtype=torch.float64)), 1, spec)
    factor = torch.linalg.cholesky(channel)
    whitened = torch.einsum("fcs,cd->dfs", conv.weight.reshape(F_OUT, C, 9), factor)
    optimum = _tail(whitened.reshape(C, -1), 3)
    layer = ad.decompose_conv(
        conv, "tucker", rank=(3, F_OUT), calibration=stats, damping=0.0, refine_steps=0
    )
    error = stats.output_error(layer.dense_weight().detach() - conv.weight)
    assert error == pytest.approx(optimum, rel=1e-6)


def test_refinement_is_cached_per_weight_statistics_and_rank():
    conv = _conv(padding=1)
    stats = _stats(conv, _inputs(8, 1))
    cache = FactorCache()
    first = ad.decompose_conv(conv, "tt", ratio=0.25, calibration=stats, cache=cache)
    misses = cache.misses
    again = ad.decompose_conv(conv, "tt", ratio=0.25, calibration=stats, cache=cache)
    assert cache.misses == misses and cache.hits >= 1
    torch.testing.assert_close(again.dense_weight(), first.dense_weight(), rtol=0, atol=0)
    other = _stats(conv, _inputs(8, 2))
    ad.decompose_conv(conv, "tt", ratio=0.25, calibration=other, cache=cache)
    assert cache.misses > misses


def test_apply_plan_data_init_and_its_errors():
    model = nn.Sequential(_conv(padding=1), nn.ReLU(), _conv(F_OUT, C, padding=1))
    stats = collect_input_stats(model, ["0", "2"], [_inputs(8, 1)])
    plan = {
        "0": {"method": "tucker", "ratio": 0.3, "init": "data"},
        "2": {"method": "cp", "rank": 3},
    }
    assert data_init_layers(plan) == ["0"]
    small = ad.apply_plan(model, plan, calibration=stats)
    expected = ad.decompose_conv(model[0], "tucker", ratio=0.3, calibration=stats["0"])
    torch.testing.assert_close(small[0].dense_weight(), expected.dense_weight())
    weight_only = ad.decompose_conv(model[2], "cp", rank=3)
    torch.testing.assert_close(small[2].dense_weight(), weight_only.dense_weight())
    with pytest.raises(ValueError, match=r"layer '0': init 'data' needs its calibration"):
        ad.apply_plan(model, plan)
    with pytest.raises(ValueError, match=r"unknown init 'svd'; valid: weight, data"):
        ad.apply_plan(model, {"0": {"method": "tucker", "ratio": 0.3, "init": "svd"}})
    with pytest.raises(ValueError, match="geometry"):
        ad.decompose_conv(model[2], "tucker", ratio=0.3, calibration=stats["0"])


def test_singular_statistics_need_damping_and_layers_must_be_convs():
    conv = _conv(padding=1)
    stats = _stats(conv, _inputs(4, 1, noise=0.0))
    with pytest.raises(DecompositionError, match="damping"):
        ad.decompose_conv(conv, "tucker", rank=2, calibration=stats, damping=0.0)
    with pytest.raises(ValueError, match="refine_steps"):
        ad.decompose_conv(conv, "tucker", rank=2, calibration=stats, refine_steps=-1)
    with pytest.raises(ValueError, match=r"'1' is not an nn.Conv2d"):
        collect_input_stats(nn.Sequential(conv, nn.ReLU()), ["1"], [_inputs(2, 1)])


def test_without_whitening_the_refinement_starts_from_the_weight_init():
    conv = _conv(padding=1)
    stats = _stats(conv, _inputs(8, 1))
    plain = ad.decompose_conv(conv, "cp", rank=4)
    start = ad.decompose_conv(conv, "cp", rank=4, calibration=stats, whiten=False, refine_steps=0)
    torch.testing.assert_close(start.dense_weight(), plain.dense_weight(), rtol=1e-12, atol=1e-12)
    refined = ad.decompose_conv(conv, "cp", rank=4, calibration=stats, whiten=False)
    assert _rel_output_error(stats, refined, conv) < 0.9 * _rel_output_error(stats, plain, conv)
