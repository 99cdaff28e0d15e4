"""CP fits at search precision, warm-started from a deterministic anchor rank, and polished.

Two precisions (the ``precision`` option of the CP and PDP methods):

- ``"search"`` (the default): :func:`~autodecomp.factorize.cp_als.cp_als` stops once a sweep
  lowers the relative error by less than :data:`SEARCH_TOL` times itself; a small problem
  (the rescue's size limit) whose ALS ends below :data:`SEARCH_RESCUE_BELOW` relative error
  is polished by Levenberg-Marquardt without random restarts. Chosen by measurement
  (``docs/solvers.md``): on trained ResNet-20 kernels a 1e-6 fit costs 6-60x the time for
  at most 1.3 % lower kernel error, while exact-rank kernels are still recovered.
- ``"full"``: ``cp_als``'s own defaults (``tol`` 1e-6, up to 500 sweeps, rescue with random
  restarts), started from the search-precision fit of the same rank: the polish that
  ``autodecomp export`` runs before its fine-tune.

Warm starts: a search-precision fit of rank ``R`` above 8 starts from a rough fit (``tol``
:data:`ANCHOR_TOL`) of its *anchor* :func:`anchor_rank`, the nearest rank of a fixed
geometric ladder, fitted cold once and cached: the anchor's weakest components are dropped,
or new ones grown from its residual, and ALS runs from there at search precision for at most
:data:`WARM_SWEEPS` sweeps (also when ``R`` is the anchor rank itself). A single fit costs
about a cold one; each further rank near the same anchor about half of one. The anchor
depends on ``R`` alone, so a rank's factors never depend on what was fitted before, in which
process, or what the factor cache held: replays and workers get the same factors.

Large problems are fitted cold: where the default sweep cap of a cold fit
(:func:`~autodecomp.factorize.cp_als.default_max_iter`) is at most :data:`WARM_ABOVE_CAP`
sweeps, a warm fit (capped at :data:`WARM_SWEEPS`) saves no sweeps and its anchor costs a
second fit (e.g. a 512x512x3x3 kernel above rank 132). Their sweeps' two tensor-sized
contractions run in float32 (``cp_als(single_contractions=True)``; solves in float64):
capped at 20-40 sweeps, they stop at errors far above float32's rounding. The rule
depends on the tensor's shape and ``R`` only, so it keeps the determinism above.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from ..core.errors import DecompositionError
from .cache import FactorCache
from .cp_als import cp_als, cp_to_tensor, default_max_iter

__all__ = [
    "ANCHOR_STEP",
    "ANCHOR_TOL",
    "PRECISIONS",
    "SEARCH_RESCUE_BELOW",
    "SEARCH_TOL",
    "WARM_ABOVE_CAP",
    "WARM_SWEEPS",
    "anchor_rank",
    "check_precision",
    "fit_cp",
    "warm_start",
]

SEARCH_TOL = 1e-4  # relative error gain per sweep below which a search-precision fit stops
SEARCH_RESCUE_BELOW = 0.3  # search precision rescues only fits this close to exact
ANCHOR_TOL = 1e-3  # the rough cold fit of an anchor rank stops at this relative gain
WARM_SWEEPS = 30  # sweep cap of a fit warm-started from its anchor (docs/solvers.md)
WARM_ABOVE_CAP = 40  # warm starts only where a cold fit may sweep more than this
PRECISIONS: dict[str, dict[str, Any]] = {
    "search": {"tol": SEARCH_TOL, "rescue_below": SEARCH_RESCUE_BELOW, "restarts": 0},
    "full": {},  # cp_als's defaults
}
ANCHOR_STEP = 2**0.5  # ratio between neighbouring anchor ranks
_COLD_UP_TO = 8  # ranks up to this are fitted cold (their own anchors)
_log = logging.getLogger(__name__)


def check_precision(value: Any) -> str:
    """``value`` if it is a precision name, else a ValueError naming the valid ones."""
    if not isinstance(value, str) or value not in PRECISIONS:
        raise ValueError(f"unknown CP precision {value!r}; valid: {', '.join(PRECISIONS)}")
    return value


def anchor_rank(rank: int, max_rank: int) -> int:
    """The rank whose cold fit warm-starts ``rank``: the nearest (in ratio) rank of the ladder
    ``round(ANCHOR_STEP ** k)`` that is at most ``max_rank``; ranks up to 8 are their own."""
    if rank <= _COLD_UP_TO:
        return rank
    step = math.log(ANCHOR_STEP)
    top = math.floor(math.log(max_rank) / step + 1e-9)
    k = min(round(math.log(rank) / step), top)
    return min(max_rank, round(ANCHOR_STEP**k))


def warm_start(
    tensor: torch.Tensor, factors: list[torch.Tensor], rank: int, seed: int = 0
) -> list[torch.Tensor]:
    """Start factors of rank ``rank`` from a CP (unit weights) of ``tensor`` at another rank.

    Fewer components: the strongest are kept. More: the new ones are the leading singular
    vectors of the residual's unfoldings (seeded random columns beyond a mode's size), each
    weighted by its inner product with the residual.
    """
    scales = torch.stack([torch.linalg.vector_norm(f, dim=0) for f in factors]).prod(dim=0)
    have = factors[0].shape[1]
    if rank <= have:
        keep = torch.argsort(scales, descending=True)[:rank]
        return [f[:, keep] for f in factors]
    residual = tensor - cp_to_tensor(tensor.new_ones(have), factors)
    new, gen = rank - have, torch.Generator().manual_seed(seed)
    grown = []
    for mode, size in enumerate(residual.shape):
        unfolding = residual.movedim(mode, 0).reshape(size, -1)
        basis = torch.linalg.eigh(unfolding @ unfolding.T)[1].flip(1)[:, :new]
        extra = torch.randn(
            size, new - basis.shape[1], generator=gen, dtype=tensor.dtype, device="cpu"
        ).to(tensor.device)
        columns = torch.cat([basis, extra], dim=1)
        grown.append(columns / torch.linalg.vector_norm(columns, dim=0))
    coeffs = grown[0].T @ residual.reshape(residual.shape[0], -1)  # <residual, component>
    for mode in range(1, residual.dim()):
        coeffs = (coeffs.reshape(new, residual.shape[mode], -1) * grown[mode].T[:, :, None]).sum(1)
    grown[0] = grown[0] * coeffs.reshape(new)
    return [torch.cat([f, g], dim=1) for f, g in zip(factors, grown, strict=True)]


def fit_cp(
    tensor: torch.Tensor,
    rank: int,
    *,
    cache: FactorCache,
    key: str,
    precision: str = "search",
    warm: bool = True,
    options: Mapping[str, Any] | None = None,
) -> list[torch.Tensor]:
    """Rank-``rank`` CP of ``tensor`` (balanced factors, the weights folded in), cached.

    Args:
        tensor: the tensor (solved in float64).
        rank: number of components.
        cache: where every fit (anchors included) is stored.
        key: the cache key's prefix naming the tensor (e.g. method and weight hash).
        precision: ``"search"`` or ``"full"`` (see the module docstring).
        warm: start a search-precision fit from its anchor rank's rough fit (else cold; large
            problems are fitted cold anyway, see the module docstring).
        options: more :func:`~autodecomp.factorize.cp_als.cp_als` options (``tol``,
            ``max_iter``, ...), overriding the precision's.

    Raises:
        DecompositionError: the fit failed (NaN/Inf, degenerate components).
    """
    check_precision(precision)
    opts = dict(options or {})
    text = "/".join(f"{k}={opts[k]!r}" for k in sorted(opts))
    x = tensor.detach()
    max_rank = math.prod(x.shape) // max(x.shape)

    def solve(r: int, how: str, init: Any = None) -> list[torch.Tensor]:
        settings = {**PRECISIONS["full" if how == "polish" else "search"]}
        if how == "anchor":
            settings["tol"] = ANCHOR_TOL
        elif how == "warm":
            settings["max_iter"] = WARM_SWEEPS
        elif how == "large":
            settings["single_contractions"] = True
        settings |= opts
        if init is not None:
            settings["init"] = init
        weights, factors, _ = cp_als(x.to(torch.float64), r, **settings)
        return [factors[0] * weights, *factors[1:]]

    def search_fit(r: int) -> list[torch.Tensor]:
        if default_max_iter(x.numel(), r) <= WARM_ABOVE_CAP:  # large: cold, float32 contractions
            return cache.get_or_compute(
                f"{key}/{r}/search/cold32/{text}", lambda: solve(r, "large")
            )
        anchor = anchor_rank(r, max_rank) if warm else 0
        if anchor <= _COLD_UP_TO:
            return cache.get_or_compute(f"{key}/{r}/search/cold/{text}", lambda: solve(r, "cold"))
        try:
            start = cache.get_or_compute(
                f"{key}/{anchor}/anchor/{text}", lambda: solve(anchor, "anchor")
            )
        except DecompositionError as err:  # as deterministic as the anchor: fit cold instead
            _log.debug("anchor rank %d of rank %d failed (%s): fitting cold", anchor, r, err)
            return cache.get_or_compute(f"{key}/{r}/search/cold/{text}", lambda: solve(r, "cold"))
        seed = int(opts.get("seed", 0))
        return cache.get_or_compute(
            f"{key}/{r}/search/warm{anchor}/{text}",
            lambda: solve(r, "warm", warm_start(x.to(torch.float64), start, r, seed)),
        )

    if precision == "search":
        return search_fit(rank)
    return cache.get_or_compute(
        f"{key}/{rank}/full/warm{int(warm)}/{text}",
        lambda: solve(rank, "polish", search_fit(rank)),
    )
