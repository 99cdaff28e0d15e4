"""Uniform sweeps as arms of a search: the uniform plans that matter at given MAC levels.

A user with a budget compresses every layer with one method at the largest ratio that fits
it. :func:`uniform_arms` lists those plans, level by level and method by method, as fixed
trial parameters: a search that enqueues them first (round 1) has, for each level, every
method's best-fitting uniform plan among its trials, so its best trial under the level is
never below theirs on the search's own accuracy. More rounds add the next-dearest plans
(round 2: the second-largest ratio under each level, ...): a uniform sweep as a user would
run it, its most useful plans first. :func:`budget_arms` is round 1 at a study's
``initial_design.uniform_at`` budgets, enqueued when the study is created.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..core.budget import absolute_limit
from ..measure.plan_cost import PlanCost
from .allocate import Rung, uniform_plans
from .options import offered_methods
from .space import SearchSpace

__all__ = ["UniformArm", "budget_arms", "uniform_arms", "uniform_tracks"]

UniformArm = tuple[str, dict[str, Any]]  # (label, fixed trial parameters)


def uniform_tracks(
    model: nn.Module,
    space: SearchSpace,
    cost: PlanCost,
    methods: Sequence[str],
    limits: Mapping[str, float],
) -> dict[str, list[Rung]]:
    """Each method's distinct uniform plans within ``limits``, cheapest first
    (:func:`~autodecomp.search.allocate.uniform_plans`); methods without one are left out."""
    found = {m: uniform_plans(model, space, cost, m, limits) for m in methods}
    return {m: plans for m, plans in found.items() if plans}


def uniform_arms(
    candidates: Mapping[str, list[Rung]], levels: Sequence[float], rounds: int | None = 1
) -> list[UniformArm]:
    """Uniform plans round by round: in round ``r`` (from 1), for each MAC level (a fraction
    of the baseline's MACs, ascending) and each method, the ``r``-th dearest plan of that
    method within the level; every plan once. ``rounds=None``: until none is left."""
    out: list[UniformArm] = []
    seen: set[tuple[str, int]] = set()
    deepest = max((len(plans) for plans in candidates.values()), default=0)
    for r in range(deepest if rounds is None else rounds):
        for level in sorted(levels):
            for method, plans in candidates.items():
                within = [i for i, rung in enumerate(plans) if rung.macs <= level]
                if len(within) <= r or (method, within[-1 - r]) in seen:
                    continue
                index = within[-1 - r]
                seen.add((method, index))
                out.append((f"uniform {method} @{plans[index].macs:.3f}", plans[index].params))
    return out


def budget_arms(
    model: nn.Module,
    space: SearchSpace,
    cost: PlanCost,
    budgets: Sequence[float],
    limits: Mapping[str, float],
) -> list[UniformArm]:
    """Round 1 of :func:`uniform_arms` at MAC ``budgets`` (parsed: fractions <= 1 or counts),
    for every method ``space`` offers, within the study's ``limits``: what
    ``initial_design.uniform_at`` enqueues."""
    if not budgets:
        return []
    levels = [absolute_limit(b, cost.macs) / cost.macs for b in budgets]
    return uniform_arms(uniform_tracks(model, space, cost, offered_methods(space), limits), levels)
