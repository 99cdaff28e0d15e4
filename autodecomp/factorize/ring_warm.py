"""Tensor-ring fits warm-started from a deterministic anchor rank (the TR analogue of
:mod:`~autodecomp.factorize.cp_warm`).

A ring of ranks ``(ra, rb, re)`` with a bond above 8 starts from the fit of its *anchor*
:func:`ring_anchor`: each bond moved to the nearest rank of CP's geometric anchor ladder
(:func:`~autodecomp.factorize.cp_warm.anchor_rank`), clipped to the ring's bounds, fitted
cold once (the same cached fit as a cold fit of that rank). :func:`resize_ring` truncates
or grows each bond of the anchor's cores, and ALS refines the better of that and the cold
start (TR-SVD / the algebraic start, so exact-rank kernels stay exact) for at most
:data:`RING_WARM_SWEEPS` sweeps within the same multiply-add budget. The anchor depends on
the rank and the tensor's shape alone, so factors never depend on what was fitted before.

Off by default (the ``warm`` option of the TR method): on trained ResNet-18 kernels a
trial-like sequence of ranks took 0.82-1.0x the time of cold fits for 0.4 % lower kernel
error at best (``bench/cp_warm.py --methods tr``, ``docs/solvers.md``): a cold ring fit is
already capped at 10 sweeps and a multiply-add budget, and TR's rank path is coarse, so an
anchor's own fit is shared by few ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .cache import FactorCache
from .cp_warm import anchor_rank
from .tensor_train import Ring, ring_decompose, ring_refine, ring_start, ring_tensor

__all__ = ["RING_WARM_SWEEPS", "fit_ring", "resize_ring", "ring_anchor", "ring_problems"]

RING_WARM_SWEEPS = 4  # sweep cap of a warm-started ring fit (docs/solvers.md)


def ring_problems(shape: Sequence[int], ranks: Sequence[int]) -> list[str]:
    """Why ``ranks = (ra, rb, re)`` is no valid ring of a ``(C, S, F)`` tensor (empty if it is)."""
    (c, s, f), (ra, rb, re) = shape, ranks
    checks = [
        (min(ra, rb, re) >= 1, "every rank must be >= 1"),
        (ra * rb <= c, f"ra*rb={ra * rb} must be <= C={c}"),
        (ra * re <= f, f"ra*re={ra * re} must be <= F={f}"),
        (rb <= s * re, f"rb={rb} must be <= kh*kw*re={s * re}"),
        (re <= s * rb, f"re={re} must be <= kh*kw*rb={s * rb}"),
    ]
    return [text for ok, text in checks if not ok]


def ring_anchor(shape: Sequence[int], ranks: Sequence[int]) -> tuple[int, int, int]:
    """The ranks whose fit warm-starts ``ranks`` of a ``(C, S, F)`` tensor: ``ra`` on the
    anchor ladder, then ``rb`` and ``re`` on it clipped to ``C // ra`` and ``F // ra``;
    ``ranks`` itself when that is no valid ring."""
    c, _, f = shape
    ra, rb, re = (int(x) for x in ranks)
    a = anchor_rank(ra, min(c, f))
    anchor = (a, min(anchor_rank(rb, c), c // a), min(anchor_rank(re, f), f // a))
    return (ra, rb, re) if ring_problems(shape, anchor) else anchor


def _resize_bond(
    left: torch.Tensor, right: torch.Tensor, size: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``left (m, r) @ right (r, n)`` through a bond of ``size``: truncated to its leading
    singular directions, or grown by small seeded random columns / rows that ALS then fits."""
    r = left.shape[1]
    if size <= r:
        q_left, r_left = torch.linalg.qr(left)
        q_right, r_right = torch.linalg.qr(right.T)
        u, sigma, vt = torch.linalg.svd(r_left @ r_right.T)
        root = sigma[:size].sqrt()
        return q_left @ (u[:, :size] * root), (root[:, None] * vt[:size]) @ q_right.T
    scale = 1e-3 * float(left.norm() * right.norm()) ** 0.5 / r
    extra_left = torch.randn(left.shape[0], size - r, generator=gen, dtype=left.dtype)
    extra_right = torch.randn(size - r, right.shape[1], generator=gen, dtype=right.dtype)
    return (
        torch.cat([left, scale * extra_left.to(left.device)], 1),
        torch.cat([right, scale * extra_right.to(right.device)], 0),
    )


