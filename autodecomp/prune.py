"""Shift-layer pruning: drop intermediate channels of shift blocks, per shift direction group.

A *shift block* is ``1x1 (C -> E) [-> BN -> ReLU] -> shift -> 1x1 (E -> F)``: the built-in
:class:`~autodecomp.shift.ShiftBlock` (ShiftResNets) or a layer decomposed with the ``shift``
method. Pruning at ratio ``p`` removes ``round(p * E)`` (half up) of the ``E`` intermediate
channels: rows of the first 1x1, BN entries, the channels of their shift group, columns of the
last 1x1. The result is a smaller standalone block with real smaller tensors; in eval mode its
output equals the original block's with the removed channels' columns of the last 1x1 zeroed.

Channels are ranked by the saliency ``||first row|| * |gamma| / sqrt(var + eps) * ||last
column||`` (no BN factor without BN running statistics). For a layer fresh from the ``shift``
decomposition that product is exactly the channel's singular value of its kernel slice, so
pruning it drops the smallest per-slice singular values.

``scope="group"`` (default) keeps the direction groups balanced: each group first loses
``floor(p * size)`` channels, the remaining removals go one at a time to the groups still
below ``p * size`` (least salient next candidate first), and every non-empty group keeps at
least one channel, so the number removed is ``min(round(p * E), E - non-empty groups)``.
``scope="global"`` removes the least salient channels of the whole block (at most ``E - 1``);
groups may empty.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import nn

from .decompositions.shift import SliceShiftConv
from .shift import Shift, ShiftBlock
from .surgery import replace_module

__all__ = [
    "channel_saliency",
    "kept_channels",
    "prune_model",
    "prune_shift_block",
    "shift_blocks",
]

_SHIFT_BLOCKS = (ShiftBlock, SliceShiftConv)
_CRITERIA = ("norm",)
_SCOPES = ("group", "global")


def shift_blocks(model: nn.Module) -> list[str]:
    """Names of the prunable shift blocks of ``model`` (built-in or ``shift``-decomposed)."""
    return [name for name, module in model.named_modules() if isinstance(module, _SHIFT_BLOCKS)]


def _parts(block: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d | None, Shift, nn.Conv2d]:
    if not isinstance(block, _SHIFT_BLOCKS):
        raise TypeError(
            f"expected a ShiftBlock or a 'shift'-decomposed layer, got {type(block).__name__}"
        )
    first, last = block.first, block.last
    for conv in (first, last):
        if type(conv) is not nn.Conv2d or conv.kernel_size != (1, 1) or conv.groups != 1:
            raise ValueError(
                "a shift block's first/last layers must be dense 1x1 nn.Conv2d to be pruned "
                f"(got {conv!r}); prune before decomposing them"
            )
    return first, getattr(block, "bn", None), block.shift, last


def channel_saliency(block: nn.Module) -> torch.Tensor:
    """Saliency of every intermediate channel (float64, shape ``(E,)``), see the module doc."""
    first, bn, _, last = _parts(block)
    with torch.no_grad():
        score = first.weight.flatten(1).double().norm(dim=1)
        score = score * last.weight.transpose(0, 1).flatten(1).double().norm(dim=1)
        if bn is not None and bn.running_var is not None:
            gamma = bn.weight.double().abs() if bn.affine else 1.0
            score = score * gamma / (bn.running_var.double() + bn.eps).sqrt()
    return score.cpu()


def _check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, int | float) and math.isfinite(ratio) and 0 <= ratio < 1):
        raise ValueError(f"shift_prune ratio must be a number in [0, 1), got {ratio!r}")


def _group_removals(
    sizes: list[int], ranked: list[list[int]], score: list[float], ratio: float
) -> list[int]:
    """Per-group removal counts summing to the block's quota (see the module doc)."""
    quota = min(math.floor(ratio * sum(sizes) + 0.5), sum(sizes) - sum(1 for n in sizes if n))
    counts = [min(math.floor(ratio * n + 1e-9), max(n - 1, 0)) for n in sizes]
    while sum(counts) < quota:
        open_groups = [g for g, n in enumerate(sizes) if counts[g] < n - 1]
        g = min(
            open_groups,
            key=lambda g: (counts[g] >= ratio * sizes[g] - 1e-9, score[ranked[g][counts[g]]], g),
        )
        counts[g] += 1
    return counts


