"""Zero-training allocation of methods and ranks to layers: the initial design of a search.

Every searched layer's options (``keep`` and each offered method at ``grid`` ratios) are
scored without training (:mod:`autodecomp.search.options`). A plan should have the least
summed error for its MACs: :func:`error_front` finds the plans (one option per layer) on
the Pareto front of (MACs, summed error), from the cheapest option everywhere to the dense
model. :func:`assemble_ladder` keeps the front's plans that fit the budgets, spread evenly
over their log-MACs (the cheapest always included: the hypervolume of (accuracy, MACs) is
won at the cheap end), as fixed trial parameters: the study enqueues them first and the
sampler starts from what they score. With ``initial_design.balanced`` the ladder also holds
the plans of :func:`minimax_plans` (one shared error cap for every layer, in the spirit of
ALDS) as a track of their own. With ``initial_design.tracks`` the ladder also holds
single-method uniform plans (:func:`uniform_plans`), one track per method;
:class:`~autodecomp.search.ladder.Ladder` probes each track once, then fills gaps from
every track's rungs. The options' scores (:func:`~autodecomp.search.options.option_scores`)
are stored on the study beside the ladder (``layer_option_scores``): the per-layer
sensitivity table of ``autodecomp report``.

:func:`allocation_ladder` does it all in one process; the workers of a study share the
scoring and assemble the same ladder (:mod:`autodecomp.search.ladder_units`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from optuna.trial import FixedTrial
from torch import nn

from ..compress.surgery import skeleton
from ..config import StudyConfig
from ..core.errors import DecompositionError
from ..measure.plan_cost import PlanCost
from ..workload.data import DataSplits
from .baseline import Baseline
from .ladder import BALANCED, FRONT, OPTION_SCORES, Ladder, Rung
from .options import (
    Option,
    Scored,
    dense_option,
    grid_ratios,
    layer_options,
    offered_methods,
    option_method,
    option_scores,
    score_options,
)
from .space import SearchSpace, block_params, suggest_plan, uniform_params

__all__ = [
    "FRONT",
    "MAX_RUNGS",
    "OPTION_SCORES",
    "UNIFORM_CANDIDATES",
    "Ladder",
    "Option",
    "Rung",
    "Rungs",
    "Scored",
    "allocation_ladder",
    "assemble_ladder",
    "dense_option",
    "error_front",
    "layer_options",
    "minimax_plans",
    "option_scores",
    "score_options",
    "uniform_candidates",
    "uniform_plans",
]

_log = logging.getLogger(__name__)
MAX_RUNGS = 256  # allocations kept on the ladder (spread evenly over log-MACs)
UNIFORM_CANDIDATES = 64  # ratios tried per method for its uniform plans


def error_front(
    options: Mapping[str, list[Option]], keep_at_most: int = 1024
) -> list[tuple[int, float, tuple[int, ...]]]:
    """The Pareto front of (summed MACs, summed error) over one option per layer, cheapest
    first: ``(macs, error, option index per layer)``.

    Built layer by layer (a multiple-choice knapsack): the front of the first ``k`` layers
    combined with every option of layer ``k + 1``, dominated points dropped. A front larger
    than ``keep_at_most`` is thinned to that many points spread evenly over its MAC range
    (always keeping both ends), so the result is exact for small spaces and a dense
    approximation for large ones.
    """
    front: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for opts in options.values():
        merged = sorted(
            ((m + o.macs, e + o.error, (*picks, i)) for m, e, picks in front
             for i, o in enumerate(opts)),
            key=lambda point: (point[0], point[1]),
        )  # fmt: skip
        front = []
        for point in merged:
            if not front or point[1] < front[-1][1]:
                front.append(point)
        if len(front) > keep_at_most:
            front = [front[i] for i in _spread([p[0] for p in front], keep_at_most)]
    return front


def minimax_plans(options: Mapping[str, list[Option]]) -> list[tuple[int, float, tuple[int, ...]]]:
    """The plans that equalise per-layer error, cheapest first: ``(macs, worst error, option
    index per layer)``.

    For each error cap ``eps`` (every option's error in turn), every layer takes its
    cheapest option whose error is at most ``eps`` (its least-error option when none is);
    a larger cap never costs more. Where :func:`error_front` minimises the summed error at
    a MAC level, these minimise the worst layer's (the minimax allocation of ALDS, Liebenwein
    et al. 2021, over the scored options), so no layer is compressed far past the others.
    """
    plans: dict[tuple[int, ...], tuple[int, float]] = {}
    caps = sorted({o.error for opts in options.values() for o in opts})
    for eps in caps:
        picks = []
        for opts in options.values():
            within = [i for i, o in enumerate(opts) if o.error <= eps]
            pool = within or [min(range(len(opts)), key=lambda i: opts[i].error)]
            picks.append(min(pool, key=lambda i: (opts[i].macs, opts[i].error)))
        chosen = [opts[i] for opts, i in zip(options.values(), picks, strict=True)]
        plans.setdefault(
            tuple(picks), (sum(o.macs for o in chosen), max((o.error for o in chosen), default=0))
        )
    front: list[tuple[int, float, tuple[int, ...]]] = []
    for macs, worst, picks in sorted((m, w, p) for p, (m, w) in plans.items()):
        if not front or worst < front[-1][1]:  # dearer plans must lower the worst error
            front.append((macs, worst, picks))
    return front


def _spread(totals: list[int], count: int, log: bool = False) -> list[int]:
    """Indices of ``count`` entries of ascending ``totals`` spread evenly over their range,
    or over the range of their logarithms (both ends included)."""
    if len(totals) <= count:
        return list(range(len(totals)))
    values = np.asarray(totals, dtype=np.float64)
    free = np.ones(len(values), dtype=bool)
    spacing = np.geomspace if log and totals[0] > 0 else np.linspace
    for target in spacing(totals[0], totals[-1], count):  # the nearest free one, lowest first
        free[int(np.argmin(np.where(free, np.abs(values - target), np.inf)))] = False
    return np.flatnonzero(~free).tolist()


def uniform_candidates(
    model: nn.Module,
    space: SearchSpace,
    cost: PlanCost,
    method: str,
    limits: Mapping[str, float],
) -> list[tuple[float, float]]:
    """``(MACs ratio, ratio)`` of the distinct uniform plans of ``method`` within ``limits``
    (``"macs"`` / ``"params"``), cheapest first: every layer offering it at one ratio (others
    dense), ``UNIFORM_CANDIDATES`` ratios over the layers' range, one plan (the lowest ratio)
    per distinct set of ranks. MACs are fvcore's counts, taken on the plan's unfitted
    :func:`~autodecomp.compress.surgery.skeleton` (nothing is factorised)."""
    found: dict[str, tuple[float, float]] = {}
    for ratio in grid_ratios(space, UNIFORM_CANDIDATES):
        plan = suggest_plan(FixedTrial(uniform_params(space, method, ratio)), space)
        try:  # a decomposed-then-pruned layer is fitted to its kernel
            macs, params_count, records = cost(skeleton(model, plan), plan)
        except DecompositionError:
            continue
        totals = {"macs": macs, "params": params_count}
        if any(totals[k] > limit for k, limit in limits.items() if k in totals):
            continue
        key = json.dumps({n: [r["method"], r["rank"]] for n, r in records.items()}, default=str)
        found.setdefault(key, (macs / cost.macs, ratio))
    return sorted(found.values())


def uniform_plans(
    model: nn.Module,
    space: SearchSpace,
    cost: PlanCost,
    method: str,
    limits: Mapping[str, float],
) -> list[Rung]:
    """The distinct uniform plans of ``method`` within ``limits`` as rungs of its track,
    cheapest first (:func:`uniform_candidates`)."""
    candidates = uniform_candidates(model, space, cost, method, limits)
    return uniform_rungs(space, method, candidates)


def uniform_rungs(
    space: SearchSpace, method: str, candidates: Iterable[tuple[float, float]]
) -> list[Rung]:
    """The rungs of ``method``'s track from its :func:`uniform_candidates`."""
    return [Rung(macs, uniform_params(space, method, ratio), method) for macs, ratio in candidates]


