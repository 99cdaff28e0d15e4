"""Zero-training allocation of methods and ranks to layers: the initial design of a search.

Every searched layer has a set of options: ``keep`` and each offered method at ``grid``
ratios spread over the layer's range (log-spaced when the range is; the listed ranks when
the space gives explicit ranks). Each option is scored without any training by its MACs
and parameters (fvcore, one layer at a time: :class:`~autodecomp.measure.plan_cost.PlanCost`) and
an error on the calibration batch (``initial_design.score``): the relative logit error of
the baseline with only that layer replaced (``network``,
:meth:`~autodecomp.search.proxies.Calibration.network_errors`) or the layer's relative output
error given the baseline's input to it (``layer``,
:meth:`~autodecomp.search.proxies.Calibration.layer_output_errors`); the kernel error when the
study has no calibration batch. One model per (method, ratio) holds every layer's
replacement at once.

A plan should have the least summed error for its MACs: :func:`error_front` finds the
plans (one option per layer) on the Pareto front of (MACs, summed error), from the
cheapest option everywhere to the dense model. :func:`initial_design` keeps the front's
plans that fit the budgets and returns ``plans`` of them spread evenly over the range of
their log-MACs (the cheapest always included: the hypervolume of (accuracy, MACs) is won
at the cheap end) as fixed trial parameters: the study enqueues them
first and the sampler starts from what they score. With ``initial_design.tracks`` the
ladder also holds single-method uniform plans (:func:`uniform_plans`), one track per method;
:class:`Ladder` probes each track once, then fills gaps from every track's rungs.
The options' scores (:func:`option_scores`) are stored on the study beside the ladder
(``layer_option_scores``): the per-layer sensitivity table of ``autodecomp report``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import optuna
from optuna.trial import FixedTrial, FrozenTrial, TrialState
from torch import nn

from ..compress.surgery import apply_plan, skeleton
from ..config import StudyConfig
from ..core.errors import DecompositionError
from ..measure.cost import count_params
from ..measure.plan_cost import PlanCost
from ..workload.data import DataSplits
from .baseline import Baseline
from .proxies import Calibration, calibration_batch, kernel_errors
from .space import (
    KEEP,
    LayerSpace,
    SearchSpace,
    block_params,
    layer_params,
    suggest_plan,
    uniform_params,
)

__all__ = [
    "FRONT",
    "MAX_RUNGS",
    "OPTION_SCORES",
    "Ladder",
    "Option",
    "Rung",
    "Rungs",
    "Scored",
    "allocation_ladder",
    "dense_option",
    "error_front",
    "layer_options",
    "option_scores",
    "score_options",
    "uniform_plans",
]

_log = logging.getLogger(__name__)
MAX_RUNGS = 256  # allocations kept on the ladder (spread evenly over log-MACs)
FRONT = "front"  # the track of the error front's plans
UNIFORM_CANDIDATES = 64  # ratios tried per method for its uniform plans
OPTION_SCORES = "layer_option_scores"  # the study's user attribute holding option_scores()


@dataclass(frozen=True)
class Option:
    """One way to treat one layer, scored without training."""

    params: dict[str, Any]  # the layer's fixed trial parameters
    macs: int
    params_count: int
    error: float
    ratio: float | None = None  # the grid ratio it was made at (None: keep)
    rank: Any = None  # the rank it was fitted at (None: keep)


class Rung(NamedTuple):
    """One plan of the allocation ladder: its MACs over the baseline's, its fixed trial
    parameters, and its track (``front`` or the method of a uniform plan)."""

    macs: float
    params: dict[str, Any]
    track: str = FRONT


def _grid_ratios(space: SearchSpace, grid: int) -> list[float]:
    """``grid`` ratios over the union of the layers' ranges (each layer clips them)."""
    lo = min(layer.ratio.lo for layer in space.layers)
    hi = max(layer.ratio.hi for layer in space.layers)
    spread = np.geomspace if any(layer.ratio.log for layer in space.layers) else np.linspace
    return [float(r) for r in spread(lo, hi, grid)]


def _offered(space: SearchSpace) -> list[str]:
    """The methods some layer of ``space`` offers (``keep`` aside), in first-seen order."""
    return list(dict.fromkeys(m for layer in space.layers for m in layer.choices if m != KEEP))


