"""Conformance suite run over every registered method (new methods are covered automatically)."""

from __future__ import annotations

import json

import pytest
import tensorly as tl
import torch
import torch.nn.functional as F
from tensorly.cp_tensor import CPTensor
from tensorly.tr_tensor import TRTensor
from tensorly.tt_tensor import TTTensor
from tensorly.tucker_tensor import TuckerTensor
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import autodecomp as ad
from autodecomp.decompositions import ConvSpec, get_method
from autodecomp.measure.cost import uncounted_ops

# (id, in, out, kernel, stride, padding, dilation, bias, input hw)
GEOMETRIES = [
    ("3x3-s1", 8, 12, 3, 1, 1, 1, True, (9, 9)),
    ("3x3-s2", 8, 12, 3, 2, 1, 1, True, (10, 11)),
    ("5x5-dil2", 8, 12, 5, 1, 4, 2, True, (12, 12)),
    ("1x1", 8, 12, 1, 1, 0, 1, True, (6, 7)),
    ("1x1-s2", 12, 8, 1, 2, 0, 1, False, (7, 7)),
    ("nonsquare", 8, 12, (3, 5), 1, (1, 2), 1, True, (8, 9)),
    ("same-even", 8, 12, 4, 1, "same", 1, True, (8, 8)),
    ("same-3x3", 12, 8, 3, 1, "same", 1, True, (8, 8)),
    ("nobias-s2-dil", 8, 12, 3, 2, 2, 2, False, (11, 11)),
]

METHODS = ad.methods()


def make_conv(geom, dtype=torch.float64) -> nn.Conv2d:
    _, cin, cout, k, s, p, d, bias, _ = geom
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, bias=bias).to(dtype)
    torch.manual_seed(7)
    with torch.no_grad():
        conv.weight.normal_()
        if conv.bias is not None:
            conv.bias.normal_()
    return conv


def supported_or_skip(method: str, spec: ConvSpec) -> None:
    reason = get_method(method).unsupported_reason(spec)
    if reason is not None:
        pytest.skip(f"{method} does not support this geometry: {reason}")


def test_registry_lists_methods():
    assert set(METHODS) >= {"cp", "tucker", "pdp", "tt", "tr"}
    with pytest.raises(ValueError, match="already registered"):
        ad.decompositions.register("tucker")(get_method("tucker"))
    with pytest.raises(ValueError, match=r"unknown decomposition method 'nope'.*tucker"):
        get_method("nope")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_forward_equals_conv_with_dense_weight(method, geom):
    conv = make_conv(geom)
    spec = ConvSpec.from_conv(conv)
    supported_or_skip(method, spec)
    layer = ad.decompose_conv(conv, method, ratio=0.4)
    x = torch.randn(2, conv.in_channels, *geom[-1], dtype=torch.float64)
    bias = layer.bias if layer.bias is not None else None
    expected = F.conv2d(x, layer.dense_weight(), bias, conv.stride, conv.padding, conv.dilation)
    out = layer(x)
    assert out.shape == conv(x).shape
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_macs_and_params_equal_fvcore_and_flop_counter(method, geom):
    conv = make_conv(geom, torch.float32)
    spec = ConvSpec.from_conv(conv)
    supported_or_skip(method, spec)
    layer = ad.decompose_conv(conv, method, ratio=0.3)
    h, w = geom[-1]
    assert layer.params() == ad.count_params(layer)
    assert layer.params() == get_method(method).param_count(spec, layer.rank)
    assert layer.macs(h, w) == ad.count_macs(layer, (conv.in_channels, h, w))
    assert not uncounted_ops(layer, (conv.in_channels, h, w))
    with FlopCounterMode(display=False) as counter:
        layer(torch.zeros(1, conv.in_channels, h, w))
    assert counter.get_total_flops() == 2 * layer.macs(h, w)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("geom", GEOMETRIES[:4], ids=[g[0] for g in GEOMETRIES[:4]])