def kept_channels(
    block: nn.Module, ratio: float, *, criterion: str = "norm", scope: str = "group"
) -> list[int]:
    """Indices (ascending) of the intermediate channels that pruning at ``ratio`` keeps.

    Args:
        block: a shift block.
        ratio: fraction of intermediate channels to remove, in ``[0, 1)``.
        criterion: saliency ranking; ``"norm"`` (see :func:`channel_saliency`).
        scope: ``"group"`` (balanced per direction group) or ``"global"``.
    """
    _check_ratio(ratio)
    if criterion not in _CRITERIA:
        raise ValueError(f"unknown pruning criterion {criterion!r}; valid: {', '.join(_CRITERIA)}")
    if scope not in _SCOPES:
        raise ValueError(f"unknown pruning scope {scope!r}; valid: {', '.join(_SCOPES)}")
    score = channel_saliency(block).tolist()
    sizes = _parts(block)[2].group_sizes
    total = sum(sizes)
    if scope == "global":
        quota = min(math.floor(ratio * total + 0.5), total - 1)
        removed = sorted(range(total), key=lambda i: (score[i], i))[:quota]
    else:
        starts = [sum(sizes[:g]) for g in range(len(sizes))]
        ranked = [
            sorted(range(s, s + n), key=lambda i: (score[i], i))
            for s, n in zip(starts, sizes, strict=True)
        ]
        counts = _group_removals(sizes, ranked, score, ratio)
        removed = [i for g, c in enumerate(counts) for i in ranked[g][:c]]
    dropped = set(removed)
    return [i for i in range(total) if i not in dropped]


def _sliced_conv(
    conv: nn.Conv2d, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None
) -> nn.Conv2d:
    weight = conv.weight.detach()
    if out_idx is not None:
        weight = weight[out_idx]
    if in_idx is not None:
        weight = weight[:, in_idx]
    new = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        1,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
    ).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias if out_idx is None else conv.bias[out_idx])
    return new.train(conv.training).requires_grad_(conv.weight.requires_grad)


def _sliced_bn(bn: nn.BatchNorm2d, idx: torch.Tensor, like: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(
        len(idx), bn.eps, bn.momentum, affine=bn.affine, track_running_stats=bn.track_running_stats
    ).to(like)
    with torch.no_grad():
        for key, value in bn.state_dict().items():
            getattr(new, key).copy_(value if key == "num_batches_tracked" else value[idx])
    return new.train(bn.training)


def prune_shift_block(
    block: nn.Module, ratio: float, *, criterion: str = "norm", scope: str = "group"
) -> nn.Module:
    """A copy of ``block`` without its least salient intermediate channels.

    Args:
        block: a :class:`~autodecomp.shift.ShiftBlock` or a ``shift``-decomposed layer.
        ratio: fraction of intermediate channels to remove, in ``[0, 1)`` (0: an exact copy).
        criterion: see :func:`kept_channels`.
        scope: see :func:`kept_channels`.

    Returns:
        A block of the same type with smaller tensors and ``shift.group_sizes`` updated (a
        decomposed layer's ``rank`` holds the new per-slice ranks); ``block`` is untouched.
    """
    keep = kept_channels(block, ratio, criterion=criterion, scope=scope)
    first, bn, shift, last = _parts(block)
    idx = torch.tensor(keep, dtype=torch.long, device=first.weight.device)
    group_of = [g for g, n in enumerate(shift.group_sizes) for _ in range(n)]
    sizes = [0] * len(shift.group_sizes)
    for i in keep:
        sizes[group_of[i]] += 1
    g = shift.geometry
    new = copy.deepcopy(block)
    new.first = _sliced_conv(first, idx, None)
    new.last = _sliced_conv(last, None, idx)
    new.shift = Shift(
        group_sizes=sizes,
        kernel_size=g.kernel_size,
        dilation=g.dilation,
        stride=g.stride,
        padding=g.padding,
    )
    if bn is not None:
        new.bn = _sliced_bn(bn, idx, first.weight)
    if isinstance(new, SliceShiftConv):
        new.rank = tuple(sizes)
    return new


def prune_model(
    model: nn.Module,
    ratios: Mapping[str, float],
    *,
    criterion: str = "norm",
    scope: str = "group",
) -> nn.Module:
    """A copy of ``model`` with each named shift block pruned; ``model`` is untouched.

    Args:
        model: a model with shift blocks (see :func:`shift_blocks`).
        ratios: ``{block_name: ratio}``, ratio in ``[0, 1)``.
        criterion: see :func:`kept_channels`.
        scope: see :func:`kept_channels`.
    """
    valid = shift_blocks(model)
    for name, ratio in ratios.items():
        if name not in valid:
            shown = ", ".join(valid[:12]) + (", ..." if len(valid) > 12 else "") or "none"
            raise ValueError(f"{name!r} is not a shift block of the model; valid blocks: {shown}")
        _check_ratio(ratio)
    new = copy.deepcopy(model)
    for name, ratio in ratios.items():
        block = new.get_submodule(name)
        replace_module(new, name, prune_shift_block(block, ratio, criterion=criterion, scope=scope))
    return new
