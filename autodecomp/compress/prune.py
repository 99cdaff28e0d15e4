"""Shift-layer pruning: drop intermediate channels of shift blocks, per shift direction group.

A *shift block* is any module with children ``first`` (dense 1x1 conv, ``C -> E``), optionally
``bn`` (BatchNorm over the ``E`` channels), ``shift`` (a :class:`~autodecomp.core.shift.Shift`) and
``last`` (dense 1x1 conv, ``E -> F``) whose forward is ``last(shift(act(bn(first(x)))))`` with
a channel-wise ``act``: the built-in :class:`~autodecomp.core.shift.ShiftBlock` (ShiftResNets), a
layer decomposed with the ``shift`` method, or a user module following that protocol. Pruning
at ratio ``p`` removes ``round(p * E)`` (half up) of the ``E`` intermediate channels: rows of
the first 1x1, BN entries, the channels of their shift group, columns of the last 1x1. The
result is a smaller standalone block with real smaller tensors; in eval mode its output equals
the original block's with the removed channels' columns of the last 1x1 zeroed.

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

In a plan (:func:`autodecomp.apply_plan`) a shift block is pruned by the entry ``{"method":
"prune", "prune": p}``, or to explicit direction-group sizes by ``{"method": "prune", "rank":
[sizes]}`` (the most salient channels of each group; what an export records); a conv
decomposed by a method that builds shift blocks takes an extra ``"prune": p``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core.shift import Shift
from ..decompositions import DecomposedConv, get_method, methods
from .plan import PRUNE, PlanEntry, check_prune_ratio
from .replace import replace_module

__all__ = [
    "PRUNE",
    "channel_saliency",
    "is_shift_block",
    "kept_channels",
    "prunable_methods",
    "prune_entry",
    "prune_model",
    "prune_shift_block",
    "prune_to_sizes",
    "shift_blocks",
]

_CRITERIA = ("norm",)
_SCOPES = ("group", "global")


def _dense_1x1(conv: Any) -> bool:
    return type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.groups == 1


def is_shift_block(module: nn.Module) -> bool:
    """Whether ``module`` is a prunable shift block (see the module doc)."""
    return isinstance(getattr(module, "shift", None), Shift) and all(
        _dense_1x1(getattr(module, part, None)) for part in ("first", "last")
    )


def shift_blocks(model: nn.Module) -> list[str]:
    """Names of the prunable shift blocks of ``model`` (built-in, ``shift``-decomposed, or
    any module following the protocol of the module doc), in model order."""
    return [name for name, module in model.named_modules() if is_shift_block(module)]


def prunable_methods() -> list[str]:
    """Registered methods whose decomposed layer is a shift block (a plan may prune it)."""
    return [m for m in methods() if get_method(m).builds_shift_block]


def _parts(block: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d | None, Shift, nn.Conv2d]:
    if not all(
        isinstance(getattr(block, part, None), kind)
        for part, kind in (("first", nn.Module), ("shift", Shift), ("last", nn.Module))
    ):
        raise TypeError(
            "expected a shift block (children first, shift: Shift, last), got "
            f"{type(block).__name__}"
        )
    first, last = block.first, block.last
    for conv in (first, last):
        if not _dense_1x1(conv):
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
    check_prune_ratio(ratio)
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


def _select(block: nn.Module, keep: list[int]) -> nn.Module:
    """A copy of ``block`` with only the intermediate channels ``keep`` (ascending)."""
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
    if isinstance(new, DecomposedConv) and new.builds_shift_block:
        new.rank = tuple(sizes)
    return new


def prune_shift_block(
    block: nn.Module, ratio: float, *, criterion: str = "norm", scope: str = "group"
) -> nn.Module:
    """A copy of ``block`` without its least salient intermediate channels.

    Args:
        block: a shift block (see the module doc).
        ratio: fraction of intermediate channels to remove, in ``[0, 1)`` (0: an exact copy).
        criterion: see :func:`kept_channels`.
        scope: see :func:`kept_channels`.

    Returns:
        A block of the same type with smaller tensors and ``shift.group_sizes`` updated (a
        decomposed layer's ``rank`` holds the new per-slice ranks); ``block`` is untouched.
    """
    return _select(block, kept_channels(block, ratio, criterion=criterion, scope=scope))


def prune_to_sizes(block: nn.Module, group_sizes: Sequence[int]) -> nn.Module:
    """A copy of ``block`` keeping the ``group_sizes[g]`` most salient channels of each
    direction group ``g`` (the structure an export records for a pruned block)."""
    score = channel_saliency(block).tolist()
    sizes = _parts(block)[2].group_sizes
    valid = (
        isinstance(group_sizes, Sequence)
        and len(group_sizes) == len(sizes)
        and all(type(n) is int and 0 <= n <= m for n, m in zip(group_sizes, sizes, strict=True))
        and sum(group_sizes) >= 1
    )
    if not valid:
        raise ValueError(
            f"shift group sizes must be {len(sizes)} ints, each in [0, the block's {sizes}], "
            f"sum >= 1; got {group_sizes!r}"
        )
    keep, start = [], 0
    for size, n in zip(sizes, group_sizes, strict=True):
        ranked = sorted(range(start, start + size), key=lambda i: (-score[i], i))
        keep += ranked[:n]
        start += size
    return _select(block, sorted(keep))


def prune_entry(block: nn.Module, entry: PlanEntry | Mapping[str, Any]) -> nn.Module:
    """``block`` pruned as a plan entry says: a pruning entry's ``prune`` ratio or ``rank``
    (group sizes), or the extra ``prune`` ratio of a layer decomposed into a shift block. A
    mapping is a pruning entry: ``{"prune": ratio}`` or ``{"rank": sizes}`` (other keys:
    ``"method"`` only)."""
    if not isinstance(entry, PlanEntry):
        entry = PlanEntry.from_dict({**entry, "method": PRUNE})
    if entry.method == PRUNE and entry.rank is not None:
        return prune_to_sizes(block, entry.rank)
    return prune_shift_block(block, entry.prune)


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
        check_prune_ratio(ratio)
    new = copy.deepcopy(model)
    for name, ratio in ratios.items():
        block = new.get_submodule(name)
        replace_module(new, name, prune_shift_block(block, ratio, criterion=criterion, scope=scope))
    return new
