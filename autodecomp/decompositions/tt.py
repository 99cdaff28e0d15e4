"""Tensor-Train conv (Garipov et al. 2016): a spatial core, then ``d`` channel cores.

With ``C = c_1...c_d`` and ``F = f_1...f_d`` the kernel is viewed as the tensor
``(kh*kw, (c_1,f_1), ..., (c_d,f_d))`` and factorised by TT-SVD into a spatial core
``K (kh*kw, r_0)`` and channel cores ``G_k (r_{k-1}, c_k, f_k, r_k)`` with ``r_d = 1``.
Forward: every input channel is convolved with the ``r_0`` spatial filters (stride, padding
and dilation here), the channel cores are contracted one by one with batched matmuls (input
channels taken in reverse factor order, so no intermediate is permuted), and the last core
is a grouped 1x1 conv that also adds the bias.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from tensorly.tt_tensor import TTTensor
from torch import nn

from ..core.errors import DecompositionError
from ..core.spec import ConvSpec
from ..factorize import tensorly_solvers
from ..factorize.cache import default_cache, weight_key
from ..factorize.tensor_train import tt_svd
from .base import DecomposedConv, register
from .layers import SpatialConv

TTRank = dict[str, list[int]]
_MAX_DEFAULT_DEPTH = 6


@cache
def _factorisations(n: int, d: int, cap: int) -> tuple[tuple[int, ...], ...]:
    """Non-increasing ``d``-tuples of factors ``<= cap`` whose product is ``n``."""
    if d == 1:
        return ((n,),) if n <= cap else ()
    return tuple(
        (k, *rest)
        for k in range(min(n, cap), 0, -1)
        if n % k == 0 and k**d >= n
        for rest in _factorisations(n // k, d - 1, k)
    )


@cache
def default_factors(c: int, f: int, d: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Balanced channel factorisations: core sizes ``c_k f_k`` as equal as possible.

    Large input factors are paired with small output factors; cores are ordered by
    decreasing size; prime channel counts get factors of 1.
    """

    def balance(pair: tuple[tuple[int, ...], tuple[int, ...]]) -> tuple:
        cs, fs = pair
        sizes = sorted((a * b for a, b in zip(cs, fs, strict=True)), reverse=True)
        return (sizes, max(cs), max(fs), pair)

    pairs = ((cs, fs[::-1]) for cs in _factorisations(c, d, c) for fs in _factorisations(f, d, f))
    cs, fs = min(pairs, key=balance)
    order = sorted(range(d), key=lambda k: -cs[k] * fs[k])
    return tuple(cs[k] for k in order), tuple(fs[k] for k in order)


def default_depth(spec: ConvSpec) -> int:
    """Number of channel cores: 3 for layers with ``C*F >= 32*32``, else 2."""
    return 3 if spec.in_channels * spec.out_channels >= 1024 else 2


def max_ranks(spec: ConvSpec, in_factors: Sequence[int], out_factors: Sequence[int]) -> list[int]:
    """Maximal TT ranks ``r_0..r_{d-1}``: the smaller side of each unfolding."""
    sizes = [c * f for c, f in zip(in_factors, out_factors, strict=True)]
    return [
        min(spec.kernel_area * math.prod(sizes[:k]), math.prod(sizes[k:]))
        for k in range(len(sizes))
    ]


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"tt {what} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"tt {what} must be an int, got {value!r}") from None


def _int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"tt {what} must be a non-empty list of ints, got {value!r}")
    return [_int(v, what) for v in value]


def _parse(rank: Any) -> tuple[list[int] | None, list[int] | None, Any]:
    """Split a rank spec into (in factors, out factors, ranks or int)."""
    if isinstance(rank, Mapping):
        unknown = set(rank) - {"in", "out", "ranks"}
        if unknown or "ranks" not in rank or (("in" in rank) != ("out" in rank)):
            raise ValueError(
                f"tt rank dict must have 'ranks' and optionally both 'in' and 'out', got {rank!r}"
            )
        cs = _int_list(rank["in"], "'in' factors") if "in" in rank else None
        fs = _int_list(rank["out"], "'out' factors") if "out" in rank else None
        return cs, fs, rank["ranks"]
    if (
        isinstance(rank, list | tuple)
        and len(rank) == 3
        and all(isinstance(x, list | tuple) for x in rank[:2])
    ):
        return _int_list(rank[0], "'in' factors"), _int_list(rank[1], "'out' factors"), rank[2]
    if isinstance(rank, list | tuple):
        return None, None, _int_list(rank, "ranks")
    if isinstance(rank, int) and not isinstance(rank, bool):
        return None, None, rank
    raise ValueError(
        "tt rank must be an int, a list of ranks, (in, out, ranks) or "
        f"{{'in': [...], 'out': [...], 'ranks': [...]}}, got {rank!r}"
    )