def test_exact_rank_kernel_is_recovered(method, geom):
    conv = make_conv(geom)
    spec = ConvSpec.from_conv(conv)
    supported_or_skip(method, spec)
    cls = get_method(method)
    rank = cls.rank_for_ratio(spec, 0.3)
    truth = cls.random(spec, rank, torch.Generator().manual_seed(3)).double()
    with torch.no_grad():
        conv.weight.copy_(truth.dense_weight())
    layer = ad.decompose_conv(conv, method, rank=rank)
    err = (layer.dense_weight() - conv.weight).norm() / conv.weight.norm()
    assert err < 1e-4, f"{method} at rank {rank}: relative error {err:.2e}"


@pytest.mark.parametrize("method", METHODS)
def test_error_non_increasing_in_rank(method):
    conv = make_conv(GEOMETRIES[0])
    spec = ConvSpec.from_conv(conv)
    cls = get_method(method)
    ranks = list(cls.rank_candidates(spec))
    picks = [ranks[i] for i in sorted({round(t * (len(ranks) - 1) / 5) for t in range(6)})]
    errors = []
    for rank in picks:
        layer = ad.decompose_conv(conv, method, rank=rank)
        with torch.no_grad():
            errors.append(float((layer.dense_weight() - conv.weight).norm() / conv.weight.norm()))
    for lo, hi in zip(errors[1:], errors[:-1], strict=True):
        assert lo <= hi * (1 + 1e-3) + 1e-9, f"{method}: errors {errors} at ranks {picks}"
    assert errors[-1] < errors[0]


@pytest.mark.parametrize("method", METHODS)
def test_ratio_picks_largest_rank_within_budget(method):
    conv = make_conv(GEOMETRIES[0])
    spec = ConvSpec.from_conv(conv)
    cls = get_method(method)
    for ratio in (0.1, 0.25, 0.5):
        rank = cls.rank_for_ratio(spec, ratio)
        budget = ratio * spec.dense_params()
        ranks = list(cls.rank_candidates(spec))
        within = [r for r in ranks if cls.param_count(spec, r) <= budget]
        if within:
            assert cls.param_count(spec, rank) == max(cls.param_count(spec, r) for r in within)
        else:
            assert rank == ranks[0]


@pytest.mark.parametrize("method", METHODS)
def test_bad_input_is_a_clear_value_error(method):
    conv = make_conv(GEOMETRIES[0])
    for bad in (0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="ratio"):
            ad.decompose_conv(conv, method, ratio=bad)
    with pytest.raises(ValueError, match=r"range|must|invalid"):
        ad.decompose_conv(conv, method, rank=10**6)
    with pytest.raises(ValueError, match="exactly one"):
        ad.decompose_conv(conv, method)
    grouped = nn.Conv2d(8, 12, 3, groups=4)
    if get_method(method).unsupported_reason(ConvSpec.from_conv(grouped)) is not None:
        with pytest.raises(ValueError, match="groups=4"):
            ad.decompose_conv(grouped, method, ratio=0.5)


def test_plan_naming_missing_layer_is_an_error():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    with pytest.raises(ValueError, match=r"'9'.*valid layers: 0, 2"):
        ad.apply_plan(model, {"9": {"method": "tucker", "ratio": 0.5}})
    with pytest.raises(ValueError, match="unknown decomposition method"):
        ad.apply_plan(model, {"2": {"method": "svd9", "ratio": 0.5}})


