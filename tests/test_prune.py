"""Shift-layer pruning of built-in shift blocks and of ``shift``-decomposed layers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autodecomp as ad
from autodecomp.compress.prune import (
    channel_saliency,
    is_shift_block,
    kept_channels,
    prunable_methods,
    prune_entry,
    prune_model,
    prune_shift_block,
    prune_to_sizes,
    shift_blocks,
)
from autodecomp.core.shift import Shift, ShiftBlock


def trained_block(stride: int = 2) -> ShiftBlock:
    """A ShiftBlock (16 -> 48 -> 32) with random weights and BN statistics, in eval mode."""
    torch.manual_seed(11)
    block = ShiftBlock(16, 32, 48, stride=stride)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_()
        block.bn.running_mean.normal_()
        block.bn.running_var.uniform_(0.5, 2.0)
    return block.eval()


def decomposed_layer() -> nn.Module:
    torch.manual_seed(12)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1).double()
    return conv, ad.decompose_conv(conv, "shift", rank=6)


def zeroed(block: nn.Module, keep: list[int]) -> nn.Module:
    """Copy of ``block`` whose removed channels no longer reach the output."""
    ref = copy.deepcopy(block)
    removed = [i for i in range(ref.last.weight.shape[1]) if i not in keep]
    with torch.no_grad():
        ref.last.weight[:, removed] = 0
    return ref


def test_ratio_zero_is_the_identity():
    block = trained_block()
    pruned = prune_shift_block(block, 0.0)
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(pruned(x), block(x))
    assert pruned is not block and pruned.shift.group_sizes == block.shift.group_sizes
    _, layer = decomposed_layer()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    assert torch.equal(prune_shift_block(layer, 0.0)(x), layer(x))


def test_pruned_block_has_expected_channels_params_and_macs():
    block = trained_block()
    pruned = prune_shift_block(block, 0.5)
    sizes = pruned.shift.group_sizes
    assert sum(sizes) == 24
    assert sizes[4] == 4  # centre group of 8 loses exactly half
    assert sorted(sizes[:4] + sizes[5:]) == [2, 2, 2, 2, 3, 3, 3, 3]  # 2.5 each, rounded
    assert pruned.first.weight.shape == (24, 16, 1, 1)
    assert pruned.last.weight.shape == (32, 24, 1, 1) and pruned.last.stride == (2, 2)
    assert pruned.bn.num_features == 24
    assert ad.count_params(pruned) == 24 * 16 + 2 * 24 + 24 * 32
    bn = ad.count_macs(nn.BatchNorm2d(24).eval(), (24, 8, 8))
    assert ad.count_macs(pruned, (16, 8, 8)) == 16 * 24 * 64 + 24 * 32 * 16 + bn
    assert ad.count_params(block) == 48 * 16 + 2 * 48 + 48 * 32  # original untouched


@pytest.mark.parametrize("scope", ["group", "global"])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9])
def test_pruned_output_equals_removed_channels_zeroed(ratio, scope):
    block = trained_block().double()  # float64: float32 rounding differs by kernel choice
    keep = kept_channels(block, ratio, scope=scope)
    pruned = prune_shift_block(block, ratio, scope=scope)
    assert sum(pruned.shift.group_sizes) == len(keep)
    x = torch.randn(3, 16, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(pruned(x), zeroed(block, keep)(x), rtol=0, atol=1e-6)

    _, layer = decomposed_layer()
    keep = kept_channels(layer, ratio, scope=scope)
    pruned = prune_shift_block(layer, ratio, scope=scope)
    assert pruned.rank == tuple(pruned.shift.group_sizes) and sum(pruned.rank) == len(keep)
    assert pruned.params() == ad.count_params(pruned)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(pruned(x), zeroed(layer, keep)(x), rtol=0, atol=1e-10)
    assert pruned.macs(7, 7) == ad.count_macs(pruned, (6, 7, 7))


def test_saliency_is_norm_product_with_bn_scale():
    block = ShiftBlock(2, 2, 9)
    with torch.no_grad():
        block.first.weight.zero_()
        block.first.weight[:, 0, 0, 0] = torch.arange(1.0, 10.0)
        block.last.weight.fill_(1.0)
        block.bn.weight.copy_(torch.tensor([-2.0] + [1.0] * 8))
        block.bn.running_var.fill_(3.0)
    expected = torch.arange(1.0, 10.0, dtype=torch.float64) * 2**0.5 / (3.0 + 1e-5) ** 0.5
    expected[0] *= 2
    torch.testing.assert_close(channel_saliency(block), expected)


def test_decomposed_layer_pruning_drops_smallest_singular_values():
    conv, layer = decomposed_layer()
    pruned = prune_shift_block(layer, 0.5, scope="global")
    truncated = ad.decompose_conv(conv, "shift", rank={"channels": 27})
    assert pruned.rank == truncated.rank
    torch.testing.assert_close(pruned.dense_weight(), truncated.dense_weight())


def test_group_scope_keeps_every_direction_global_may_empty_one():
    block = ShiftBlock(4, 4, group_sizes=[1, 1, 1, 1, 5, 1, 1, 1, 1])
    with torch.no_grad():
        block.first.weight.fill_(1.0)
        block.last.weight.fill_(1.0)
        block.first.weight[4:9] = 10.0  # the centre group is the most salient
    grouped = prune_shift_block(block, 0.5, scope="group")
    assert grouped.shift.group_sizes == [1, 1, 1, 1, 1, 1, 1, 1, 1]  # capped: 4 of round(6.5)
    global_ = prune_shift_block(block, 0.5, scope="global")
    assert global_.shift.group_sizes == [0, 0, 0, 0, 5, 0, 0, 0, 1]  # 7 removed, ties by index


def test_prune_model_copies_and_validates():
    assert shift_blocks(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())) == []
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), trained_block(), nn.Conv2d(32, 8, 3))
    model = ad.apply_plan(model, {"2": {"method": "shift", "rank": 4}}).eval()
    assert shift_blocks(model) == ["1", "2"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = prune_model(model, {"1": 0.5, "2": 0.25})
    assert small.get_submodule("1").mid_channels == 24
    assert sum(small.get_submodule("2").rank) == 27
    assert small(torch.randn(1, 3, 12, 12)).shape == model(torch.randn(1, 3, 12, 12)).shape
    assert ad.count_params(small) < ad.count_params(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match=r"'0' is not a shift block.*valid blocks: 1, 2"):
        prune_model(model, {"0": 0.5})
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="ratio"):
            prune_model(model, {"1": bad})
    with pytest.raises(ValueError, match="criterion"):
        prune_shift_block(model[1], 0.5, criterion="magic")
    with pytest.raises(ValueError, match="scope"):
        prune_shift_block(model[1], 0.5, scope="layer")


def test_decomposed_inner_conv_is_refused():
    block = trained_block()
    block.first = ad.decompose_conv(nn.Conv2d(16, 48, 1, bias=False), "tucker", rank=4)
    with pytest.raises(ValueError, match="prune before decomposing"):
        prune_shift_block(block, 0.5)


class _UserShiftBlock(nn.Module):
    """A user module following the shift-block protocol (no BN, GELU)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(4, 18, 1)
        self.shift = Shift(18)
        self.last = nn.Conv2d(18, 6, 1)

    def forward(self, x):
        return self.last(self.shift(F.gelu(self.first(x))))