def _uniform_error(
    options: Mapping[str, list[Option]], dense: Mapping[str, Option], method: str, level: float
) -> float:
    """Summed option error of ``method``'s uniform plans (every layer offering it at one
    grid ratio), interpolated in log-MACs at ``level`` (a fraction of the searched layers'
    dense MACs; clamped at the ends)."""
    ratios = sorted({o.ratio for opts in options.values() for o in opts if o.ratio is not None})
    points: list[tuple[float, float]] = []
    total = sum(d.macs for d in dense.values())
    for ratio in ratios:
        macs, error = 0, 0.0
        for name, opts in options.items():
            own = [
                o for o in opts
                if o.ratio is not None and o.ratio <= ratio and option_method(o) == method
            ]  # fmt: skip
            chosen = max(own, key=lambda o: o.ratio) if own else dense[name]
            macs, error = macs + chosen.macs, error + chosen.error
        points.append((math.log(max(macs, 1) / total), error))
    logs, errors = zip(*sorted(points), strict=True)
    return float(np.interp(math.log(level), logs, errors))


class Rungs(list):
    """The ladder's rungs (:class:`Rung`), carrying the :func:`option_scores` they were
    picked from (``scores``), which :meth:`Ladder.store` puts on the study."""

    def __init__(self, rungs: Iterable[Rung] = (), scores: dict[str, Any] | None = None) -> None:
        super().__init__(rungs)
        self.scores = scores


