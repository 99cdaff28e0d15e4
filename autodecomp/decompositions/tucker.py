"""Tucker-2 (Kim et al. 2016): 1x1 C->R3, kh x kw core R3->R4, 1x1 R4->F."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from tensorly.tucker_tensor import TuckerTensor

from ..core.spec import ConvSpec
from ..factorize import tensorly_solvers
from ..factorize.cache import FactorCache, default_cache, weight_key
from ..factorize.output_fit import unwhiten_rows, whiten_input
from ..factorize.svd import left_singular_vectors
from .base import DecomposedConv, register, round_down_width
from .layers import SpatialConv, pointwise, pointwise_conv

if TYPE_CHECKING:
    from ..factorize.input_stats import InputStats


def _hosvd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output / input singular bases and the fully rotated core (all nested in the ranks)."""
    f, c = weight.shape[:2]
    u_out = left_singular_vectors(weight.reshape(f, -1))
    u_in = left_singular_vectors(weight.transpose(0, 1).reshape(c, -1))
    core = torch.einsum("fcij,fr,cs->rsij", weight, u_out, u_in)
    return u_out, u_in, core


def _hooi(weight: torch.Tensor, r_in: int, r_out: int, iters: int) -> tuple[torch.Tensor, ...]:
    """Higher-order orthogonal iteration for Tucker-2, started from the HOSVD."""
    f, c = weight.shape[:2]
    u_out, u_in, _ = _hosvd(weight)
    u_out, u_in = u_out[:, :r_out], u_in[:, :r_in]
    for _ in range(iters):
        proj = torch.einsum("fcij,cs->fsij", weight, u_in).reshape(f, -1)
        u_out = left_singular_vectors(proj)[:, :r_out]
        proj = torch.einsum("fcij,fr->crij", weight, u_out).reshape(c, -1)
        u_in = left_singular_vectors(proj)[:, :r_in]
    core = torch.einsum("fcij,fr,cs->rsij", weight, u_out, u_in)
    return u_out, u_in, core