def _plan_entry(layer: LayerSpace, params: Mapping[str, Any]) -> dict[str, Any]:
    """The plan entry :func:`~autodecomp.search.space.suggest_plan` makes of ``layer``'s params."""
    return suggest_plan(FixedTrial(dict(params)), SearchSpace((layer,)))[layer.name]


def dense_option(model: nn.Module, cost: PlanCost, layer: LayerSpace) -> Option:
    """``layer``'s ``keep`` option: its dense MACs and parameters, error 0."""
    dense = model.get_submodule(layer.name)
    return Option(layer_params(layer, KEEP), cost.dense_macs(layer.name), count_params(dense), 0.0)


def _fitted(
    model: nn.Module, plan: dict[str, dict[str, Any]], failed: list[str] | None
) -> nn.Module | None:
    """``apply_plan(model, plan)``; when a layer fails to decompose (:class:`DecompositionError`:
    a non-finite kernel, a solver that diverged), each layer is tried alone, those that fail
    are dropped from ``plan`` (their messages appended to ``failed``) and the rest applied;
    ``None`` when every layer fails."""
    try:
        return apply_plan(model, plan)
    except DecompositionError:
        pass
    for name in list(plan):
        try:
            apply_plan(model, {name: plan[name]})
        except DecompositionError as err:
            del plan[name]
            if failed is not None:
                failed.append(str(err))
    return apply_plan(model, plan) if plan else None


def layer_options(
    model: nn.Module,
    space: SearchSpace,
    cost: PlanCost,
    calibration: Calibration | None,
    grid: int,
    dense: Mapping[str, Option],
    score: str = "network",
    failed: list[str] | None = None,
) -> dict[str, list[Option]]:
    """Every layer's options (``keep`` first, then distinct (method, rank) ones) with
    their MACs, parameters and error: the relative output error of the layer (``score``
    ``layer``) or of the network with only that layer replaced (``network``); the kernel
    error without calibration. ``dense`` holds each layer's ``keep`` option. An option that
    fails to decompose (:class:`DecompositionError`) is left out, its message appended to
    ``failed``."""
    options = {
        layer.name: [dense[layer.name]] if KEEP in layer.choices else [] for layer in space.layers
    }
    seen: set[tuple[str, str]] = set()
    for method in _offered(space):
        for ratio in _grid_ratios(space, grid):
            chosen: dict[str, dict[str, Any]] = {}
            plan: dict[str, dict[str, Any]] = {}
            for layer in space.layers:
                if method not in layer.choices:
                    continue
                params = layer_params(layer, method, ratio)
                key = (layer.name, repr(sorted(params.items())))
                if key in seen:
                    continue
                seen.add(key)
                chosen[layer.name] = params
                plan[layer.name] = _plan_entry(layer, params)
            compressed = _fitted(model, plan, failed) if plan else None
            if compressed is None:
                continue
            _, _, records = cost(compressed, plan)
            if calibration is not None and score == "network":
                errors = calibration.network_errors(compressed, plan)
            elif calibration is not None:
                errors = calibration.layer_output_errors(compressed, plan)
            else:
                errors = kernel_errors(model, compressed, plan)
            for name, params in chosen.items():
                if name not in plan:  # failed to decompose
                    continue
                record = records[name]
                error = errors.get(name, 0.0)
                options[name].append(
                    Option(params, record["macs"], record["params"], error, ratio, record["rank"])
                )
    return options


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


def _spread(totals: list[int], count: int, log: bool = False) -> list[int]:
    """Indices of ``count`` entries of ascending ``totals`` spread evenly over their range,
    or over the range of their logarithms (both ends included)."""
    if len(totals) <= count:
        return list(range(len(totals)))
    picked: list[int] = []
    spacing = np.geomspace if log and totals[0] > 0 else np.linspace
    for target in spacing(totals[0], totals[-1], count):
        free = [i for i in range(len(totals)) if i not in picked]
        picked.append(min(free, key=lambda i: abs(totals[i] - target)))
    return sorted(picked)