def resize_ring(cores: Ring, ranks: Sequence[int], seed: int = 0) -> Ring:
    """Cores of ranks ``(ra, rb, re)`` from ring cores ``U (ra', C, rb')``, ``K (rb', S, re')``,
    ``V (re', F, ra')`` of other ranks, one bond at a time (a: V-U, b: U-K, e: K-V)."""
    u, k, v = cores
    c, s, f = u.shape[1], k.shape[1], v.shape[1]
    ra, rb, re = (int(x) for x in ranks)
    gen = torch.Generator().manual_seed(seed)
    left, right = _resize_bond(v.reshape(-1, v.shape[2]), u.reshape(u.shape[0], -1), ra, gen)
    v, u = left.reshape(-1, f, ra), right.reshape(ra, c, -1)
    left, right = _resize_bond(u.reshape(-1, u.shape[2]), k.reshape(k.shape[0], -1), rb, gen)
    u, k = left.reshape(ra, c, rb), right.reshape(rb, s, -1)
    left, right = _resize_bond(k.reshape(-1, k.shape[2]), v.reshape(v.shape[0], -1), re, gen)
    return u, left.reshape(rb, s, re), right.reshape(re, f, ra)


def fit_ring(
    tensor: Callable[[], torch.Tensor],
    shape: Sequence[int],
    ranks: Sequence[int],
    bases: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    *,
    cache: FactorCache,
    key: str,
    warm: bool = False,
    als_iters: int = 10,
    als_budget: float = 4e9,
    tol: float = 1e-6,
    seed: int = 0,
) -> Ring:
    """Ring cores of ranks ``ranks`` for the ``(C, S, F)`` tensor, cached.

    Args:
        tensor: returns the tensor (float64), called only on a cache miss.
        shape: its shape ``(C, S, F)``.
        ranks: ``(ra, rb, re)``.
        bases: returns the mode-C and mode-F bases (:func:`ring_start`).
        cache: where fits (anchors included) are stored, under ``f"{key}/{ra},{rb},{re}/..."``.
        key: names the tensor (method and weight hash).
        warm: start from the anchor's fit (else, or where the anchor is the rank, cold).
        als_iters, als_budget, tol: the ALS refinement of a cold fit (a warm one sweeps at
            most ``min(als_iters, RING_WARM_SWEEPS)`` times within the same budget).
        seed: seeds the random parts of the start.
    """
    ranks = tuple(int(x) for x in ranks)
    options = f"als{als_iters},{als_budget:g},{tol:g}"

    def name(r: Sequence[int]) -> str:
        return f"{key}/{','.join(str(x) for x in r)}"

    def cold(r: tuple[int, ...]) -> Ring:
        return cache.get_or_compute(
            f"{name(r)}/{options}",
            lambda: ring_decompose(
                tensor(), r, bases(), als_iters=als_iters, als_budget=als_budget, tol=tol, seed=seed
            ),
        )

    anchor = ring_anchor(shape, ranks) if warm else ranks
    if anchor == ranks:
        return cold(ranks)
    try:
        start_from = cold(anchor)
    except torch.linalg.LinAlgError:  # as deterministic as the anchor: fit cold instead
        return cold(ranks)

    def warm_fit() -> Ring:
        t = tensor()
        start, error2 = ring_start(t, ranks, bases(), seed)
        u, k, v = resize_ring(start_from, ranks, seed)
        if float((ring_tensor(u, k, v) - t).pow(2).sum()) < error2:
            start = (u, k, v)
        sweeps = min(als_iters, RING_WARM_SWEEPS)
        return ring_refine(t, start, als_iters=sweeps, als_budget=als_budget, tol=tol)

    return cache.get_or_compute(
        f"{name(ranks)}/warm{name(anchor)[len(key) + 1 :]}/{options}", warm_fit
    )
