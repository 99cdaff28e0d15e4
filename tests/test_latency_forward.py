"""The faster forwards compute what the plain convolution forms computed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autodecomp as ad
from autodecomp.decompositions import ConvSpec, get_method
from autodecomp.decompositions.layers import pointwise_conv


def _seeded(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout_in", ["nchw", "channels_last"])
@pytest.mark.parametrize("out_channels_last", [False, True])
def test_pointwise_conv_layouts(batch, bias, layout_in, out_channels_last):
    x = _seeded(batch, 6, 8, 9)
    if layout_in == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight, b = _seeded(9, 6, 1, 1, seed=1), (_seeded(9, seed=2) if bias else None)
    out = pointwise_conv(x, weight, b, channels_last=out_channels_last)
    layout = torch.channels_last if out_channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, F.conv2d(x, weight, b), rtol=0, atol=1e-5)


def test_pointwise_conv_strided_input_falls_back_to_conv():
    x = _seeded(2, 6, 9, 18)[..., ::2]
    weight = _seeded(3, 6, 1, 1, seed=1)
    torch.testing.assert_close(pointwise_conv(x, weight), F.conv2d(x, weight), rtol=0, atol=0)


def test_pointwise_conv_gradient_equals_conv2d():
    x, weight, bias = _seeded(3, 6, 8, 8), _seeded(4, 6, 1, 1, seed=1), _seeded(4, seed=2)
    grads = []
    for run in (pointwise_conv, F.conv2d):
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        run(x, w, b).square().sum().backward()
        grads.append((w.grad, b.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def _reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forwards as they were before the batched-matmul pointwise stages."""
    name, first, last, bias = layer.name, layer.first.weight, layer.last.weight, layer.bias
    y = F.conv2d(x, first)
    if name == "tucker":
        y = layer.core(y)
    elif name == "cp":
        y = layer.horizontal(layer.vertical(y))
    elif name == "pdp":
        y = layer.depthwise(y)
    elif name == "shift":
        y = layer.shift(y)
    elif name == "tr":
        ra, rb, re = layer.rank
        y = layer.core(y.reshape(-1, rb, *y.shape[-2:]))
        y = y.reshape(x.shape[0], ra * re, *y.shape[-2:])
    return F.conv2d(y, last, bias)


def _random_layer(method: str, conv: nn.Conv2d, ratio: float, *, seed: int):
    """A seeded random decomposed layer of ``conv``'s geometry at ``ratio``."""
    spec = ConvSpec.from_conv(conv)
    cls = get_method(method)
    return cls.random(spec, cls.rank_for_ratio(spec, ratio), torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["tucker", "cp", "pdp", "tr", "shift"])
@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_methods_forward_unchanged(method, stride):
    layer = _random_layer(
        method, nn.Conv2d(16, 24, 3, stride=stride, padding=1, bias=True), 0.3, seed=3
    )
    x = _seeded(5, 16, 17, 16)
    with torch.no_grad():
        expected = _reference(layer, x)
        out = layer(x)
    scale = float(expected.abs().max())
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("method", ad.methods())
def test_fvcore_counts_a_batch_as_batch_times_macs(method):
    layer = _random_layer(method, nn.Conv2d(8, 12, 3, padding=1, bias=True), 0.3, seed=0)
    assert ad.count_macs(layer, (3, 8, 10, 9)) == 3 * layer.macs(10, 9)


@pytest.mark.parametrize("method", ["gkpd", "sekron"])
@pytest.mark.parametrize("stride", [1, 2])
def test_kronecker_chain_padding_in_first_conv_equals_explicit_pad(method, stride):
    layer = _random_layer(
        method, nn.Conv2d(8, 12, 3, stride=stride, padding=1, bias=True), 0.4, seed=1
    )
    unpadded = type(layer)(dataclasses.replace(layer.spec, padding=(0, 0, 0, 0)), layer.rank)
    unpadded.load_state_dict(layer.state_dict())
    x = _seeded(2, 8, 10, 11)
    with torch.no_grad():
        expected = unpadded(layer.spec.pad(x))
        out = layer(x)
    scale = float(expected.abs().max())
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5 * scale)


def _tt_reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tensor-train forward as it was: matmuls on a pixel-major state, permuted per core."""
    n, _, h, w = x.shape
    cs, fs, d, ranks = layer.in_factors, layer.out_factors, len(layer.in_factors), layer.ranks
    bonds = [*ranks, 1]
    y = layer.spatial(x.reshape(-1, 1, h, w))
    ho, wo = y.shape[-2:]
    y = y.reshape(n, *cs, ranks[0], -1).permute(0, d + 2, *range(1, d + 2))
    for k in range(d - 1):
        last = y.dim() - 1
        y = y.permute(0, 1, *range(3, last), 2, last)
        lead = y.shape[:-2]
        core = layer.cores[k].permute(1, 0, 2, 3).reshape(cs[k] * bonds[k], -1)
        y = (y.reshape(*lead, -1) @ core).reshape(*lead, fs[k], ranks[k + 1])
    y = y.permute(0, *range(3, d + 2), 2, d + 2, 1).reshape(n, -1, ho, wo)
    groups = layer.spec.out_channels // fs[-1]
    return F.conv2d(y, layer._last_weight(), layer.bias, groups=groups)


@pytest.mark.parametrize(
    "rank",
    [
        {"in": [2, 3, 4], "out": [4, 2, 3], "ranks": [5, 7, 3]},
        {"in": [4, 6], "out": [6, 4], "ranks": [4, 6]},
        {"in": [24], "out": [24], "ranks": [6]},
        {"in": [2, 2, 3, 2], "out": [3, 2, 2, 2], "ranks": [3, 4, 5, 2]},
    ],
)
@pytest.mark.parametrize("stride", [1, 2])
def test_tt_forward_unchanged(rank, stride):
    conv = nn.Conv2d(24, 24, 3, stride=stride, padding=1, bias=True)
    spec = ConvSpec.from_conv(conv)
    layer = get_method("tt").random(spec, rank, torch.Generator().manual_seed(4))
    x = _seeded(3, 24, 9, 10)
    with torch.no_grad():
        expected = _tt_reference(layer, x)
        out = layer(x)
    scale = float(expected.abs().max())
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5 * scale)
