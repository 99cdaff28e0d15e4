"""The MAC cap of a search space: no option costs more than ``max_layer_macs`` x the dense
layer's multiply-adds.

A parameter ratio does not bound MACs (a tensor train at a quarter of the parameters can
cost twice the dense conv), so each (layer, method) gets a *ratio ceiling*: the largest
ratio at which the method's weight-free rank (:meth:`~autodecomp.decompositions
.DecomposedConv.rank_for_ratio`) and every smaller one stays within the cap, counted by the
method's exact MAC formula at the layer's input size. The search draws the method's ratio
below that ceiling; a method whose smallest rank is over the cap is not offered, and listed
ranks over the cap are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch

from ..decompositions import ConvSpec, get_method

__all__ = ["option_macs", "ratio_ceiling", "within_cap"]


def option_macs(method: str, spec: ConvSpec, rank: Any, size: tuple[int, int]) -> int:
    """Multiply-adds of ``method`` at a normalised ``rank`` on an input of ``size`` (h, w),
    from a layer built on the meta device (nothing is allocated or fitted)."""
    with torch.device("meta"):
        module = get_method(method)(spec, rank)
    return module.macs(*size)


def _limit(spec: ConvSpec, size: tuple[int, int], max_layer_macs: float) -> float:
    return max_layer_macs * spec.dense_macs(*size)


@lru_cache(maxsize=4096)
def ratio_ceiling(
    method: str,
    spec: ConvSpec,
    size: tuple[int, int],
    max_layer_macs: float,
    hi: float,
    rank_multiple: int = 1,
) -> float | None:
    """The largest ratio up to ``hi`` whose option, and every smaller ratio's, is within
    ``max_layer_macs`` x the dense MACs; ``None`` when even the smallest rank is over.

    A method's default rank path (:meth:`~autodecomp.decompositions.DecomposedConv
    .rank_candidates`) is in non-decreasing parameters and MACs (tested for every method),
    so the first rank over the cap is found by bisection among the ranks a ratio up to
    ``hi`` reaches (:meth:`~autodecomp.decompositions.DecomposedConv.rank_within`). The
    ceiling lies half a parameter above the last rank with fewer parameters than that one,
    so the rounding of ``ratio x dense parameters`` cannot tip the choice either way.
    """
    cls = get_method(method)
    dense = spec.dense_params()
    limit = _limit(spec, size, max_layer_macs)
    ranks, params = [], []
    for rank in cls.rank_candidates(spec):
        count = cls.param_count(spec, rank)
        if ranks and count > hi * dense:
            break  # no ratio of the range reaches this rank
        ranks.append(rank)
        params.append(count)

    def over(i: int) -> bool:
        aligned = cls.align_rank(spec, ranks[i], rank_multiple)
        return option_macs(method, spec, aligned, size) > limit

    if over(0):
        return None
    lo, top = 0, len(ranks)  # ranks[lo] is within the cap; the first one over is in (lo, top]
    while top - lo > 1:
        mid = (lo + top) // 2
        lo, top = (lo, mid) if over(mid) else (mid, top)
    if top == len(ranks):
        return hi
    first_over = params[top]
    below = [p for p in params[:top] if p < first_over]
    # ties with the first rank: only a budget under it still picks the first (within) rank
    return min(hi, (max(below) + 0.5) / dense if below else (first_over - 0.5) / dense)


def within_cap(
    method: str,
    spec: ConvSpec,
    ranks: Sequence[Any],
    size: tuple[int, int],
    max_layer_macs: float,
) -> list[Any]:
    """The normalised ``ranks`` whose MACs are within the cap, in their order."""
    limit = _limit(spec, size, max_layer_macs)
    return [r for r in ranks if option_macs(method, spec, r, size) <= limit]
