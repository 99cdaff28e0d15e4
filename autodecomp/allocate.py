"""Zero-training allocation of methods and ranks to layers: the initial design of a search.

Every searched layer has a set of options: ``keep`` and each offered method at ``grid``
ratios spread over the layer's range (log-spaced when the range is; the listed ranks when
the space gives explicit ranks). Each option is scored without any training by its MACs
and parameters (fvcore, one layer at a time: :class:`~autodecomp.objective.PlanCost`) and
an error on the calibration batch (``initial_design.score``): the relative logit error of
the baseline with only that layer replaced (``network``,
:meth:`~autodecomp.proxies.Calibration.network_errors`) or the layer's relative output
error given the baseline's input to it (``layer``,
:meth:`~autodecomp.proxies.Calibration.layer_output_errors`); the kernel error when the
study has no calibration batch. One model per (method, ratio) holds every layer's
replacement at once.

A plan should have the least summed error for its MACs: :func:`error_front` finds the
plans (one option per layer) on the Pareto front of (MACs, summed error), from the
cheapest option everywhere to the dense model. :func:`initial_design` keeps the front's
plans that fit the budgets and returns ``plans`` of them spread evenly over the range of
their log-MACs (the cheapest always included: the hypervolume of (accuracy, MACs) is won
at the cheap end) as fixed trial parameters: the study enqueues them
first and the sampler starts from what they score.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.trial import FixedTrial, FrozenTrial, TrialState
from torch import nn

from .baseline import Baseline
from .config import StudyConfig
from .cost import count_params
from .data import DataSplits
from .objective import PlanCost
from .proxies import Calibration, calibration_batch, kernel_errors
from .space import KEEP, LayerSpace, SearchSpace, block_params, layer_params, suggest_plan
from .surgery import apply_plan

__all__ = [
    "MAX_RUNGS",
    "Ladder",
    "Option",
    "allocation_ladder",
    "dense_option",
    "error_front",
    "layer_options",
]

MAX_RUNGS = 256  # allocations kept on the ladder (spread evenly over log-MACs)


@dataclass(frozen=True)
class Option:
    """One way to treat one layer, scored without training."""

    params: dict[str, Any]  # the layer's fixed trial parameters
    macs: int
    params_count: int
    error: float


def _grid_ratios(space: SearchSpace, grid: int) -> list[float]:
    """``grid`` ratios over the union of the layers' ranges (each layer clips them)."""
    lo = min(layer.ratio.lo for layer in space.layers)
    hi = max(layer.ratio.hi for layer in space.layers)
    spread = np.geomspace if any(layer.ratio.log for layer in space.layers) else np.linspace
    return [float(r) for r in spread(lo, hi, grid)]


def _plan_entry(layer: LayerSpace, params: Mapping[str, Any]) -> dict[str, Any]:
    """The plan entry :func:`~autodecomp.space.suggest_plan` makes of ``layer``'s params."""
    return suggest_plan(FixedTrial(dict(params)), SearchSpace((layer,)))[layer.name]


def dense_option(model: nn.Module, cost: PlanCost, layer: LayerSpace) -> Option:
    """``layer``'s ``keep`` option: its dense MACs and parameters, error 0."""
    dense = model.get_submodule(layer.name)
    return Option(layer_params(layer, KEEP), cost.dense_macs(layer.name), count_params(dense), 0.0)