def uniform_plans(
    model: nn.Module,
    space: SearchSpace,
    cost: PlanCost,
    method: str,
    limits: Mapping[str, float],
) -> list[Rung]:
    """The distinct uniform plans of ``method`` within ``limits`` (``"macs"`` /
    ``"params"``), cheapest first: every layer offering it at one ratio (others dense),
    ``UNIFORM_CANDIDATES`` ratios over the layers' range, one plan per distinct set of
    ranks. MACs are fvcore's counts, taken on the plan's unfitted
    :func:`~autodecomp.compress.surgery.skeleton` (nothing is factorised)."""
    found: dict[str, Rung] = {}
    for ratio in _grid_ratios(space, UNIFORM_CANDIDATES):
        params = uniform_params(space, method, ratio)
        plan = suggest_plan(FixedTrial(params), space)
        try:  # a decomposed-then-pruned layer is fitted to its kernel
            macs, params_count, records = cost(skeleton(model, plan), plan)
        except DecompositionError:
            continue
        totals = {"macs": macs, "params": params_count}
        if any(totals[k] > limit for k, limit in limits.items() if k in totals):
            continue
        key = json.dumps({n: [r["method"], r["rank"]] for n, r in records.items()}, default=str)
        found.setdefault(key, Rung(macs / cost.macs, params, method))
    return sorted(found.values(), key=lambda rung: rung.macs)


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
                if o.ratio is not None and o.ratio <= ratio and _method(o) == method
            ]  # fmt: skip
            chosen = max(own, key=lambda o: o.ratio) if own else dense[name]
            macs, error = macs + chosen.macs, error + chosen.error
        points.append((math.log(max(macs, 1) / total), error))
    logs, errors = zip(*sorted(points), strict=True)
    return float(np.interp(math.log(level), logs, errors))


def _method(option: Option) -> str:
    return next(v for k, v in option.params.items() if k.endswith("/method"))


class Scored(NamedTuple):
    """Every searched layer's scored options (:func:`layer_options`), its ``keep`` option,
    the plan cost they were counted with and the error they were scored by (``network``,
    ``layer`` or ``kernel``)."""

    options: dict[str, list[Option]]
    dense: dict[str, Option]
    cost: PlanCost
    score: str


def score_options(
    cfg: StudyConfig,
    space: SearchSpace,
    baseline: Baseline,
    splits: DataSplits,
    grid: int,
    failed: list[str] | None = None,
) -> Scored:
    """Score every layer option of ``space`` at ``grid`` ratios on ``baseline``, without
    training (:func:`layer_options`, scored by ``initial_design.score`` on the calibration
    batch; the kernel error with ``proxy.calibration_size`` 0)."""
    model = baseline.model
    cost = PlanCost(model, baseline.input_shape, space.names)
    calibration = None
    if cfg.proxy.calibration_size > 0:
        inputs = calibration_batch(splits.train, cfg.proxy.calibration_size, cfg.seed)
        calibration = Calibration(model, inputs, cfg.device)
    dense = {layer.name: dense_option(model, cost, layer) for layer in space.layers}
    score = cfg.initial_design.score if calibration is not None else "kernel"
    options = layer_options(model, space, cost, calibration, grid, dense, score, failed)
    return Scored(options, dense, cost, score)


