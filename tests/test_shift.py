"""Shift module, ShiftBlock and the slice-wise SVD ``shift`` decomposition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import autodecomp as ad
from autodecomp.core.shift import Shift, ShiftBlock, equal_groups
from autodecomp.decompositions import ConvSpec, UnsupportedLayerError, get_method
from autodecomp.factorize.cache import FactorCache
from autodecomp.measure.cost import uncounted_ops

OFFSETS_3X3 = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1)]


def rolled(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Reference shift: out[i, j] = x[i + dy, j + dx], zero outside (torch.roll + zeroed border)."""
    out = torch.roll(x, shifts=(-dy, -dx), dims=(2, 3)).clone()
    h, w = x.shape[-2:]
    if dy > 0:
        out[:, :, h - dy :] = 0
    if dy < 0:
        out[:, :, :-dy] = 0
    if dx > 0:
        out[:, :, :, w - dx :] = 0
    if dx < 0:
        out[:, :, :, :-dx] = 0
    return out


def reference(x: torch.Tensor, sizes: list[int], dilation: int = 1) -> torch.Tensor:
    parts, start = [], 0
    for (dy, dx), size in zip(OFFSETS_3X3, sizes, strict=True):
        parts.append(rolled(x[:, start : start + size], dilation * dy, dilation * dx))
        start += size
    return torch.cat(parts, dim=1)


# --- Shift ----------------------------------------------------------------------------------
def test_equal_groups_give_the_remainder_to_the_centre():
    assert equal_groups(20) == [2, 2, 2, 2, 4, 2, 2, 2, 2]
    assert equal_groups(18) == [2] * 9
    assert equal_groups(5) == [0, 0, 0, 0, 5, 0, 0, 0, 0]
    assert equal_groups(7, (3, 4)) == [0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0]
    assert Shift(20).group_sizes == [2, 2, 2, 2, 4, 2, 2, 2, 2]
    assert Shift(20).offsets == OFFSETS_3X3


@pytest.mark.parametrize(
    ("sizes", "dilation", "hw"),
    [
        (equal_groups(20), 1, (7, 9)),
        ([3, 0, 1, 2, 1, 0, 4, 1, 2], 1, (5, 5)),
        ([1, 2, 1, 2, 1, 2, 1, 2, 1], 2, (6, 8)),
        ([0, 0, 0, 0, 0, 0, 0, 0, 3], 1, (4, 4)),
    ],
)
def test_shift_equals_roll_reference(sizes, dilation, hw):
    x = torch.randn(2, sum(sizes), *hw, requires_grad=True)
    shift = Shift(group_sizes=sizes, dilation=dilation)
    out = shift(x)
    expected = reference(x, sizes, dilation)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, grad)
    (want,) = torch.autograd.grad(expected, x, grad)
    assert torch.equal(got, want)


def test_shift_channels_matches_equal_split():
    x = torch.randn(1, 20, 6, 6)
    assert torch.equal(Shift(20)(x), reference(x, equal_groups(20)))


def test_shift_stride_subsamples_the_shifted_map():
    x = torch.randn(2, 11, 9, 8)
    full = Shift(11)(x)
    assert torch.equal(Shift(11, stride=2)(x), full[:, :, ::2, ::2])