def layer_options(
    model: nn.Module,
    space: SearchSpace,
    cost: PlanCost,
    calibration: Calibration | None,
    grid: int,
    dense: Mapping[str, Option],
    score: str = "network",
) -> dict[str, list[Option]]:
    """Every layer's options (``keep`` first, then distinct (method, rank) ones) with
    their MACs, parameters and error: the relative output error of the layer (``score``
    ``layer``) or of the network with only that layer replaced (``network``); the kernel
    error without calibration. ``dense`` holds each layer's ``keep`` option."""
    options = {
        layer.name: [dense[layer.name]] if KEEP in layer.choices else [] for layer in space.layers
    }
    methods = list(dict.fromkeys(m for layer in space.layers for m in layer.choices if m != KEEP))
    seen: set[tuple[str, str]] = set()
    for method in methods:
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
            if not plan:
                continue
            compressed = apply_plan(model, plan)
            _, _, records = cost(compressed, plan)
            if calibration is not None and score == "network":
                errors = calibration.network_errors(compressed, plan)
            elif calibration is not None:
                errors = calibration.layer_output_errors(compressed, plan)
            else:
                errors = kernel_errors(model, compressed, plan)
            for name, params in chosen.items():
                record = records[name]
                options[name].append(
                    Option(params, record["macs"], record["params"], errors.get(name, 0.0))
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


def allocation_ladder(
    cfg: StudyConfig,
    space: SearchSpace,
    baseline: Baseline,
    splits: DataSplits,
    grid: int,
    log: Callable[[str], None] | None = None,
) -> list[tuple[float, dict[str, Any]]]:
    """The :func:`error_front` plans within the MAC and parameter budgets as ``(MACs /
    baseline MACs, fixed trial parameters)``, cheapest first, at most ``MAX_RUNGS`` of
    them spread evenly over log-MACs."""
    start = time.perf_counter()
    model = baseline.model
    cost = PlanCost(model, baseline.input_shape, space.names)
    calibration = None
    if cfg.proxy.calibration_size > 0:
        inputs = calibration_batch(splits.train, cfg.proxy.calibration_size, cfg.seed)
        calibration = Calibration(model, inputs, cfg.device)
    dense = {layer.name: dense_option(model, cost, layer) for layer in space.layers}
    score = cfg.initial_design.score
    options = layer_options(model, space, cost, calibration, grid, dense, score)
    names = list(options)
    limits = cfg.budgets.limits(baseline.macs, baseline.params)
    found: list[tuple[float, dict[str, Any]]] = []
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
        found.append((macs / baseline.macs, fixed | block_params(space)))
    found.sort(key=lambda item: item[0])
    rungs = [found[i] for i in _spread([m for m, _ in found], MAX_RUNGS, log=True)]
    if log is not None:
        count = sum(len(o) for o in options.values())
        log(
            f"allocation ladder: {len(rungs)} zero-training allocations within budget "
            f"({count} layer options scored in {time.perf_counter() - start:.1f} s)"
        )
    return rungs


class Ladder:
    """The allocation ladder tried one rung at a time: the cheapest first, then always the
    rung that best fills the largest gap of the study's accuracy-vs-MACs staircase.

    Between two neighbouring evaluated MAC positions ``m1 < m2`` (MACs ratio) whose best
    accuracies so far (at no more MACs) are ``b1 <= b2``, a new point can add at most
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
        rungs: list[tuple[float, dict[str, Any]]],
        plans: int,
        accuracy_index: int,
        baseline_accuracy: float,
    ) -> None:
        self.rungs, self.plans = rungs, plans
        self.accuracy_index, self.baseline_accuracy = accuracy_index, baseline_accuracy

    def store(self, study: optuna.Study) -> None:
        """Put the ladder on ``study`` and enqueue its cheapest rung."""
        study.set_user_attr(
            self.ATTR,
            {"rungs": [[m, p] for m, p in self.rungs], "plans": self.plans,
             "baseline_accuracy": self.baseline_accuracy},
        )  # fmt: skip
        if self.plans > 0 and self.rungs:
            self._enqueue(study, 0)

    @classmethod
    def from_study(cls, study: optuna.Study, accuracy_index: int) -> Ladder | None:
        """The ladder stored on ``study``, or None."""
        raw = study.user_attrs.get(cls.ATTR)
        if not raw:
            return None
        rungs = [(float(m), dict(p)) for m, p in raw["rungs"]]
        return cls(rungs, int(raw["plans"]), accuracy_index, float(raw["baseline_accuracy"]))

    def _enqueue(self, study: optuna.Study, rung: int) -> None:
        label = f"allocation {rung + 1}/{len(self.rungs)}"
        study.enqueue_trial(self.rungs[rung][1], user_attrs={"warm_start": label})

    @staticmethod
    def _rung(trial: FrozenTrial) -> int | None:
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
        tried = {r for r in map(self._rung, trials) if r is not None}
        free = [i for i in range(len(self.rungs)) if i not in tried]
        if len(tried) >= self.plans or not free:
            return None
        steps = self._staircase(trials)
        top = self.rungs[-1][0]
        if not steps:
            return min(free, key=lambda i: self.rungs[i][0])
        gaps = [(lo, hi, (hi - lo) * (b - a)) for (lo, a), (hi, b) in itertools.pairwise(steps)]
        if steps[-1][0] < top:  # above the dearest evaluated point: up to the baseline's accuracy
            rise = max(0.0, self.baseline_accuracy - steps[-1][1])
            gaps.append((steps[-1][0], top, (top - steps[-1][0]) * rise))
        for lo, hi, area in sorted(gaps, key=lambda gap: gap[2], reverse=True):
            inside = [
                i for i in free if lo < self.rungs[i][0] < hi or self.rungs[i][0] == hi == top
            ]
            if inside and area > 0:
                return min(inside, key=lambda i: abs(self.rungs[i][0] - (lo + hi) / 2))
        return None

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """``study.optimize`` callback: enqueue the next rung unless one is waiting."""
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING and self._rung(t) is not None for t in trials):
            return
        rung = self.next_rung(trials)
        if rung is not None:
            self._enqueue(study, rung)