@pytest.mark.parametrize("method", METHODS)
def test_apply_plan_on_resnet18_keeps_shapes_and_original(method):
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = ad.conv_layers(model)
    assert len(layers) == 20
    spec_of = {n: ConvSpec.from_conv(model.get_submodule(n)) for n in layers}
    plan = {
        n: {"method": method, "ratio": 0.05}
        for n in layers
        if get_method(method).unsupported_reason(spec_of[n]) is None
    }
    assert plan, f"{method} supports no layer of resnet18"
    plan = json.loads(json.dumps(plan))
    small = ad.apply_plan(model, plan)
    x = torch.randn(2, 3, 32, 32)
    assert small(x).shape == model(x).shape == (2, 10)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert ad.count_params(small) < ad.count_params(model)
    assert set(ad.conv_layers(small)) == set(layers) - set(plan)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_kernel_is_a_decomposition_error(method, bad, capfd):
    """No solver sees a NaN / Inf kernel (which crashed SVDs with a LinAlgError, or gave
    non-finite factors and MKL's DLASCL messages): every entry point raises first."""
    conv = make_conv(GEOMETRIES[0], torch.float32)
    cls, spec = get_method(method), ConvSpec.from_conv(conv)
    supported_or_skip(method, spec)
    with torch.no_grad():
        conv.weight[1, 2, 0, 1] = bad
    kind = "1 NaN, 0 Inf" if bad != bad else "0 NaN, 1 Inf"
    with pytest.raises(ad.DecompositionError, match=rf"^{method} cannot .* kernel .*: {kind} of"):
        ad.decompose_conv(conv, method, ratio=0.4)
    rank = cls.rank_for_ratio(spec, 0.4)
    with pytest.raises(ad.DecompositionError, match="non-finite"):
        cls.from_weight(conv.weight.detach(), conv.bias, spec, rank)
    with pytest.raises(ad.DecompositionError, match=r"^layer '0': .*non-finite"):
        ad.apply_plan(nn.Sequential(conv), {"0": {"method": method, "ratio": 0.4}})
    finite = make_conv(GEOMETRIES[0], torch.float32)
    with torch.no_grad():
        finite.bias[0] = bad
    with pytest.raises(ad.DecompositionError, match="bias with non-finite"):
        ad.decompose_conv(finite, method, ratio=0.4)
    assert "DLASCL" not in capfd.readouterr().err


# tensorly's own reconstruction of each factorized-tensor type a layer may give ([K])
TENSORLY_RECONSTRUCTION = {
    CPTensor: tl.cp_to_tensor,
    TuckerTensor: tl.tucker_to_tensor,
    TTTensor: tl.tt_to_tensor,
    TRTensor: tl.tr_to_tensor,
}


@pytest.mark.parametrize("backend", ["numpy", "pytorch"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_tensorly_reconstruction_is_the_dense_weight(method, geom, backend):
    """``to_tensorly()`` rebuilt by tensorly (``tl.cp_to_tensor`` etc., on either backend) and
    mapped by ``kernel_from_tensorly`` is ``dense_weight()``."""
    conv = make_conv(geom)
    supported_or_skip(method, ConvSpec.from_conv(conv))
    layer = ad.decompose_conv(conv, method, ratio=0.4)
    with tl.backend_context(backend):
        try:
            factorized = layer.to_tensorly()
        except NotImplementedError:
            pytest.skip(f"{method} has no tensorly form")
        rebuild = TENSORLY_RECONSTRUCTION.get(type(factorized))
        assert rebuild is not None, f"{method}: {type(factorized).__name__} is no tensorly type"
        full = rebuild(factorized)
        assert tl.is_tensor(full)
    kernel = layer.kernel_from_tensorly(full)
    dense = layer.dense_weight().detach()
    assert kernel.shape == dense.shape == conv.weight.shape
    err = float((kernel.to(dense) - dense).norm() / dense.norm())
    assert err < 1e-6, f"{method}: tensorly reconstruction differs by {err:.2e}"


def test_builtin_methods_have_their_tensorly_form():
    conv = make_conv(GEOMETRIES[0])
    expected = {
        "cp": CPTensor,
        "pdp": CPTensor,
        "shift": CPTensor,
        "tucker": TuckerTensor,
        "tt": TTTensor,
        "gkpd": TTTensor,
        "sekron": TTTensor,
        "tr": TRTensor,
    }
    for method, kind in expected.items():
        assert type(ad.decompose_conv(conv, method, ratio=0.4).to_tensorly()) is kind, method
