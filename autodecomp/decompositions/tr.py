"""Tensor-Ring conv (Wang et al. 2018): ``W[f, c, s] = sum U[a,c,b] K[b,s,e] V[e,f,a]``.

Forward: 1x1 ``C -> ra*rb``; fold the ``ra`` ring slices into the batch; ``kh x kw`` conv
``rb -> re`` (stride, padding, dilation here); unfold; 1x1 ``ra*re -> F`` with the bias.
Initialisation: the better of TR-SVD and an algebraic ring decomposition that is exact for
kernels of ring rank ``(ra, r, r)`` (see :mod:`autodecomp.factorize.tensor_train`), refined
by ALS within a multiply-add budget, or (option ``warm``) warm-started from an anchor rank's
fit. Not nested in the rank: results are cached per (weight, rank, options), the two mode
bases once per weight.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any

import torch
from tensorly.tr_tensor import TRTensor

from ..core.errors import DecompositionError
from ..core.spec import ConvSpec
from ..factorize import tensorly_solvers
from ..factorize.cache import default_cache, weight_key
from ..factorize.ring_warm import fit_ring, ring_problems
from ..factorize.svd import left_singular_vectors
from .base import DecomposedConv, register
from .layers import SpatialConv, pointwise, pointwise_conv

TRRank = list[int]


def _mode_bases(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors of the mode-C and mode-F unfoldings of ``t (C, S, F)``."""
    c, _, f = t.shape
    return left_singular_vectors(t.reshape(c, -1)), left_singular_vectors(
        t.permute(2, 0, 1).reshape(f, -1)
    )


def _problems(spec: ConvSpec, ra: int, rb: int, re: int) -> list[str]:
    return ring_problems((spec.in_channels, spec.kernel_area, spec.out_channels), (ra, rb, re))