def option_scores(scored: Scored, grid: int) -> dict[str, Any]:
    """``scored`` in a compact JSON form (stored on the study as ``OPTION_SCORES``):
    ``{"format": 1, "score", "grid", "dense": {layer: [macs, params]}, "columns", "rows"}``,
    one row per decomposed option: the layer, method, grid ratio, its fixed trial parameters
    without the ``<layer>/<method>/`` prefix (``{"ratio": 0.3}``), rank, MACs, parameters
    and error."""
    rows = []
    for name, opts in scored.options.items():
        for o in opts:
            if o.ratio is None:  # keep: its figures are the dense ones
                continue
            method = _method(o)
            prefix = f"{name}/{method}/"
            fixed = {k[len(prefix) :]: v for k, v in o.params.items() if k.startswith(prefix)}
            rows.append([name, method, o.ratio, fixed, o.rank, o.macs, o.params_count, o.error])
    return {
        "format": 1,
        "score": scored.score,
        "grid": grid,
        "dense": {n: [d.macs, d.params_count] for n, d in scored.dense.items()},
        "columns": ["layer", "method", "grid_ratio", "fixed", "rank", "macs", "params", "error"],
        "rows": json.loads(json.dumps(rows)),  # tuples (ranks) as lists, as stored
    }


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
    """The ladder's rungs: the :func:`error_front` plans within the MAC and parameter
    budgets, cheapest first (at most ``MAX_RUNGS``, spread evenly over log-MACs; track
    ``front``), then, with ``initial_design.tracks`` > 0, the uniform plans
    (:func:`uniform_plans`) of that many methods, cheapest first, one method after the
    other: those whose uniform plans have the least summed option error at the ladder's
    probe level (:meth:`Ladder.probe_level`), the least first. The options' scores
    (:func:`score_options`) ride along as ``scores`` (:func:`option_scores`)."""
    start = time.perf_counter()
    model = baseline.model
    failed: list[str] = []
    scored = score_options(cfg, space, baseline, splits, grid, failed)
    options, dense, cost = scored.options, scored.dense, scored.cost
    names = list(options)
    limits = cfg.budgets.limits(baseline.macs, baseline.params)
    found: list[Rung] = []
    for _, _, choice in error_front(options):
        picked = {n: options[n][i] for n, i in zip(names, choice, strict=True)}
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
        found.append(Rung(macs / baseline.macs, fixed | block_params(space)))
    found.sort(key=lambda rung: rung.macs)
    rungs = [found[i] for i in _spread([r.macs for r in found], MAX_RUNGS, log=True)]
    tracks: list[str] = []
    if cfg.initial_design.tracks > 0 and rungs:
        level = Ladder.probe_level(rungs)
        searched = sum(d.macs for d in dense.values())
        at = (level * baseline.macs - (baseline.macs - searched)) / searched
        uniform = {m: uniform_plans(model, space, cost, m, limits) for m in _offered(space)}
        ranked = sorted(
            (m for m, plans in uniform.items() if plans),
            key=lambda m: _uniform_error(options, dense, m, max(at, 1e-9)),
        )
        tracks = ranked[: cfg.initial_design.tracks]
        rungs += [rung for m in tracks for rung in uniform[m]]
    if failed:
        _log.info(f"allocation ladder: {len(failed)} layer options left out, e.g. {failed[0]}")
    count = sum(len(o) for o in options.values())
    extra = f"; uniform tracks {', '.join(tracks)}" if tracks else ""
    _log.info(
        f"allocation ladder: {len(rungs)} zero-training allocations within budget "
        f"({count} layer options scored in {time.perf_counter() - start:.1f} s{extra})"
    )
    return Rungs(rungs, option_scores(scored, grid))