def onehot_conv(x: torch.Tensor, shift: Shift) -> torch.Tensor:
    """Reference for any geometry: a depthwise conv whose kernel is one-hot at each group's tap."""
    g = shift.geometry
    kh, kw = g.kernel_size
    weight = torch.zeros(shift.channels, 1, kh * kw, dtype=x.dtype)
    start = 0
    for p, size in enumerate(shift.group_sizes):
        weight[start : start + size, 0, p] = 1
        start += size
    weight = weight.reshape(shift.channels, 1, kh, kw)
    return F.conv2d(g.pad(x), weight, None, g.stride, 0, g.dilation, groups=shift.channels)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation"),
    [
        (3, 1, None, 1),
        (3, 2, 1, 1),
        (3, 2, 0, 1),
        ((3, 5), 1, (1, 2), 1),
        (4, 1, "same", 1),
        (3, 3, (0, 2, 1, 0), 2),
        (5, 2, 4, 2),
    ],
)
def test_shift_geometry_equals_onehot_depthwise_conv_eager_and_traced(
    kernel, stride, padding, dilation
):
    area = kernel * kernel if isinstance(kernel, int) else kernel[0] * kernel[1]
    sizes = [(p * 7) % 4 for p in range(area)]
    shift = Shift(
        group_sizes=sizes, kernel_size=kernel, stride=stride, padding=padding, dilation=dilation
    )
    x = torch.randn(2, sum(sizes), 11, 10, dtype=torch.float64, requires_grad=True)
    expected = onehot_conv(x, shift)
    out = shift(x)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    torch.testing.assert_close(
        torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(expected, x, grad)[0]
    )
    traced = torch.jit.trace(shift, torch.zeros(1, sum(sizes), 11, 10, dtype=torch.float64))
    assert torch.equal(traced(x), expected)


def test_shift_has_no_params_no_macs_no_uncounted_ops():
    shift = Shift(group_sizes=[3, 1, 2, 0, 4, 2, 1, 1, 2], dilation=2)
    assert ad.count_params(shift) == 0
    assert list(shift.parameters()) == []
    assert ad.count_macs(shift, (16, 10, 10)) == 0
    assert not uncounted_ops(shift, (16, 10, 10))
    with FlopCounterMode(display=False) as counter:
        shift(torch.randn(1, 16, 10, 10))
    assert counter.get_total_flops() == 0