@register("tr")
class TensorRingConv(DecomposedConv):
    """1x1 ``C -> ra*rb``; ``kh x kw`` conv ``rb -> re`` per ring slice; 1x1 ``ra*re -> F``.

    Options: ``als_iters``, ``als_budget``, ``tol`` (the ALS refinement), ``warm`` (start a
    rank from its anchor rank's fit, :mod:`~autodecomp.factorize.ring_warm`; off by default:
    measured not to pay, ``docs/solvers.md``), ``cache``,
    ``solver`` (``"tensorly"``: tensorly's ``tensor_ring``, TR-SVD of ``(C, kh*kw, F)`` from
    the C mode without refinement; exact for ``ra = 1`` only, see the module docstring).

    ``to_tensorly()``: the ``TRTensor`` of the 3-way kernel ``(F, C, kh*kw)`` with cores
    ``[V (re, F, ra), U (ra, C, rb), K (rb, kh*kw, re)]`` (the kernel is its reconstruction
    reshaped).
    """

    tensorly_solver = "tensor_ring"
    rank_help = (
        "[ra, rb, re] with ra*rb <= C, ra*re <= F, rb <= kh*kw*re, re <= kh*kw*rb; "
        "an int r means [r, r, r]"
    )
    input_stage = "first"

    def __init__(self, spec: ConvSpec, rank: TRRank) -> None:
        super().__init__(spec, rank)
        ra, rb, re = rank
        self.first = pointwise(spec.in_channels, ra * rb)
        self.core = SpatialConv(spec, rb, re)
        self.last = pointwise(ra * re, spec.out_channels)

    # ---- rank spec -------------------------------------------------------------------------
    @classmethod
    def normalize_rank(cls, spec: ConvSpec, rank: Any) -> TRRank:
        if isinstance(rank, int) and not isinstance(rank, bool):
            rank = [rank, rank, rank]
        if not (isinstance(rank, list | tuple) and len(rank) == 3) or any(
            isinstance(r, bool) for r in rank
        ):
            raise ValueError(f"tr rank must be an int or [ra, rb, re], got {rank!r}")
        try:
            ra, rb, re = (operator.index(r) for r in rank)
        except TypeError:
            raise ValueError(
                f"tr rank must be an int or [ra, rb, re] of ints, got {rank!r}"
            ) from None
        problems = _problems(spec, ra, rb, re)
        if problems:
            raise ValueError(f"tr ranks {[ra, rb, re]} out of range: {'; '.join(problems)}")
        return [ra, rb, re]

    @classmethod
    def param_count(cls, spec: ConvSpec, rank: TRRank) -> int:
        ra, rb, re = rank
        c, f = spec.in_channels, spec.out_channels
        return ra * c * rb + rb * spec.kernel_area * re + re * f * ra + (f if spec.bias else 0)

    @classmethod
    def rank_candidates(cls, spec: ConvSpec) -> Iterator[TRRank]:
        """``[ra, r, r]``: ``ra`` and ``r`` grow in turn while ``ra*r <= min(C, F)``; then, along
        that bound, ``ra`` shrinks as ``r`` grows (a larger middle conv) while params grow.

        A 2-tap kernel (1x2, 2x1) keeps ``ra = 1``: its rings of ``ra, r > 1`` are not
        identifiable, so no initialisation is exact for them."""
        bound = min(spec.in_channels, spec.out_channels)
        if spec.kernel_area == 2:
            yield from ([1, r, r] for r in range(1, bound + 1))
            return
        ra = r = 1
        yield [1, 1, 1]
        grew = True
        while grew:
            grew = False
            for grow_ring in (True, False):
                nra, nr = (ra + 1, r) if grow_ring else (ra, r + 1)
                if not _problems(spec, nra, nr, nr):
                    ra, r, grew = nra, nr, True
                    yield [ra, r, r]
        params = cls.param_count(spec, [ra, r, r])
        for nra in range(ra - 1, 0, -1):
            rank = [nra, bound // nra, bound // nra]
            if not _problems(spec, *rank) and cls.param_count(spec, rank) > params:
                params = cls.param_count(spec, rank)
                yield rank

    # ---- initialisation ----------------------------------------------------------------------
    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spec: ConvSpec,
        rank: TRRank,
        *,
        als_iters: int = 10,
        als_budget: float = 4e9,
        tol: float = 1e-6,
        warm: bool = False,
        cache=default_cache,
        solver: str = "autodecomp",
        **_: Any,
    ) -> TensorRingConv:
        ra, rb, re = rank
        f, c, kh, kw = weight.shape

        def tensor() -> torch.Tensor:  # (C, kh*kw, F), built only on a cache miss
            if not bool(torch.isfinite(weight).all()):
                raise DecompositionError("tr cannot decompose a kernel with NaN or inf entries")
            return weight.detach().to(torch.float64).reshape(f, c, kh * kw).permute(1, 2, 0)

        wkey = weight_key(weight)
        try:
            if solver == "tensorly":
                u, k, v = cache.get_or_compute(
                    f"tr/{wkey}/{ra},{rb},{re}/tensorly",
                    lambda: tensorly_solvers.ring(tensor(), [ra, rb, re, ra]),
                )
            else:
                u, k, v = fit_ring(
                    tensor,
                    (c, kh * kw, f),
                    rank,
                    lambda: cache.get_or_compute(f"tr/{wkey}/bases", lambda: _mode_bases(tensor())),
                    cache=cache,
                    key=f"tr/{wkey}",
                    warm=warm,
                    als_iters=als_iters,
                    als_budget=als_budget,
                    tol=tol,
                )
        except torch.linalg.LinAlgError as err:
            raise DecompositionError(f"tr decomposition at rank {rank} failed: {err}") from err
        norms = [float(x.norm()) for x in (u, k, v)]
        if not all(0 < n < float("inf") for n in norms):
            raise DecompositionError(f"tr decomposition at rank {rank} produced degenerate cores")
        mean = (norms[0] * norms[1] * norms[2]) ** (1 / 3)
        u, k, v = (x * (mean / n) for x, n in zip((u, k, v), norms, strict=True))
        module = cls.empty_like(spec, rank, weight)
        dtype = weight.dtype
        with torch.no_grad():
            module.first.weight.copy_(u.permute(0, 2, 1).reshape(ra * rb, c, 1, 1).to(dtype))
            module.core.weight.copy_(k.permute(2, 0, 1).reshape(re, rb, kh, kw).to(dtype))
            module.last.weight.copy_(v.permute(1, 2, 0).reshape(f, ra * re, 1, 1).to(dtype))
            if bias is not None:
                module.bias.copy_(bias.detach())
        return module

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ra, rb, re = self.rank
        n = x.shape[0]
        y = pointwise_conv(x, self.first.weight)
        y = self.core(y.reshape(-1, rb, *y.shape[-2:]))  # (n*ra, rb, h, w): no traced shape math
        y = y.reshape(n, ra * re, *y.shape[-2:])
        return pointwise_conv(y, self.last.weight, self.bias)

    def _ring(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cores ``U (ra, C, rb)``, ``K (rb, kh*kw, re)``, ``V (re, F, ra)``."""
        ra, rb, re = self.rank
        s = self.spec
        u = self.first.weight.reshape(ra, rb, s.in_channels).permute(0, 2, 1)
        k = self.core.weight.reshape(re, rb, s.kernel_area).permute(1, 2, 0)
        v = self.last.weight.reshape(s.out_channels, ra, re).permute(2, 0, 1)
        return u, k, v

    def dense_weight(self) -> torch.Tensor:
        u, k, v = self._ring()
        return torch.einsum("acb,bse,efa->fcs", u, k, v).reshape(self.spec.weight_shape)

    def to_tensorly(self) -> TRTensor:
        u, k, v = self._ring()
        return TRTensor([tensorly_solvers.as_tensorly(c) for c in (v, u, k)])

    def macs(self, h: int, w: int) -> int:
        ra, rb, re = self.rank
        s = self.spec
        ho, wo = s.output_size(h, w)
        return (
            h * w * s.in_channels * ra * rb
            + ho * wo * ra * rb * re * s.kernel_area
            + ho * wo * ra * re * s.out_channels
        )
