"""Slice-wise SVD into a shift layer ("Unifying Tensor View"): 1x1 C->R, shift, 1x1 R->F.

A dense kernel ``W`` (F, C, kh, kw) is the sum over its ``kh * kw`` spatial slices
``W_p = W[:, :, a, b]`` (F x C) of "read the input at kernel position ``p``, then mix channels
with ``W_p``". With ``W_p ~= U_p S_p V_p^T`` truncated to rank ``r_p``, the layer becomes

    1x1 conv C -> R (rows sqrt(S_p) V_p^T, grouped by slice)
    -> Shift(group_sizes=r) with the dense layer's padding, stride and dilation
    -> 1x1 conv R -> F (columns U_p sqrt(S_p), + bias),      R = sum_p r_p,

which is exact at full rank (``r_p = min(F, C)``) for every kernel size, stride, padding
(including asymmetric ``'same'``) and dilation: the shift stage reads exactly the input
positions the dense convolution reads. ShiftNet is the case of equal ``r_p`` with 3x3.

Rank spec: an int ``r`` (the same rank for every slice), a list of ``kh * kw`` per-slice ranks
(``0 <= r_p <= min(F, C)``, sum >= 1), or ``{"channels": R}``: ``R`` intermediate channels
given to the globally largest singular values of all slices (Frobenius-optimal for that
``R``). The ratio path uses the last form; a built layer always reports per-slice ranks.
Parameters: ``R (C + F) (+ F bias)``; MACs: ``H W C R + H' W' R F``.

Options: ``cache``, ``solver`` (``"tensorly"``: the slice SVDs by tensorly's
``svd_interface``). ``to_tensorly()``: the kernel is exactly a rank-``R`` CP of
``(F, C, kh, kw)`` whose spatial factors are one-hot (channel ``r`` of slice ``(a, b)`` has
``e_a`` and ``e_b``): a ``CPTensor`` with unit weights and factors ``[last, first^T, one-hot
rows (kh, R), one-hot columns (kw, R)]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from tensorly.cp_tensor import CPTensor

from ..core.shift import Shift
from ..core.spec import ConvSpec
from ..factorize import tensorly_solvers
from ..factorize.cache import default_cache, weight_key
from ..factorize.svd import gram_svd
from .base import DecomposedConv, register
from .layers import pointwise, pointwise_conv, rank_sum_kernel

Ranks = tuple[int, ...]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _slice_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of every spatial slice: U (A, F, m), S (A, m) descending, Vh (A, m, C)."""
    f, c, kh, kw = weight.shape
    slices = weight.permute(2, 3, 0, 1).reshape(kh * kw, f, c)
    return gram_svd(slices)