def test_shift_rejects_bad_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        Shift()
    with pytest.raises(ValueError, match="exactly one"):
        Shift(9, group_sizes=[1] * 9)
    with pytest.raises(ValueError, match="9 non-negative"):
        Shift(group_sizes=[1] * 8)
    with pytest.raises(ValueError, match="non-negative"):
        Shift(group_sizes=[2, -1, 0, 0, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="positive sum"):
        Shift(group_sizes=[0] * 9)
    with pytest.raises(ValueError, match=r"expects \(N, 9, H, W\), got \(1, 8, 4, 4\)"):
        Shift(9)(torch.zeros(1, 8, 4, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shift_on_cuda_matches_cpu():
    x = torch.randn(4, 37, 16, 16)
    shift = Shift(37)
    assert torch.equal(shift(x.cuda()).cpu(), shift(x))


def test_shift_block_structure_and_cost():
    block = ShiftBlock(16, 32, 48, stride=2).eval()
    assert block.shift.group_sizes == [5, 5, 5, 5, 8, 5, 5, 5, 5]
    assert ad.count_params(block) == 16 * 48 + 2 * 48 + 48 * 32
    bn = ad.count_macs(nn.BatchNorm2d(48).eval(), (48, 8, 8))
    assert ad.count_macs(block, (16, 8, 8)) == 16 * 48 * 64 + 48 * 32 * 16 + bn
    assert not uncounted_ops(block, (16, 8, 8))
    x = torch.randn(2, 16, 8, 8)
    hidden = F.relu(block.bn(block.first(x)))
    expected = block.last(reference(hidden, block.shift.group_sizes))
    assert block(x).shape == (2, 32, 4, 4)
    assert torch.equal(block(x), expected)


# --- the ``shift`` decomposition --------------------------------------------------------------
def _conv(cin, cout, stride, padding=1, dtype=torch.float32, bias=True) -> nn.Conv2d:
    torch.manual_seed(5)
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=padding, bias=bias).to(dtype)
    with torch.no_grad():
        conv.weight.normal_()
    return conv


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(("cin", "cout"), [(8, 12), (12, 8)])
def test_full_rank_conversion_is_exact(stride, cin, cout):
    conv = _conv(cin, cout, stride)
    layer = ad.decompose_conv(conv, "shift", rank=min(cin, cout))
    assert layer.rank == (min(cin, cout),) * 9
    x = torch.randn(2, cin, 11, 10)
    expected = conv(x)
    err = (layer(x) - expected).norm() / expected.norm()
    assert err < 1e-5
    assert (layer.dense_weight() - conv.weight).norm() / conv.weight.norm() < 1e-5
    assert isinstance(layer.shift, Shift) and layer.shift.group_sizes == list(layer.rank)


def test_full_ratio_path_ends_exact_and_same_padding_works():
    conv = nn.Conv2d(6, 5, 3, padding="same").double()
    layer = ad.decompose_conv(conv, "shift", rank={"channels": 45})
    x = torch.randn(1, 6, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-10, atol=1e-10)


def test_rank_forms_are_normalised():
    cls = get_method("shift")
    spec = ConvSpec.from_conv(nn.Conv2d(8, 12, 3, padding=1))
    assert cls.normalize_rank(spec, 3) == (3,) * 9
    assert cls.normalize_rank(spec, [0, 1, 2, 3, 4, 5, 6, 7, 8]) == (0, 1, 2, 3, 4, 5, 6, 7, 8)
    assert cls.normalize_rank(spec, {"channels": 72}) == {"channels": 72}
    for bad in (0, 9, [1] * 8, [9] + [1] * 8, [0] * 9, {"channels": 73}, {"r": 3}, True):
        with pytest.raises(ValueError, match="must"):
            cls.normalize_rank(spec, bad)
    assert cls.param_count(spec, (1,) * 9) == 9 * (8 + 12) + 12
    assert list(cls.rank_candidates(spec))[:2] == [{"channels": 1}, {"channels": 2}]
    assert len(list(cls.rank_candidates(spec))) == 72


def test_channels_go_to_the_globally_largest_singular_values():
    conv = _conv(6, 7, 1, dtype=torch.float64)
    slices = conv.weight.detach().permute(2, 3, 0, 1).reshape(9, 7, 6)
    singular = torch.linalg.svdvals(slices)
    previous = None
    for total in (1, 5, 12, 30):
        layer = ad.decompose_conv(conv, "shift", rank={"channels": total})
        threshold = singular.flatten().sort(descending=True).values[total - 1]
        assert layer.rank == tuple(int(n) for n in (singular >= threshold).sum(dim=1))
        dropped = singular.flatten().sort(descending=True).values[total:]
        err = (layer.dense_weight() - conv.weight).norm()
        torch.testing.assert_close(err, dropped.square().sum().sqrt(), rtol=1e-9, atol=1e-9)
        if previous is not None:
            assert all(a >= b for a, b in zip(layer.rank, previous, strict=True))
        previous = layer.rank
    equal = ad.decompose_conv(conv, "shift", rank=[2, 2, 1, 1, 1, 1, 1, 1, 2])
    best = ad.decompose_conv(conv, "shift", rank={"channels": 12})
    assert (best.dense_weight() - conv.weight).norm() < (equal.dense_weight() - conv.weight).norm()


def test_slice_svd_is_cached_once_per_weight():
    conv = _conv(8, 8, 1)
    cache = FactorCache()
    for rank in (1, 4, {"channels": 20}, [0, 1, 2, 3, 4, 5, 6, 7, 8]):
        ad.decompose_conv(conv, "shift", rank=rank, cache=cache)
    assert (cache.misses, cache.hits) == (1, 3)


def test_unsupported_geometries_are_reported():
    cls = get_method("shift")
    assert "1x1" in cls.unsupported_reason(ConvSpec.from_conv(nn.Conv2d(8, 8, 1)))
    for conv in (nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)):
        assert cls.unsupported_reason(ConvSpec.from_conv(conv)) is None
    with pytest.raises(UnsupportedLayerError, match="groups=4"):
        ad.decompose_conv(nn.Conv2d(8, 8, 3, groups=4), "shift", ratio=0.5)
