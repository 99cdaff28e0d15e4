"""PDP (pointwise-depthwise-pointwise): 1x1 C->R, kh x kw depthwise, 1x1 R->F."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from tensorly.cp_tensor import CPTensor

from ..core.spec import ConvSpec
from ..factorize.cache import FactorCache, default_cache
from ..factorize.cp_warm import PRECISIONS
from .base import DecomposedConv, register, round_down_width
from .cp import cached_cp, check_cp_rank, cp_tensor, max_cp_rank
from .layers import SpatialConv, pointwise, pointwise_conv, rank_sum_kernel


def _kernel_shape(spec: ConvSpec) -> tuple[int, int, int]:
    f, c, kh, kw = spec.weight_shape
    return (f, c, kh * kw)


@register("pdp")
class PDPConv(DecomposedConv):
    """Rank-R CP of the 3-way kernel ``(F, C, kh*kw)`` as pointwise, depthwise, pointwise.

    ``dense_weight()[f, c, i, j] = sum_r last[f, r] * depthwise[r, i, j] * first[r, c]``.
    Initialised by CP-ALS of the reshaped kernel in float64 with balanced factor norms.
    Options: as :class:`~autodecomp.decompositions.cp.CPConv`'s (``precision``, ``warm``,
    ``max_iter``, ``tol``, ``init``, ``seed``, ``max_spread``, ``cache``, ``solver``).

    ``to_tensorly()``: the ``CPTensor`` of the 3-way kernel ``(F, C, kh*kw)``, unit weights,
    factors ``[last, first^T, depthwise^T]`` (the kernel is its reconstruction reshaped).
    """

    rank_help = "R: int in [1, F*C*kh*kw / max(F, C, kh*kw)]"
    input_stage = "first"
    tensorly_solver = "parafac"
    precisions = tuple(PRECISIONS)  # the ``precision`` option's values (export polishes)

    def __init__(self, spec: ConvSpec, rank: int) -> None:
        super().__init__(spec, rank)
        self.first = pointwise(spec.in_channels, rank)
        self.depthwise = SpatialConv(spec, rank, rank, groups=rank)
        self.last = pointwise(rank, spec.out_channels)

    @classmethod
    def _aligned(cls, spec: ConvSpec, rank: int, multiple: int) -> int:
        return round_down_width(rank, multiple)  # the channels of the depthwise stage(s)

    @classmethod
    def normalize_rank(cls, spec: ConvSpec, rank: Any) -> int:
        return check_cp_rank("pdp", _kernel_shape(spec), rank)

    @classmethod
    def param_count(cls, spec: ConvSpec, rank: int) -> int:
        f, c, area = _kernel_shape(spec)
        return rank * (c + area + f) + (f if spec.bias else 0)

    @classmethod
    def rank_candidates(cls, spec: ConvSpec) -> Iterator[int]:
        return iter(range(1, max_cp_rank(_kernel_shape(spec)) + 1))

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spec: ConvSpec,
        rank: int,
        *,
        cache: FactorCache = default_cache,
        **opts: Any,
    ) -> PDPConv:
        tensor = weight.reshape(_kernel_shape(spec))
        out_f, in_c, spatial = cached_cp("pdp", weight, tensor, rank, cache, opts)
        kh, kw = spec.kernel_size
        module = cls.empty_like(spec, rank, weight)
        dtype = weight.dtype
        with torch.no_grad():
            module.first.weight.copy_(in_c.T.reshape(rank, -1, 1, 1).to(dtype))
            module.depthwise.weight.copy_(spatial.T.reshape(rank, 1, kh, kw).to(dtype))
            module.last.weight.copy_(out_f.reshape(-1, rank, 1, 1).to(dtype))
            if bias is not None:
                module.bias.copy_(bias.detach())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.depthwise(pointwise_conv(x, self.first.weight, channels_last=True))
        return pointwise_conv(y, self.last.weight, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return rank_sum_kernel(
            self.last.weight[:, :, 0, 0], self.first.weight[:, :, 0, 0], self.depthwise.weight[:, 0]
        )

    def to_tensorly(self) -> CPTensor:
        return cp_tensor(
            [
                self.last.weight[:, :, 0, 0],
                self.first.weight[:, :, 0, 0].T,
                self.depthwise.weight[:, 0].flatten(1).T,
            ]
        )

    def macs(self, h: int, w: int) -> int:
        s, r = self.spec, self.rank
        ho, wo = s.output_size(h, w)
        return h * w * s.in_channels * r + ho * wo * r * (s.kernel_area + s.out_channels)