class Ladder:
    """The allocation ladder tried one rung at a time: the cheapest first, then one probe
    per track, then always the rung that best fills the largest gap of the study's
    accuracy-vs-MACs staircase.

    Probes: with uniform tracks on the ladder, each track (the error front first, then the
    uniform methods by rank) is tried at its rung nearest the probe level
    (:meth:`probe_level`, a quarter of the way from the cheapest to the dearest front rung
    in log-MACs, where plans still differ after a fine-tune), so every track has a measured
    point; the gap filling then takes any track's rung.

    Gaps: between two neighbouring evaluated MAC positions ``m1 < m2`` (MACs ratio) whose
    best accuracies so far (at no more MACs) are ``b1 <= b2``, a new point can add at most
    ``(m2 - m1) * (b2 - b1)`` to the hypervolume, and a quarter of it at the midpoint if
    accuracy is linear in MACs there; a gap whose accuracy does not rise is closed. Above
    the dearest evaluated point the gap reaches the dearest rung and the baseline's
    accuracy (closed once that is reached: the plateau is left to the sampler). The next
    rung is the untried one nearest the midpoint of the largest gap that has one. A study
    enqueues ``plans`` rungs in all (as a callback of ``study.optimize``: one waiting at a
    time); then its sampler alone draws the trials.
    The ladder is stored on the study (``allocation_ladder``), so a resumed study or a
    worker continues it.
    """

    ATTR = "allocation_ladder"

    def __init__(
        self,
        rungs: list[Rung] | list[tuple[float, dict[str, Any]]],
        plans: int,
        accuracy_index: int,
        baseline_accuracy: float,
        scores: dict[str, Any] | None = None,
    ) -> None:
        self.rungs = [Rung(*rung) for rung in rungs]
        self.plans = plans
        self.accuracy_index, self.baseline_accuracy = accuracy_index, baseline_accuracy
        self.scores = scores if scores is not None else getattr(rungs, "scores", None)

    def store(self, study: optuna.Study) -> None:
        """Put the ladder (and its option scores, if any) on ``study`` and enqueue its
        cheapest rung."""
        if self.scores:
            study.set_user_attr(OPTION_SCORES, self.scores)
        study.set_user_attr(
            self.ATTR,
            {"rungs": [list(rung) for rung in self.rungs], "plans": self.plans,
             "baseline_accuracy": self.baseline_accuracy},
        )  # fmt: skip
        if self.plans > 0 and self.rungs:
            self._enqueue(study, self.next_rung([]))

    @classmethod
    def from_study(cls, study: optuna.Study, accuracy_index: int) -> Ladder | None:
        """The ladder stored on ``study`` (rungs without a track are ``front``), or None."""
        raw = study.user_attrs.get(cls.ATTR)
        if not raw:
            return None
        rungs = [Rung(float(r[0]), dict(r[1]), *r[2:]) for r in raw["rungs"]]
        return cls(rungs, int(raw["plans"]), accuracy_index, float(raw["baseline_accuracy"]))

    @staticmethod
    def probe_level(rungs: list[Rung]) -> float:
        """The MACs ratio where tracks are probed: a quarter of the way from the cheapest
        to the dearest ``front`` rung (all rungs without one) in log-MACs."""
        front = [r.macs for r in rungs if r.track == FRONT] or [r.macs for r in rungs]
        return min(front) ** 0.75 * max(front) ** 0.25

    def _probes(self) -> list[int]:
        """Each track's rung nearest the probe level, in track order (none for one track)."""
        tracks = list(dict.fromkeys(rung.track for rung in self.rungs))
        if len(tracks) < 2:
            return []
        level = self.probe_level(self.rungs)
        return [
            min(
                (i for i, rung in enumerate(self.rungs) if rung.track == track),
                key=lambda i: abs(math.log(self.rungs[i].macs / level)),
            )
            for track in tracks
        ]

    def _enqueue(self, study: optuna.Study, rung: int | None) -> None:
        if rung is None:
            return
        label = f"allocation {rung + 1}/{len(self.rungs)}"
        study.enqueue_trial(self.rungs[rung].params, user_attrs={"warm_start": label})

    @staticmethod
    def rung_of(trial: FrozenTrial) -> int | None:
        """The ladder rung ``trial`` was enqueued from (None: not from the ladder)."""
        label = str(trial.user_attrs.get("warm_start", ""))
        if not label.startswith("allocation "):
            return None
        return int(label.split()[1].split("/")[0]) - 1

    def _staircase(self, trials: list[FrozenTrial]) -> list[tuple[float, float]]:
        """``(MACs ratio, best accuracy at no more MACs)`` at every evaluated MAC position."""
        points = sorted(
            (t.user_attrs["macs_ratio"], t.values[self.accuracy_index])
            for t in trials
            if t.state == TrialState.COMPLETE
            and not t.user_attrs.get("over_budget")
            and "macs_ratio" in t.user_attrs
        )
        steps: list[tuple[float, float]] = []
        for macs, accuracy in points:
            best = max(accuracy, steps[-1][1]) if steps else accuracy
            if steps and steps[-1][0] == macs:
                steps[-1] = (macs, best)
            else:
                steps.append((macs, best))
        return steps

    def next_rung(self, trials: list[FrozenTrial]) -> int | None:
        """The rung to try next given the study's trials (None: none left to try)."""
        tried = {r for r in map(self.rung_of, trials) if r is not None}
        free = [i for i in range(len(self.rungs)) if i not in tried]
        if len(tried) >= self.plans or not free:
            return None
        cheapest = min(free, key=lambda i: self.rungs[i].macs)
        if not tried:
            return cheapest
        waiting = [i for i in self._probes() if i not in tried]
        if waiting:
            return waiting[0]
        steps = self._staircase(trials)
        if not steps:
            return cheapest
        top = max(rung.macs for rung in self.rungs)
        gaps = [(lo, hi, (hi - lo) * (b - a)) for (lo, a), (hi, b) in itertools.pairwise(steps)]
        if steps[-1][0] < top:  # above the dearest evaluated point: up to the baseline's accuracy
            rise = max(0.0, self.baseline_accuracy - steps[-1][1])
            gaps.append((steps[-1][0], top, (top - steps[-1][0]) * rise))
        for lo, hi, area in sorted(gaps, key=lambda gap: gap[2], reverse=True):
            inside = [
                i for i in free
                if lo < self.rungs[i].macs < hi or self.rungs[i].macs == hi == top
            ]  # fmt: skip
            if inside and area > 0:
                return min(inside, key=lambda i: abs(self.rungs[i].macs - (lo + hi) / 2))
        return None

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """``study.optimize`` callback: enqueue the next rung unless one is waiting."""
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING and self.rung_of(t) is not None for t in trials):
            return
        self._enqueue(study, self.next_rung(trials))