def _tensorly_slice_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_slice_svd` by tensorly's ``svd_interface``."""
    f, c, kh, kw = weight.shape
    return tensorly_solvers.slice_svd(weight.permute(2, 3, 0, 1).reshape(kh * kw, f, c))


def _largest(singular: torch.Tensor, channels: int) -> Ranks:
    """Per-slice ranks keeping the ``channels`` globally largest singular values (nested)."""
    area, m = singular.shape
    order = torch.sort(singular.reshape(-1), descending=True, stable=True).indices[:channels]
    return tuple(int(n) for n in torch.bincount(order // m, minlength=area))


def _even(spec: ConvSpec, channels: int) -> Ranks:
    """Weight-free split of ``channels`` over the slices: equal, the rest from the centre on."""
    kh, kw = spec.kernel_size
    area = kh * kw
    ranks = [channels // area] * area
    centre = ((kh - 1) // 2) * kw + (kw - 1) // 2
    for p in [centre, *(q for q in range(area) if q != centre)][: channels % area]:
        ranks[p] += 1
    return tuple(ranks)


@register("shift")
class SliceShiftConv(DecomposedConv):
    """1x1 -> shift -> 1x1 from a slice-wise SVD of the kernel (nested in the ranks, cached)."""

    rank_help = (
        "int r (same rank per spatial slice), kh*kw per-slice ranks in [0, min(C, F)], "
        'or {"channels": R}: R channels to the largest singular values of all slices'
    )
    input_stage = "first"
    builds_shift_block = True
    tensorly_solver = "svd_interface"

    def __init__(self, spec: ConvSpec, rank: Any) -> None:
        ranks = _even(spec, rank["channels"]) if isinstance(rank, dict) else tuple(rank)
        super().__init__(spec, ranks)
        total = sum(ranks)
        self.first = pointwise(spec.in_channels, total)
        self.shift = Shift(
            group_sizes=ranks,
            kernel_size=spec.kernel_size,
            dilation=spec.dilation,
            stride=spec.stride,
            padding=spec.padding,
        )
        self.last = pointwise(total, spec.out_channels)

    @classmethod
    def unsupported_reason(cls, spec: ConvSpec) -> str | None:
        reason = super().unsupported_reason(spec)
        if reason is None and spec.kernel_area == 1:
            return "a 1x1 kernel has a single spatial slice and nothing to shift"
        return reason

    @classmethod
    def normalize_rank(cls, spec: ConvSpec, rank: Any) -> Ranks | dict[str, int]:
        m, area = min(spec.in_channels, spec.out_channels), spec.kernel_area
        if isinstance(rank, dict):
            if set(rank) != {"channels"} or not _is_int(rank["channels"]):
                raise ValueError(f'shift rank dict must be {{"channels": R}}, got {rank!r}')
            if not 1 <= rank["channels"] <= area * m:
                raise ValueError(
                    f"shift rank channels={rank['channels']} out of range: must be in "
                    f"[1, {area * m}]"
                )
            return {"channels": int(rank["channels"])}
        if _is_int(rank):
            if not 1 <= rank <= m:
                raise ValueError(f"shift rank {rank} out of range: must be in [1, {m}]")
            return (int(rank),) * area
        if not (
            isinstance(rank, list | tuple) and len(rank) == area and all(_is_int(r) for r in rank)
        ):
            raise ValueError(
                f"shift rank must be an int, {area} per-slice ints or {{'channels': R}}, "
                f"got {rank!r}"
            )
        if not (all(0 <= r <= m for r in rank) and sum(rank) >= 1):
            raise ValueError(
                f"shift ranks {list(rank)} out of range: each must be in [0, {m}], sum >= 1"
            )
        return tuple(int(r) for r in rank)

    @classmethod
    def param_count(cls, spec: ConvSpec, rank: Any) -> int:
        total = rank["channels"] if isinstance(rank, dict) else sum(rank)
        f = spec.out_channels
        return total * (spec.in_channels + f) + (f if spec.bias else 0)

    @classmethod
    def rank_candidates(cls, spec: ConvSpec) -> Iterator[dict[str, int]]:
        m = min(spec.in_channels, spec.out_channels)
        for total in range(1, spec.kernel_area * m + 1):
            yield {"channels": total}

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spec: ConvSpec,
        rank: Any,
        *,
        cache=default_cache,
        solver: str = "autodecomp",
        **_: Any,
    ) -> SliceShiftConv:
        svd = _slice_svd if solver == "autodecomp" else _tensorly_slice_svd
        u, s, vh = cache.get_or_compute(
            f"shift/slices{'' if solver == 'autodecomp' else '/tensorly'}/{weight_key(weight)}",
            lambda: svd(weight.detach().to(torch.float64)),
        )
        ranks = _largest(s, rank["channels"]) if isinstance(rank, dict) else tuple(rank)
        root = s.sqrt()
        first = [root[p, :r, None] * vh[p, :r] for p, r in enumerate(ranks)]
        last = [u[p, :, :r] * root[p, :r] for p, r in enumerate(ranks)]
        module = cls.empty_like(spec, ranks, weight)
        dtype = weight.dtype
        with torch.no_grad():
            module.first.weight.copy_(torch.cat(first).to(dtype)[:, :, None, None])
            module.last.weight.copy_(torch.cat(last, dim=1).to(dtype)[:, :, None, None])
            if bias is not None:
                module.bias.copy_(bias.detach())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.shift(pointwise_conv(x, self.first.weight))
        return pointwise_conv(y, self.last.weight, self.bias)

    def _slice_of(self) -> torch.Tensor:
        """The spatial slice (kernel position) each intermediate channel reads."""
        device = self.first.weight.device
        kh, kw = self.spec.kernel_size
        return torch.repeat_interleave(
            torch.arange(kh * kw, device=device), torch.tensor(self.rank, device=device)
        )

    def dense_weight(self) -> torch.Tensor:
        kh, kw = self.spec.kernel_size
        onehot = F.one_hot(self._slice_of(), kh * kw).to(self.first.weight.dtype)
        dense = rank_sum_kernel(self.last.weight[:, :, 0, 0], self.first.weight[:, :, 0, 0], onehot)
        return dense.reshape(self.spec.out_channels, self.spec.in_channels, kh, kw)

    def to_tensorly(self) -> CPTensor:
        kh, kw = self.spec.kernel_size
        slice_of, dtype = self._slice_of(), self.first.weight.dtype
        factors = [
            self.last.weight[:, :, 0, 0],
            self.first.weight[:, :, 0, 0].T,
            F.one_hot(slice_of // kw, kh).T.to(dtype),
            F.one_hot(slice_of % kw, kw).T.to(dtype),
        ]
        weights = factors[0].new_ones(len(slice_of))
        return CPTensor(
            (
                tensorly_solvers.as_tensorly(weights),
                [tensorly_solvers.as_tensorly(f) for f in factors],
            )
        )

    def macs(self, h: int, w: int) -> int:
        ho, wo = self.spec.output_size(h, w)
        total = sum(self.rank)
        return h * w * self.spec.in_channels * total + ho * wo * total * self.spec.out_channels