@register("tucker")
class Tucker2Conv(DecomposedConv):
    """Tucker-2 along the channel modes; HOSVD init (nested in ranks), optional HOOI refine.

    Options: ``hooi_iters`` (HOOI sweeps after the HOSVD, default 0), ``cache``, ``solver``
    (``"tensorly"``: tensorly's ``partial_tucker`` with ``n_iter_max=hooi_iters``, computed
    per rank; the data-aware initialisation keeps its own whitened HOSVD).

    ``to_tensorly()``: the ``TuckerTensor`` of the kernel ``(F, C, kh, kw)`` with core
    ``(R_out, R_in, kh, kw)`` and factors ``[last, first^T, I_kh, I_kw]``.
    """

    rank_help = "(R_in, R_out) with 1 <= R_in <= C, 1 <= R_out <= F; an int r means (r, r)"
    input_stage = "first"
    tensorly_solver = "partial_tucker"

    def __init__(self, spec: ConvSpec, rank: tuple[int, int]) -> None:
        super().__init__(spec, rank)
        r_in, r_out = rank
        self.first = pointwise(spec.in_channels, r_in)
        self.core = SpatialConv(spec, r_in, r_out)
        self.last = pointwise(r_out, spec.out_channels)

    @classmethod
    def _aligned(cls, spec: ConvSpec, rank: tuple[int, int], multiple: int) -> tuple[int, int]:
        return (round_down_width(rank[0], multiple), round_down_width(rank[1], multiple))

    @classmethod
    def normalize_rank(cls, spec: ConvSpec, rank: Any) -> tuple[int, int]:
        if isinstance(rank, int) and not isinstance(rank, bool):
            rank = (rank, rank)
        if not (isinstance(rank, list | tuple) and len(rank) == 2):
            raise ValueError(f"tucker rank must be an int or (R_in, R_out), got {rank!r}")
        r_in, r_out = (int(r) for r in rank)
        c, f = spec.in_channels, spec.out_channels
        if not (1 <= r_in <= c and 1 <= r_out <= f):
            raise ValueError(
                f"tucker rank {tuple(rank)} out of range: R_in must be in [1, {c}] "
                f"and R_out in [1, {f}]"
            )
        return (r_in, r_out)

    @classmethod
    def param_count(cls, spec: ConvSpec, rank: tuple[int, int]) -> int:
        r_in, r_out = rank
        c, f = spec.in_channels, spec.out_channels
        return c * r_in + r_in * r_out * spec.kernel_area + r_out * f + (f if spec.bias else 0)

    @classmethod
    def rank_candidates(cls, spec: ConvSpec) -> Iterator[tuple[int, int]]:
        c, f = spec.in_channels, spec.out_channels
        n = max(c, f)
        previous = None
        for t in range(1, n + 1):
            rank = (max(1, -(-t * c // n)), max(1, -(-t * f // n)))
            if rank != previous:
                previous = rank
                yield rank

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spec: ConvSpec,
        rank: tuple[int, int],
        *,
        hooi_iters: int = 0,
        cache=default_cache,
        solver: str = "autodecomp",
        **_: Any,
    ) -> Tucker2Conv:
        r_in, r_out = rank

        def w64() -> torch.Tensor:
            return weight.detach().to(torch.float64)

        if solver == "tensorly":
            key = f"tucker/tensorly/{weight_key(weight)}/{r_in}/{r_out}/{hooi_iters}"
            u_out, u_in, core = cache.get_or_compute(
                key, lambda: tensorly_solvers.tucker2(w64(), r_in, r_out, iters=hooi_iters)
            )
        elif hooi_iters > 0:
            key = f"tucker/hooi/{weight_key(weight)}/{r_in}/{r_out}/{hooi_iters}"
            u_out, u_in, core = cache.get_or_compute(
                key, lambda: _hooi(w64(), r_in, r_out, hooi_iters)
            )
        else:
            key = f"tucker/hosvd/{weight_key(weight)}"
            u_out, u_in, core = cache.get_or_compute(key, lambda: _hosvd(w64()))
        module = cls.empty_like(spec, rank, weight)
        dtype = weight.dtype
        with torch.no_grad():
            module.first.weight.copy_(u_in[:, :r_in].T.reshape(r_in, -1, 1, 1).to(dtype))
            module.core.weight.copy_(core[:r_out, :r_in].to(dtype))
            module.last.weight.copy_(u_out[:, :r_out].reshape(-1, r_out, 1, 1).to(dtype))
            if bias is not None:
                module.bias.copy_(bias.detach())
        return module

    @classmethod
    def whitened_init(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spec: ConvSpec,
        rank: tuple[int, int],
        stats: InputStats,
        *,
        damping: float,
        cache: FactorCache,
        **_: Any,
    ) -> Tucker2Conv:
        """HOSVD in whitened coordinates with a least-squares core (nested bases, cached).

        Output basis: left singular vectors of ``W L`` (``L`` the Cholesky factor of the
        damped patch moment, ``W`` read as ``(F, C*kh*kw)``), the optimal output-mode
        truncation for the full input statistics. Input stage: the leading input-channel
        basis of ``W ×_C L_C`` mapped back by ``L_C^{-1}`` (``Σ_C`` the channel moment). Core:
        the least-squares minimiser of the output error ``||(W_hat - W) L||`` given both.
        Exactly optimal when one mode is kept whole: ``R_in = C`` for any statistics,
        ``R_out = F`` when ``Σ = Σ_C ⊗ I`` (always for 1x1 convs).
        """
        r_in, r_out = rank
        f, c, kh, kw = weight.shape
        patch = stats.patch_factor(damping)
        w64 = weight.detach().to(patch)

        def bases() -> tuple[torch.Tensor, torch.Tensor]:
            u_out = left_singular_vectors(w64.reshape(f, -1) @ patch)
            channel = stats.channel_factor(damping)
            whitened = whiten_input(w64, channel).transpose(0, 1).reshape(c, -1)
            v_in = left_singular_vectors(whitened)
            return u_out, unwhiten_rows(v_in.T, channel)

        key = f"tucker/data/{weight_key(weight)}/{stats.key}/{damping!r}"
        u_out, rows = cache.get_or_compute(key, bases)
        u, first = u_out[:, :r_out], rows[:r_in]
        # W_hat = u @ G @ (first ⊗ I_S): solve min_G ||G (first ⊗ I_S) L - u^T W L||
        design = torch.einsum("rc,csd->rsd", first, patch.reshape(c, kh * kw, -1))
        target = u.T @ (w64.reshape(f, -1) @ patch)
        core = torch.linalg.lstsq(design.reshape(r_in * kh * kw, -1).T, target.T).solution.T
        module = cls.empty_like(spec, rank, w64)
        with torch.no_grad():
            module.first.weight.copy_(first[:, :, None, None])
            module.core.weight.copy_(core.reshape(r_out, r_in, kh, kw))
            module.last.weight.copy_(u[:, :, None, None])
            if bias is not None:
                module.bias.copy_(bias.detach())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.core(pointwise_conv(x, self.first.weight))
        return pointwise_conv(y, self.last.weight, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return torch.einsum(
            "fr,rsij,sc->fcij",
            self.last.weight[:, :, 0, 0],
            self.core.weight,
            self.first.weight[:, :, 0, 0],
        )

    def to_tensorly(self) -> TuckerTensor:
        kh, kw = self.spec.kernel_size
        like = self.core.weight
        factors = [
            self.last.weight[:, :, 0, 0],
            self.first.weight[:, :, 0, 0].T,
            torch.eye(kh, dtype=like.dtype, device=like.device),
            torch.eye(kw, dtype=like.dtype, device=like.device),
        ]
        return TuckerTensor(
            (
                tensorly_solvers.as_tensorly(like),
                [tensorly_solvers.as_tensorly(f) for f in factors],
            )
        )

    def macs(self, h: int, w: int) -> int:
        r_in, r_out = self.rank
        ho, wo = self.spec.output_size(h, w)
        s = self.spec
        return (
            h * w * s.in_channels * r_in
            + ho * wo * r_out * r_in * s.kernel_area
            + ho * wo * s.out_channels * r_out
        )
