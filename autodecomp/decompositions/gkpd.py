"""GKPD (Hameed et al. 2022): ``W ≈ sum_r A_r ⊗ B_r``, applied as two convolutions.

Also home of :class:`KroneckerChainConv`, the layer shared with SeKron: a chain of Kronecker
factors ``W = sum_r A_1[r_1] ⊗ A_2[r_1, r_2] ⊗ ... ⊗ A_S[r_{S-1}]`` (GKPD is ``S = 2``) run
as one convolution per factor, innermost first, without ever building the dense kernel.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tensorly.tt_tensor import TTTensor
from torch import nn

from ..core.spec import ConvSpec
from ..factorize import tensorly_solvers
from ..factorize.cache import FactorCache, default_cache, weight_key
from ..factorize.kronecker import (
    Structure,
    best_ranks,
    chain_cores,
    chain_dense,
    chain_kernel,
    chain_params,
    chain_tensor,
    chain_weights,
    is_structure,
    kron_svd,
    preferred_structures,
    size,
    structures,
)
from .base import DecomposedConv, register

__all__ = ["GKPDConv", "KroneckerChainConv", "chain_macs", "equal_norms"]

Stage = tuple[tuple[int, int], tuple[int, int]]  # (stride, dilation) of one factor's conv
_NOMINAL_HW = 32  # input size at which candidate structures' multiply-adds are compared


def _axis_stages(stride: int, dilation: int, kernels: Sequence[int]) -> list[tuple[int, int]]:
    """Stride and dilation of each factor's conv along one axis.

    Factor ``k`` has dilation ``D_k = d * prod_{m>k} h_m``. Its output is only read at
    positions ``p*s + sum_{m<k} i_m D_m``, so it is computed on the grid of step
    ``g_k = gcd(s, D_m for m < k with h_m > 1)``: stride-2 layers skip the unread positions
    in every factor whose kernel allows it, not only in the outermost one.
    """
    count = len(kernels)
    dil = [dilation * math.prod(kernels[m + 1 :]) for m in range(count)]
    step = [math.gcd(stride, *(dil[m] for m in range(k) if kernels[m] > 1)) for k in range(count)]
    step.append(1)
    return [
        (step[k] // step[k + 1], dil[k] // step[k + 1] if kernels[k] > 1 else 1)
        for k in range(count)
    ]


def _stages(spec: ConvSpec, structure: Structure) -> list[Stage]:
    rows = _axis_stages(spec.stride[0], spec.dilation[0], [a[2] for a in structure])
    cols = _axis_stages(spec.stride[1], spec.dilation[1], [a[3] for a in structure])
    return [((sh, sw), (dh, dw)) for (sh, dh), (sw, dw) in zip(rows, cols, strict=True)]


def unsupported_kronecker(spec: ConvSpec) -> str | None:
    """Why no Kronecker structure fits ``spec`` (input side ``C*kh*kw`` of 1 or a prime)."""
    n = spec.in_channels * spec.kernel_area // spec.groups
    if not structures(spec.weight_shape, 2):
        return (
            f"in_channels*kh*kw = {n} cannot be split into two factors >= 2, so no Kronecker "
            "factor structure exists for this layer"
        )
    return None


def chain_macs(spec: ConvSpec, structure: Structure, ranks: Sequence[int], h: int, w: int) -> int:
    """Multiply-adds of the chain's convolutions on one ``h x w`` input (fvcore's count)."""
    fs = [a[0] for a in structure]
    cs = [a[1] for a in structure]
    bounds = (1, *ranks, 1)
    stages = _stages(spec, structure)
    h, w = spec.padded_size(h, w)
    total = 0
    for k in range(len(structure) - 1, -1, -1):
        f, c, kh, kw = structure[k]
        (sh, sw), (dh, dw) = stages[k]
        h, w = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
        batch = math.prod(cs[:k]) * math.prod(fs[k + 1 :])
        total += batch * bounds[k] * f * bounds[k + 1] * c * kh * kw * h * w
    return total


class KroneckerChainConv(DecomposedConv):
    """A conv whose kernel is a chain of Kronecker factors, run as one conv per factor.

    Factor ``k`` is a parameter in convolution layout ``(R_{k-1} F_k, R_k C_k, h_k, w_k)``.
    The input is padded once (by the innermost factor's conv, or explicitly when the
    padding is asymmetric); the innermost factor runs over groups of ``C_S`` channels,
    each next factor contracts ``(r_k, c_k)`` at a dilation grown by the kernel sizes of
    the factors inside it, and the outermost one adds the bias. The layer's stride is
    applied as early in the chain as the kernel split allows (see :func:`_axis_stages`).

    ``to_tensorly()``: the ``TTTensor`` of the kernel rearranged as ``(|A_1|, ..., |A_S|)``
    (Van Loan–Pitsianis at every level, :func:`~autodecomp.factorize.kronecker.chain_tensor`)
    with cores ``A_k (R_{k-1}, |A_k|, R_k)``: a chain of Kronecker factors is exactly a tensor
    train of that tensor (GKPD: a rank-R matrix ``sum_r vec(A_r) vec(B_r)^T``), so tensorly's
    ``tt_to_tensor`` rebuilds it and ``tensor_train`` fits it (``solver="tensorly"``);
    :meth:`kernel_from_tensorly` undoes the rearrangement.
    """

    tensorly_solver = "tensor_train"

    def __init__(self, spec: ConvSpec, rank: Any) -> None:
        super().__init__(spec, rank)
        self.structure, self.ranks = self.structure_of(spec, rank)
        self._bounds = (1, *self.ranks, 1)
        self._stages = _stages(spec, self.structure)
        self.factors = nn.ParameterList(
            nn.Parameter(torch.zeros(self._bounds[k] * f, self._bounds[k + 1] * c, h, w))
            for k, (f, c, h, w) in enumerate(self.structure)
        )

    @classmethod
    @abstractmethod
    def structure_of(cls, spec: ConvSpec, rank: Any) -> tuple[Structure, tuple[int, ...]]:
        """Factor shapes and ranks of a normalised rank spec."""

    @classmethod
    def unsupported_reason(cls, spec: ConvSpec) -> str | None:
        return super().unsupported_reason(spec) or unsupported_kronecker(spec)

    @classmethod
    def param_count(cls, spec: ConvSpec, rank: Any) -> int:
        structure, ranks = cls.structure_of(spec, rank)
        return chain_params(structure, ranks) + (spec.out_channels if spec.bias else 0)

    @classmethod
    def _choose(
        cls,
        weight: torch.Tensor,
        wkey: str,
        spec: ConvSpec,
        rank: dict[str, Any],
        candidates: int,
        slack: float,
        cache: FactorCache,
    ) -> tuple[Structure, tuple[int, ...]]:
        """Structure and ranks of least error within ``rank['max_params']`` parameters.

        Structures whose error is within ``slack`` (relative) of the least one count as
        equally good, and the one with the fewest multiply-adds among them wins.
        """
        structure, ranks = cls.structure_of(spec, rank)
        budget = rank["max_params"] - (spec.out_channels if spec.bias else 0)
        options = preferred_structures(spec.weight_shape, len(structure), candidates)
        found = []
        for option in (structure, *(s for s in options if s != structure)):
            best = best_ranks(weight, wkey, option, budget, cache)
            if best is not None:
                macs = chain_macs(spec, option, best[1], _NOMINAL_HW, _NOMINAL_HW)
                found.append((best[0], macs, option, best[1]))
        if not found:
            return structure, ranks
        least = min(f[0] for f in found)
        good = [f for f in found if f[0] <= least * (1 + slack) ** 2]
        _, _, structure, ranks = min(good, key=lambda f: (f[1], f[0]))
        return structure, ranks

    @classmethod
    @abstractmethod
    def _rank_spec(cls, structure: Structure, ranks: Sequence[int]) -> dict[str, Any]:
        """The canonical rank spec of a structure and its ranks."""

    @classmethod
    @abstractmethod
    def _factorize(
        cls, weight: torch.Tensor, wkey: str, structure: Structure, ranks: tuple[int, ...], cache
    ) -> list[torch.Tensor]:
        """Float64 factors in convolution layout."""

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spec: ConvSpec,
        rank: dict[str, Any],
        *,
        candidates: int = 6,
        slack: float = 0.01,
        cache: FactorCache = default_cache,
        solver: str = "autodecomp",
        **_: Any,
    ) -> KroneckerChainConv:
        """Initialise from a dense kernel by SVDs of its Van Loan–Pitsianis rearrangements.

        Args:
            candidates: how many factor structures a ``max_params`` rank compares on the
                kernel's singular values; 1 keeps the default one. A ``ratio`` gives the
                weight-free default structure and rank (:meth:`rank_for_ratio`), whose
                parameters and MACs fall as the ratio falls; ``{..., "max_params": N}`` asks
                for the weight's choice instead (its MACs need not be monotone in ``N``).
            slack: relative error margin within which the structure with the fewest
                multiply-adds is preferred to the most accurate one.
            cache: where the SVDs are kept (one per weight and structure, any rank).
            solver: ``"tensorly"``: the factors of the chosen structure by tensorly's
                ``tensor_train`` of :func:`~autodecomp.factorize.kronecker.chain_tensor`
                (the same sequential SVD, per rank; the structure is chosen as usual),
                scaled to equal norms.
        """
        w64 = weight.detach().to(torch.float64)
        wkey = weight_key(weight)
        if "max_params" in rank:
            structure, ranks = cls._choose(w64, wkey, spec, rank, candidates, slack, cache)
        else:
            structure, ranks = cls.structure_of(spec, rank)
        if solver == "tensorly":
            factors = cache.get_or_compute(
                f"kron/tensorly/{wkey}/{structure}/{ranks}",
                lambda: equal_norms(
                    chain_weights(
                        tensorly_solvers.tt(chain_tensor(w64, structure), [1, *ranks, 1]),
                        structure,
                        ranks,
                    )
                ),
            )
        else:
            factors = cls._factorize(w64, wkey, structure, ranks, cache)
        module = cls.empty_like(spec, cls._rank_spec(structure, ranks), weight)
        with torch.no_grad():
            for param, value in zip(module.factors, factors, strict=True):
                param.copy_(value)
            if bias is not None:
                module.bias.copy_(bias.detach())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        fs = [a[0] for a in self.structure]
        cs = [a[1] for a in self.structure]
        bounds = self._bounds
        # symmetric padding goes into the first conv (no padded copy of the input)
        padding = self.spec.symmetric_padding
        z = x if padding is not None else self.spec.pad(x)
        z = z.reshape(-1, cs[-1], *z.shape[-2:])  # no arithmetic on traced sizes
        stride, dilation = self._stages[-1]
        z = F.conv2d(z, self.factors[-1], None, stride, padding or 0, dilation)
        for k in range(len(self.structure) - 2, -1, -1):
            h, w = z.shape[-2:]
            # (n C_<k, C_k, F_>k+1, R_k+1, F_k+1) -> (n C_<k, F_k+1, F_>k+1, R_k+1, C_k)
            z = z.reshape(-1, cs[k], math.prod(fs[k + 2 :]), bounds[k + 1], fs[k + 1], h, w)
            z = z.permute(0, 4, 2, 3, 1, 5, 6)
            stride, dilation = self._stages[k]
            if k == 0 and self.bias is not None:
                # the bias needs every output channel in one conv: group over F_>0 instead
                groups = math.prod(fs[1:])
                weight = self.factors[0].expand(groups, -1, -1, -1, -1).flatten(0, 1)
                bias = self.bias.view(fs[0], groups).t().reshape(-1)
                z = z.reshape(n, -1, h, w)
                z = F.conv2d(z, weight, bias, stride, 0, dilation, groups)
            else:
                z = z.reshape(-1, bounds[k + 1] * cs[k], h, w)
                z = F.conv2d(z, self.factors[k], None, stride, 0, dilation)
        h, w = z.shape[-2:]
        return z.reshape(n, -1, fs[0], h, w).transpose(1, 2).reshape(n, -1, h, w)

    def dense_weight(self) -> torch.Tensor:
        return chain_dense(list(self.factors), self.structure, self.ranks)

    def to_tensorly(self) -> TTTensor:
        cores = chain_cores(list(self.factors), self.structure, self.ranks)
        return TTTensor([tensorly_solvers.as_tensorly(c) for c in cores])

    def kernel_from_tensorly(self, full: Any) -> torch.Tensor:
        return chain_kernel(tensorly_solvers.from_tensorly(full), self.structure)

    def macs(self, h: int, w: int) -> int:
        return chain_macs(self.spec, self.structure, self.ranks, h, w)


def equal_norms(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``factors`` scaled by one scalar each so that all have their geometric-mean norm."""
    norms = [float(f.norm()) for f in factors]
    if min(norms) == 0.0:
        return factors
    mean = math.exp(sum(math.log(n) for n in norms) / len(norms))
    return [f * (mean / n) for f, n in zip(factors, norms, strict=True)]


