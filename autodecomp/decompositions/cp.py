"""CP (Lebedev et al. 2015): 1x1 C->R, kh x 1 depthwise, 1 x kw depthwise, 1x1 R->F."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator
from typing import Any

import torch
from tensorly.cp_tensor import CPTensor

from ..core.spec import ConvSpec
from ..factorize import tensorly_solvers
from ..factorize.cache import FactorCache, default_cache, weight_key
from ..factorize.cp_warm import PRECISIONS, check_precision, fit_cp
from .base import DecomposedConv, register, round_down_width
from .layers import SpatialConv, pointwise, pointwise_conv, rank_sum_kernel

_SOLVER_OPTIONS = ("max_iter", "tol", "init", "seed", "max_spread", "solver", "precision", "warm")


def max_cp_rank(shape: tuple[int, ...]) -> int:
    """Largest useful CP rank of a tensor: the product of its mode sizes over the largest."""
    return math.prod(shape) // max(shape)


def check_cp_rank(method: str, shape: tuple[int, ...], rank: Any) -> int:
    """Validate an int rank in ``[1, max_cp_rank(shape)]``."""
    bound = max_cp_rank(shape)
    try:
        value = operator.index(rank)
    except TypeError:
        value = None
    if value is None or isinstance(rank, bool) or not 1 <= value <= bound:
        raise ValueError(f"{method} rank must be an int in the range [1, {bound}], got {rank!r}")
    return value


def cached_cp(
    method: str,
    weight: torch.Tensor,
    tensor: torch.Tensor,
    rank: int,
    cache: FactorCache,
    opts: dict[str, Any],
) -> list[torch.Tensor]:
    """Balanced CP factors of ``tensor`` (a reshaped ``weight``), cached per layer and rank.

    By :func:`~autodecomp.factorize.cp_warm.fit_cp`: ``precision`` ``"search"`` (default) or
    ``"full"``, ``warm`` (default true: warm-started from the anchor rank's fit), and
    :func:`~autodecomp.factorize.cp_als.cp_als`'s ``max_iter``, ``tol``, ``init``, ``seed``,
    ``max_spread`` overriding the precision's. ``solver="tensorly"`` fits them by tensorly's
    ``parafac`` (pytorch backend, float64) instead, cold, with the same cp_als options
    (``tol`` in its own convergence test; ``precision`` and ``warm`` do not apply).
    """
    unknown = set(opts) - set(_SOLVER_OPTIONS)
    if unknown:
        raise ValueError(
            f"unknown {method} option(s) {sorted(unknown)}; valid: {', '.join(_SOLVER_OPTIONS)}"
        )
    opts = dict(opts)
    solver = opts.pop("solver", "autodecomp")
    precision = check_precision(opts.pop("precision", "search"))
    warm = opts.pop("warm", True)
    if not isinstance(warm, bool):
        raise ValueError(f"{method} option warm must be true or false, got {warm!r}")
    if solver == "autodecomp":
        key = f"{method}/cp_als-v2/{weight_key(weight)}"
        return fit_cp(tensor, rank, cache=cache, key=key, precision=precision, warm=warm,
                      options=opts)  # fmt: skip
    options = "/".join(f"{k}={opts[k]!r}" for k in sorted(opts))
    key = f"{method}/tensorly-parafac-v1/{weight_key(weight)}/{rank}/{options}"

    def compute() -> list[torch.Tensor]:
        weights, factors, _ = tensorly_solvers.cp(tensor.detach().to(torch.float64), rank, **opts)
        return [factors[0] * weights, *factors[1:]]

    return cache.get_or_compute(key, compute)


def cp_tensor(factors: list[torch.Tensor]) -> CPTensor:
    """A ``CPTensor`` with unit weights of torch ``factors``, on the active tensorly backend."""
    weights = factors[0].new_ones(factors[0].shape[1])
    return CPTensor(
        (tensorly_solvers.as_tensorly(weights), [tensorly_solvers.as_tensorly(f) for f in factors])
    )


@register("cp")
class CPConv(DecomposedConv):
    """Rank-R CP of the 4D kernel as four convolutions (pointwise, two 1D depthwise, pointwise).

    ``dense_weight()[f, c, i, j] = sum_r last[f, r] * vertical[r, i] * horizontal[r, j] *
    first[r, c]``. Initialised by CP-ALS of the kernel in float64 with balanced factor norms.
    Options: ``precision`` (``"search"``, default, or ``"full"``: see
    :mod:`~autodecomp.factorize.cp_warm`), ``warm``, ``max_iter``, ``tol``, ``init``, ``seed``,
    ``max_spread`` (see ``cp_als``), ``cache``, ``solver`` (``"tensorly"``: tensorly's
    ``parafac`` instead of ``cp_als``).

    ``to_tensorly()``: the ``CPTensor`` of the 4-way kernel ``(F, C, kh, kw)``, unit weights,
    factors ``[last, first^T, vertical, horizontal]`` (each ``(mode size, R)``).
    """

    rank_help = "R: int in [1, F*C*kh*kw / max(F, C, kh, kw)]"
    input_stage = "first"
    tensorly_solver = "parafac"
    precisions = tuple(PRECISIONS)  # the ``precision`` option's values (export polishes)

    def __init__(self, spec: ConvSpec, rank: int) -> None:
        super().__init__(spec, rank)
        self.first = pointwise(spec.in_channels, rank)
        self.vertical = SpatialConv(spec, rank, rank, axes="h", groups=rank)
        self.horizontal = SpatialConv(spec, rank, rank, axes="w", groups=rank)
        self.last = pointwise(rank, spec.out_channels)

    @classmethod
    def _aligned(cls, spec: ConvSpec, rank: int, multiple: int) -> int:
        return round_down_width(rank, multiple)  # the channels of the depthwise stage(s)

    @classmethod
    def normalize_rank(cls, spec: ConvSpec, rank: Any) -> int:
        return check_cp_rank("cp", spec.weight_shape, rank)

    @classmethod
    def param_count(cls, spec: ConvSpec, rank: int) -> int:
        f, c, kh, kw = spec.weight_shape
        return rank * (c + kh + kw + f) + (f if spec.bias else 0)

    @classmethod
    def rank_candidates(cls, spec: ConvSpec) -> Iterator[int]:
        return iter(range(1, max_cp_rank(spec.weight_shape) + 1))

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
    ) -> CPConv:
        out_f, in_c, vert, horiz = cached_cp("cp", weight, weight, rank, cache, opts)
        module = cls.empty_like(spec, rank, weight)
        dtype = weight.dtype
        with torch.no_grad():
            module.first.weight.copy_(in_c.T.reshape(rank, -1, 1, 1).to(dtype))
            module.vertical.weight.copy_(vert.T.reshape(rank, 1, -1, 1).to(dtype))
            module.horizontal.weight.copy_(horiz.T.reshape(rank, 1, 1, -1).to(dtype))
            module.last.weight.copy_(out_f.reshape(-1, rank, 1, 1).to(dtype))
            if bias is not None:
                module.bias.copy_(bias.detach())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.horizontal(self.vertical(pointwise_conv(x, self.first.weight, channels_last=True)))
        return pointwise_conv(y, self.last.weight, self.bias)

    def dense_weight(self) -> torch.Tensor:
        spatial = self.vertical.weight[:, 0, :, 0, None] * self.horizontal.weight[:, 0, 0, None, :]
        return rank_sum_kernel(self.last.weight[:, :, 0, 0], self.first.weight[:, :, 0, 0], spatial)

    def to_tensorly(self) -> CPTensor:
        factors = [
            self.last.weight[:, :, 0, 0],
            self.first.weight[:, :, 0, 0].T,
            self.vertical.weight[:, 0, :, 0].T,
            self.horizontal.weight[:, 0, 0, :].T,
        ]
        return cp_tensor(factors)

    def macs(self, h: int, w: int) -> int:
        s, r = self.spec, self.rank
        kh, kw = s.kernel_size
        ho, wo = s.output_size(h, w)
        return (
            h * w * s.in_channels * r
            + ho * w * r * kh
            + ho * wo * r * kw
            + ho * wo * s.out_channels * r
        )