def allocation_ladder(
    cfg: StudyConfig,
    space: SearchSpace,
    baseline: Baseline,
    splits: DataSplits,
    grid: int,
) -> Rungs:
    """The ladder's rungs, built in this process: every option scored
    (:func:`~autodecomp.search.options.score_options`), the uniform plans of every offered
    method with ``initial_design.tracks`` > 0, then :func:`assemble_ladder`."""
    failed: list[str] = []
    scored = score_options(cfg, space, baseline, splits, grid, failed)
    uniform: dict[str, list[Rung]] = {}
    if cfg.initial_design.tracks > 0:
        limits = cfg.budgets.limits(baseline.macs, baseline.params)
        uniform = {
            m: uniform_plans(baseline.model, space, scored.cost, m, limits)
            for m in offered_methods(space)
        }
    if failed:
        _log.info(f"allocation ladder: {len(failed)} layer options left out, e.g. {failed[0]}")
    return assemble_ladder(cfg, space, baseline, scored, uniform, grid)


def _rungs(
    space: SearchSpace,
    baseline: Baseline,
    scored: Scored,
    plans: Iterable[tuple[int, float, tuple[int, ...]]],
    limits: Mapping[str, float],
    track: str,
) -> list[Rung]:
    """``plans`` (an option index per layer) within ``limits`` as rungs of ``track``,
    cheapest first, at most ``MAX_RUNGS`` spread evenly over log-MACs."""
    options, dense = scored.options, scored.dense
    found: list[Rung] = []
    for _, _, choice in plans:
        picked = {n: options[n][i] for n, i in zip(options, choice, strict=True)}
        macs = baseline.macs + sum(o.macs - dense[n].macs for n, o in picked.items())
        params = baseline.params + sum(
            o.params_count - dense[n].params_count for n, o in picked.items()
        )
        totals = {"macs": macs, "params": params}
        if any(totals[k] > limit for k, limit in limits.items() if k in totals):
            continue
        fixed: dict[str, Any] = {}
        for option in picked.values():
            fixed |= option.params
        found.append(Rung(macs / baseline.macs, fixed | block_params(space), track))
    found.sort(key=lambda rung: rung.macs)
    return [found[i] for i in _spread([r.macs for r in found], MAX_RUNGS, log=True)]


def assemble_ladder(
    cfg: StudyConfig,
    space: SearchSpace,
    baseline: Baseline,
    scored: Scored,
    uniform: Mapping[str, list[Rung]],
    grid: int,
) -> Rungs:
    """The ladder's rungs from the scored options and each offered method's uniform plans
    (:func:`uniform_plans`; empty without tracks): the :func:`error_front` plans within the
    MAC and parameter budgets, cheapest first (at most ``MAX_RUNGS``, spread evenly over
    log-MACs; track ``front``), with ``initial_design.balanced`` the :func:`minimax_plans`
    within them (track ``balanced``), then, with ``initial_design.tracks`` > 0, the uniform plans
    of that many methods, cheapest first, one method after the other: those whose uniform
    plans have the least summed option error at the ladder's probe level
    (:meth:`Ladder.probe_level`), the least first. The options' scores ride along as
    ``scores`` (:func:`~autodecomp.search.options.option_scores`)."""
    options, dense = scored.options, scored.dense
    limits = cfg.budgets.limits(baseline.macs, baseline.params)
    rungs = _rungs(space, baseline, scored, error_front(options), limits, FRONT)
    if cfg.initial_design.balanced:
        rungs += _rungs(space, baseline, scored, minimax_plans(options), limits, BALANCED)
    tracks: list[str] = []
    if cfg.initial_design.tracks > 0 and rungs:
        level = Ladder.probe_level(rungs)
        searched = sum(d.macs for d in dense.values())
        at = (level * baseline.macs - (baseline.macs - searched)) / searched
        ranked = sorted(
            (m for m in offered_methods(space) if uniform.get(m)),
            key=lambda m: _uniform_error(options, dense, m, max(at, 1e-9)),
        )
        tracks = ranked[: cfg.initial_design.tracks]
        rungs += [rung for m in tracks for rung in uniform[m]]
    count = sum(len(o) for o in options.values())
    extra = f"; uniform tracks {', '.join(tracks)}" if tracks else ""
    _log.info(
        f"allocation ladder: {len(rungs)} zero-training allocations within budget "
        f"(from {count} layer options{extra})"
    )
    return Rungs(rungs, option_scores(scored, grid))