def _check_chain(spec: ConvSpec, cs: list[int], fs: list[int], ranks: list[int]) -> None:
    sizes = [c * f for c, f in zip(cs, fs, strict=True)]
    bound = max_ranks(spec, cs, fs)
    full = [*ranks, 1]
    problems = [
        f"r_{k}={r} not in [1, {bound[k]}]" for k, r in enumerate(ranks) if not 1 <= r <= bound[k]
    ]
    for k, size in enumerate(sizes):
        if full[k + 1] > full[k] * size:
            problems.append(f"r_{k + 1}={full[k + 1]} > r_{k}*c_{k + 1}*f_{k + 1}={full[k] * size}")
        if full[k] > size * full[k + 1]:
            problems.append(f"r_{k}={full[k]} > c_{k + 1}*f_{k + 1}*r_{k + 1}={size * full[k + 1]}")
    if problems:
        raise ValueError(
            f"tt ranks {ranks} invalid for in={cs}, out={fs}: {'; '.join(problems)} "
            f"(each r_k must be in [1, maximal TT rank], maximal TT ranks {bound}; "
            "neighbours must satisfy r_k <= r_(k-1)*c_k*f_k and r_(k-1) <= c_k*f_k*r_k, r_d = 1)"
        )


@register("tt")
class TensorTrainConv(DecomposedConv):
    """Spatial core conv, then channel cores ``G_k (r_{k-1}, c_k, f_k, r_k)`` by matmul.

    Options: ``cache``, ``solver`` (``"tensorly"``: tensorly's ``tensor_train``, the same
    TT-SVD, computed per rank instead of nested).

    ``to_tensorly()``: the ``TTTensor`` of the kernel viewed as ``(kh*kw, c_1*f_1, ...,
    c_d*f_d)`` (index ``(c_k, f_k)`` row-major) with cores ``[K (1, kh*kw, r_0), G_1 (r_0,
    c_1*f_1, r_1), ..., G_d (r_{d-1}, c_d*f_d, 1)]``; :meth:`kernel_from_tensorly` permutes
    its reconstruction back to ``(F, C, kh, kw)``.
    """

    tensorly_solver = "tensor_train"
    rank_help = (
        "int r (every TT rank r, capped at its maximum), a list [r_0, ..., r_{d-1}] with "
        "balanced channel factors, or {'in': [c_1..c_d], 'out': [f_1..f_d], 'ranks': [...]}"
    )

    def __init__(self, spec: ConvSpec, rank: TTRank) -> None:
        super().__init__(spec, rank)
        self.in_factors = list(rank["in"])
        self.out_factors = list(rank["out"])
        self.ranks = list(rank["ranks"])
        bonds = [*self.ranks, 1]
        self.spatial = SpatialConv(spec, 1, self.ranks[0])
        self.cores = nn.ParameterList(
            nn.Parameter(torch.zeros(bonds[k], c, f, bonds[k + 1]))
            for k, (c, f) in enumerate(zip(self.in_factors, self.out_factors, strict=True))
        )

    # ---- rank spec -------------------------------------------------------------------------
    @classmethod
    def normalize_rank(cls, spec: ConvSpec, rank: Any) -> TTRank:
        cs, fs, ranks = _parse(rank)
        c, f = spec.in_channels, spec.out_channels
        if cs is None:
            d = len(ranks) if isinstance(ranks, list | tuple) else default_depth(spec)
            if d > _MAX_DEFAULT_DEPTH:
                raise ValueError(
                    f"tt with default channel factors must have 1 to {_MAX_DEFAULT_DEPTH} "
                    f"ranks, got {d}; give 'in' and 'out' factors for more cores"
                )
            cs, fs = (list(x) for x in default_factors(c, f, d))
        if len(cs) != len(fs) or math.prod(cs) != c or math.prod(fs) != f or min(cs + fs) < 1:
            raise ValueError(
                f"tt channel factors invalid: 'in' {cs} must be positive and multiply to C={c}, "
                f"'out' {fs} to F={f}, with the same length"
            )
        bound = max_ranks(spec, cs, fs)
        if isinstance(ranks, list | tuple):
            ranks = _int_list(ranks, "ranks")
            if len(ranks) != len(cs):
                raise ValueError(
                    f"tt needs {len(cs)} ranks for {len(cs)} channel cores, got {ranks}"
                )
        else:
            r = _int(ranks, "rank")
            if not 1 <= r <= max(bound):
                raise ValueError(
                    f"tt rank {r} out of range: an int rank must be in [1, {max(bound)}] for "
                    f"this layer (maximal TT ranks {bound} with in={cs}, out={fs})"
                )
            ranks = [min(r, b) for b in bound]
        _check_chain(spec, cs, fs, ranks)
        return {"in": list(cs), "out": list(fs), "ranks": list(ranks)}

    @classmethod
    def param_count(cls, spec: ConvSpec, rank: TTRank) -> int:
        bonds = [*rank["ranks"], 1]
        cores = sum(
            bonds[k] * c * f * bonds[k + 1]
            for k, (c, f) in enumerate(zip(rank["in"], rank["out"], strict=True))
        )
        return spec.kernel_area * bonds[0] + cores + (spec.out_channels if spec.bias else 0)

    @classmethod
    def rank_candidates(cls, spec: ConvSpec) -> Iterator[TTRank]:
        cs, fs = default_factors(spec.in_channels, spec.out_channels, default_depth(spec))
        bound = max_ranks(spec, cs, fs)
        previous = None
        for r in range(1, max(bound) + 1):
            ranks = [min(r, b) for b in bound]
            if ranks != previous:
                previous = ranks
                yield {"in": list(cs), "out": list(fs), "ranks": ranks}

    # ---- initialisation ----------------------------------------------------------------------
    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spec: ConvSpec,
        rank: TTRank,
        *,
        cache=default_cache,
        solver: str = "autodecomp",
        **_: Any,
    ) -> TensorTrainConv:
        cs, fs, ranks = rank["in"], rank["out"], rank["ranks"]
        sizes = [c * f for c, f in zip(cs, fs, strict=True)]
        store = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float64
        key = f"tt/{weight_key(weight)}/{cs}x{fs}"
        if solver == "tensorly":
            cores = cache.get_or_compute(
                f"{key}/tensorly/{ranks}",
                lambda: tensorly_solvers.tt(_tt_tensor(weight, cs, fs), [1, *ranks, 1]),
            )
            factors = [cores[0][0], *cores[1:]]
        else:
            factors = tt_svd(
                lambda: _tt_tensor(weight, cs, fs),
                (spec.kernel_area, *sizes),
                ranks,
                cache=cache,
                key=key,
                store_dtype=store,
            )
        module = cls.empty_like(spec, rank, weight)
        kh, kw = spec.kernel_size
        with torch.no_grad():
            module.spatial.weight.copy_(factors[0].T.reshape(ranks[0], 1, kh, kw))
            for core, factor in zip(module.cores, factors[1:], strict=True):
                core.copy_(factor.reshape(core.shape))
            if bias is not None:
                module.bias.copy_(bias.detach())
        return module

    # ---- forward ------------------------------------------------------------------------------
    def _core_matrix(self, k: int) -> torch.Tensor:
        """Core ``k`` as a matrix: rows ``(r_{k+1}, f_k)``, columns ``(c_k, r_k)``.

        Shapes come from Python ints, never from traced tensor sizes, so fvcore sees no
        shape arithmetic.
        """
        bonds = [*self.ranks, 1]
        c, f = self.in_factors[k], self.out_factors[k]
        return self.cores[k].permute(3, 2, 1, 0).reshape(bonds[k + 1] * f, c * bonds[k])

    def _last_weight(self) -> torch.Tensor:
        """The last core as a grouped 1x1 conv weight: one ``(f_d, c_d*r)`` block per group."""
        c, f, r = self.in_factors[-1], self.out_factors[-1], self.ranks[-1]
        block = self.cores[-1].permute(2, 1, 0, 3).reshape(f, c * r)
        groups = self.spec.out_channels // f
        return block.expand(groups, f, c * r).reshape(self.spec.out_channels, c * r, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        cs, fs, d, ranks = self.in_factors, self.out_factors, len(self.in_factors), self.ranks
        if d > 1:  # channels (c_1..c_d) -> (c_d..c_1): c_1 lands next to r_0 below
            x = x.reshape(n, *cs, h, w).permute(0, *range(d, 0, -1), d + 1, d + 2)
            x = x.reshape(n, c, h, w)
        y = self.spatial(x.reshape(-1, 1, h, w))  # (n c_d..c_1, r_0, ho, wo)
        ho, wo = y.shape[-2:]
        # state (n c_d..c_{k+1} c_k, r_k, f_{k-1}..f_1 P): each core is one batched matmul of
        # its (r_{k+1} f_k, c_k r_k) matrix, with views (no copies, no shape arithmetic for
        # fvcore) in between
        y = y.flatten(2)
        for k in range(d - 1):
            y = y.unflatten(0, (-1, cs[k])).flatten(1, 2)
            y = torch.bmm(self._core_matrix(k).expand(y.shape[0], -1, -1), y)
            y = y.unflatten(1, (ranks[k + 1], fs[k])).flatten(2, 3)
        # (n, c_d, r, f_{d-1}..f_1, P) -> (n, f_1..f_{d-1}, c_d, r, P): last core as grouped 1x1
        y = y.reshape(n, cs[-1], ranks[-1], *fs[-2::-1], ho, wo)
        y = y.permute(0, *range(d + 1, 2, -1), 1, 2, d + 2, d + 3).reshape(n, -1, ho, wo)
        groups = self.spec.out_channels // fs[-1]
        return F.conv2d(y, self._last_weight(), self.bias, groups=groups)

    def dense_weight(self) -> torch.Tensor:
        s = self.spec
        t = self.spatial.weight.reshape(self.ranks[0], -1).T[:, None, None, :]  # (S, 1, 1, r_0)
        for core in self.cores:
            t = torch.einsum("sija,acfb->sicjfb", t, core)
            t = t.reshape(t.shape[0], t.shape[1] * t.shape[2], t.shape[3] * t.shape[4], -1)
        return t[..., 0].permute(2, 1, 0).reshape(s.weight_shape)

    def to_tensorly(self) -> TTTensor:
        spatial = self.spatial.weight.reshape(self.ranks[0], -1).T[None]
        cores = [spatial, *(core.flatten(1, 2) for core in self.cores)]
        return TTTensor([tensorly_solvers.as_tensorly(c) for c in cores])

    def kernel_from_tensorly(self, full: Any) -> torch.Tensor:
        cs, fs, d = self.in_factors, self.out_factors, len(self.in_factors)
        t = tensorly_solvers.from_tensorly(full)
        t = t.reshape(-1, *(n for pair in zip(cs, fs, strict=True) for n in pair))
        t = t.permute(0, *range(1, 2 * d, 2), *range(2, 2 * d + 1, 2))
        s = self.spec
        return (
            t.reshape(s.kernel_area, s.in_channels, s.out_channels)
            .permute(2, 1, 0)
            .reshape(s.weight_shape)
        )

    def macs(self, h: int, w: int) -> int:
        ho, wo = self.spec.output_size(h, w)
        cs, fs, bonds = self.in_factors, self.out_factors, [*self.ranks, 1]
        channel = sum(
            math.prod(fs[:k]) * math.prod(cs[k + 1 :]) * cs[k] * fs[k] * bonds[k] * bonds[k + 1]
            for k in range(len(cs))
        )
        return ho * wo * (self.spec.in_channels * bonds[0] * self.spec.kernel_area + channel)


def _tt_tensor(weight: torch.Tensor, cs: Sequence[int], fs: Sequence[int]) -> torch.Tensor:
    """The kernel as ``(kh*kw, c_1*f_1, ..., c_d*f_d)`` in float64 (built on cache misses only)."""
    if not bool(torch.isfinite(weight).all()):
        raise DecompositionError("tt cannot decompose a kernel with NaN or inf entries")
    f, c, kh, kw = weight.shape
    d = len(cs)
    t = weight.detach().to(torch.float64).reshape(f, c, kh * kw).permute(2, 1, 0)
    t = t.reshape(kh * kw, *cs, *fs)
    t = t.permute(0, *(i for k in range(d) for i in (1 + k, 1 + d + k)))
    return t.reshape(kh * kw, *(a * b for a, b in zip(cs, fs, strict=True)))