def test_any_module_following_the_protocol_is_a_shift_block():
    torch.manual_seed(5)
    model = nn.Sequential(_UserShiftBlock(), nn.Conv2d(6, 6, 3)).eval()
    assert shift_blocks(model) == ["0"] and is_shift_block(model[0])
    assert not is_shift_block(model) and not is_shift_block(model[1])
    assert prunable_methods() == ["shift"]
    keep = kept_channels(model[0], 0.5)
    pruned = prune_model(model, {"0": 0.5})
    assert pruned[0].first.bias.shape == (len(keep),)  # biases of the first 1x1 follow
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(pruned[0](x), zeroed(model[0], keep)(x), rtol=0, atol=1e-6)


def test_prune_to_sizes_keeps_the_most_salient_per_group():
    block = trained_block()
    pruned = prune_shift_block(block, 0.4)
    again = prune_to_sizes(block, pruned.shift.group_sizes)
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(again(x), pruned(x))
    assert (
        prune_entry(block, {"method": "prune", "rank": pruned.shift.group_sizes}).shift.group_sizes
        == pruned.shift.group_sizes
    )
    for bad in ([1] * 8, [6] + [1] * 8, [0] * 9, [1.0] * 9):
        with pytest.raises(ValueError, match="shift group sizes must be 9 ints"):
            prune_to_sizes(block, bad)
    with pytest.raises(ValueError, match="exactly one of 'prune'"):
        prune_entry(block, {"prune": 0.2, "rank": [1] * 9})
    with pytest.raises(ValueError, match="no other key"):
        prune_entry(block, {"prune": 0.2, "scope": "global"})