def as_shape(value: Any, what: str) -> tuple[int, int, int, int]:
    if not (
        isinstance(value, list | tuple)
        and len(value) == 4
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        raise ValueError(f"{what} must be 4 positive ints [F, C, h, w], got {value!r}")
    return tuple(value)


def check_rank_keys(method: str, rank: dict, allowed: set[str], required: set[str]) -> None:
    """Reject a dict rank spec with unknown or missing keys, naming the valid ones."""
    unknown, missing = set(rank) - allowed, required - set(rank)
    if unknown or missing:
        raise ValueError(
            f"invalid {method} rank {rank!r}: keys must be {sorted(allowed)} "
            f"(required: {sorted(required)})"
        )
    budget = rank.get("max_params", 1)
    if not (isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1):
        raise ValueError(f"{method} max_params must be an int >= 1, got {budget!r}")


@register("gkpd")
class GKPDConv(KroneckerChainConv):
    """Sum of R Kronecker products, initialised by the Van Loan–Pitsianis SVD (nested in R)."""

    rank_help = (
        "R (int, factor shapes chosen from the layer) or {'rank': R, 'a_shape': [F1, C1, h1, w1]}"
        " with F1 | F, C1 | C, h1 | kh, w1 | kw and 1 <= R <= min(|A|, |B|)"
    )

    @classmethod
    def default_a_shape(cls, spec: ConvSpec) -> tuple[int, int, int, int]:
        """The weight-free factor shape: balanced ``|A|``/``|B|``, then fewest MACs per weight."""
        return preferred_structures(spec.weight_shape, 2, 1)[0][0]

    @classmethod
    def normalize_rank(cls, spec: ConvSpec, rank: Any) -> dict[str, Any]:
        if isinstance(rank, int) and not isinstance(rank, bool):
            rank = {"rank": rank}
        if not isinstance(rank, dict):
            raise ValueError(
                f"gkpd rank must be an int R or {{'rank': R, 'a_shape': [F1, C1, h1, w1]}}, "
                f"got {rank!r}"
            )
        check_rank_keys("gkpd", rank, {"rank", "a_shape", "max_params"}, {"rank"})
        shape = spec.weight_shape
        a_shape = (
            as_shape(rank["a_shape"], "gkpd a_shape")
            if "a_shape" in rank
            else cls.default_a_shape(spec)
        )
        if not is_structure(shape, (a_shape, _b_shape(shape, a_shape))):
            raise ValueError(
                f"gkpd a_shape {list(a_shape)} is invalid for kernel {list(shape)}: each entry "
                "must divide the kernel's, and both C1*h1*w1 and C2*h2*w2 must be >= 2"
            )
        r = rank["rank"]
        top = min(size(a_shape), size(_b_shape(shape, a_shape)))
        if not (isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= top):
            raise ValueError(
                f"gkpd rank R={r!r} out of range: must be in [1, {top}] for a_shape {list(a_shape)}"
            )
        out = {"rank": r, "a_shape": list(a_shape)}
        if "max_params" in rank:
            out["max_params"] = rank["max_params"]
        return out

    @classmethod
    def structure_of(
        cls, spec: ConvSpec, rank: dict[str, Any]
    ) -> tuple[Structure, tuple[int, ...]]:
        a_shape = tuple(rank["a_shape"])
        return (a_shape, _b_shape(spec.weight_shape, a_shape)), (rank["rank"],)

    @classmethod
    def _rank_spec(cls, structure: Structure, ranks: Sequence[int]) -> dict[str, Any]:
        return {"rank": ranks[0], "a_shape": list(structure[0])}

    @classmethod
    def rank_candidates(cls, spec: ConvSpec) -> Iterator[dict[str, Any]]:
        a_shape = cls.default_a_shape(spec)
        top = min(size(a_shape), size(_b_shape(spec.weight_shape, a_shape)))
        for r in range(1, top + 1):
            yield {"rank": r, "a_shape": list(a_shape)}

    @classmethod
    def _factorize(
        cls, weight: torch.Tensor, wkey: str, structure: Structure, ranks: tuple[int, ...], cache
    ) -> list[torch.Tensor]:
        """``A_r = sqrt(s_r) u_r``, ``B_r = sqrt(s_r) v_r``: the scale split evenly."""
        (f1, c1, h1, w1), (f2, c2, h2, w2) = structure
        (r,) = ranks
        u, s, vh = kron_svd(weight, wkey, structure, (), cache)
        root = s[:r].sqrt()
        a = (u[:, :r] * root).T.reshape(r, f1, c1, h1, w1)
        b = (root[:, None] * vh[:r]).reshape(r * f2, c2, h2, w2)
        return [a.transpose(0, 1).reshape(f1, r * c1, h1, w1), b]

    @property
    def a_factors(self) -> torch.Tensor:
        """``A`` as ``(R, F1, C1, h1, w1)``."""
        (f1, c1, h1, w1), _ = self.structure
        return self.factors[0].reshape(f1, -1, c1, h1, w1).transpose(0, 1)

    @property
    def b_factors(self) -> torch.Tensor:
        """``B`` as ``(R, F2, C2, h2, w2)``."""
        _, (f2, c2, h2, w2) = self.structure
        return self.factors[1].reshape(-1, f2, c2, h2, w2)


def _b_shape(shape: Sequence[int], a_shape: Sequence[int]) -> tuple[int, int, int, int]:
    return tuple(n // a if n % a == 0 else 0 for n, a in zip(shape, a_shape, strict=True))
