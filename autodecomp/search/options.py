"""Layer options scored without training: the raw material of the allocation ladder.

Every searched layer has a set of options: ``keep`` and each offered method at ``grid``
ratios spread over the layer's range (log-spaced when the range is; the listed ranks when
the space gives explicit ranks). Each option is scored without any training by its MACs
and parameters (fvcore, one layer at a time: :class:`~autodecomp.measure.plan_cost.PlanCost`) and
an error on the calibration batch (``initial_design.score``): the relative logit error of
the baseline with only that layer replaced (``network``,
:meth:`~autodecomp.search.proxies.Calibration.network_errors`) or the layer's relative output
error given the baseline's input to it (``layer``,
:meth:`~autodecomp.search.proxies.Calibration.layer_output_errors`); the kernel error when the
study has no calibration batch.

The unit of scoring is one (method, grid ratio): one model holds every layer's replacement
at once (:func:`unit_options`). A layer whose parameters at that ratio equal those at a
lower grid ratio of the same method (its range clips both) is scored only at the lower
one, so the units are independent of each other and any process may score any of them
(:mod:`autodecomp.search.ladder_units`); :func:`layer_options` scores them all in turn.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from optuna.trial import FixedTrial
from torch import nn

from ..compress.surgery import apply_plan
from ..config import StudyConfig
from ..core.errors import DecompositionError
from ..measure.cost import count_params
from ..measure.plan_cost import PlanCost
from ..workload.data import DataSplits
from .baseline import Baseline
from .proxies import Calibration, calibration_batch, kernel_errors
from .space import KEEP, LayerSpace, SearchSpace, layer_params, suggest_plan

__all__ = [
    "Option",
    "Scored",
    "ScoringContext",
    "dense_option",
    "gather_options",
    "grid_ratios",
    "layer_options",
    "offered_methods",
    "option_method",
    "option_scores",
    "score_options",
    "scoring_context",
    "unit_options",
]


@dataclass(frozen=True)
class Option:
    """One way to treat one layer, scored without training."""

    params: dict[str, Any]  # the layer's fixed trial parameters
    macs: int
    params_count: int
    error: float
    ratio: float | None = None  # the grid ratio it was made at (None: keep)
    rank: Any = None  # the rank it was fitted at (None: keep)


def grid_ratios(space: SearchSpace, grid: int) -> list[float]:
    """``grid`` ratios over the union of the layers' ranges (each layer clips them)."""
    lo = min(layer.ratio.lo for layer in space.layers)
    hi = max(layer.ratio.hi for layer in space.layers)
    spread = np.geomspace if any(layer.ratio.log for layer in space.layers) else np.linspace
    return [float(r) for r in spread(lo, hi, grid)]


def offered_methods(space: SearchSpace) -> list[str]:
    """The methods some layer of ``space`` offers (``keep`` aside), in first-seen order."""
    return list(dict.fromkeys(m for layer in space.layers for m in layer.choices if m != KEEP))


def option_method(option: Option) -> str:
    """The method of ``option`` (``keep`` for the dense one)."""
    return next(v for k, v in option.params.items() if k.endswith("/method"))


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


class ScoringContext(NamedTuple):
    """What scoring a unit needs, built once per process: the baseline model, the space,
    the plan cost, the calibration batch (None: kernel errors), each layer's ``keep``
    option and the error scored (``network``, ``layer`` or ``kernel``)."""

    model: nn.Module
    space: SearchSpace
    cost: PlanCost
    calibration: Calibration | None
    dense: dict[str, Option]
    score: str


def scoring_context(
    cfg: StudyConfig, space: SearchSpace, baseline: Baseline, splits: DataSplits
) -> ScoringContext:
    """The :class:`ScoringContext` of a study: scored by ``initial_design.score`` on the
    calibration batch, or by the kernel error with ``proxy.calibration_size`` 0."""
    model = baseline.model
    cost = PlanCost(model, baseline.input_shape, space.names)
    calibration = None
    if cfg.proxy.calibration_size > 0:
        inputs = calibration_batch(splits.train, cfg.proxy.calibration_size, cfg.seed)
        calibration = Calibration(model, inputs, cfg.device)
    dense = {layer.name: dense_option(model, cost, layer) for layer in space.layers}
    score = cfg.initial_design.score if calibration is not None else "kernel"
    return ScoringContext(model, space, cost, calibration, dense, score)


def unit_options(
    context: ScoringContext,
    method: str,
    ratios: list[float],
    index: int,
    failed: list[str] | None = None,
) -> dict[str, Option]:
    """The options of the unit ``(method, ratios[index])``: one per layer offering
    ``method`` whose parameters differ from those at every lower grid ratio, scored on one
    model holding all of them. An option that fails to decompose
    (:class:`DecompositionError`) is left out, its message appended to ``failed``."""
    model, cost, calibration = context.model, context.cost, context.calibration
    ratio = ratios[index]
    chosen: dict[str, dict[str, Any]] = {}
    plan: dict[str, dict[str, Any]] = {}
    for layer in context.space.layers:
        if method not in layer.choices:
            continue
        params = layer_params(layer, method, ratio)
        if any(layer_params(layer, method, lower) == params for lower in ratios[:index]):
            continue
        chosen[layer.name] = params
        plan[layer.name] = _plan_entry(layer, params)
    compressed = _fitted(model, plan, failed) if plan else None
    if compressed is None:
        return {}
    _, _, records = cost(compressed, plan)
    if calibration is not None and context.score == "network":
        errors = calibration.network_errors(compressed, plan)
    elif calibration is not None:
        errors = calibration.layer_output_errors(compressed, plan)
    else:
        errors = kernel_errors(model, compressed, plan)
    return {
        name: Option(
            params,
            records[name]["macs"],
            records[name]["params"],
            errors.get(name, 0.0),
            ratio,
            records[name]["rank"],
        )
        for name, params in chosen.items()
        if name in plan  # else it failed to decompose
    }


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
    """Every layer's options (``keep`` first, then distinct (method, rank) ones, method by
    method, grid ratio by grid ratio) with their MACs, parameters and error: every unit's
    :func:`unit_options` in turn. ``dense`` holds each layer's ``keep`` option."""
    context = ScoringContext(model, space, cost, calibration, dict(dense), score)
    ratios = grid_ratios(space, grid)
    units = [
        unit_options(context, method, ratios, index, failed)
        for method in offered_methods(space)
        for index in range(len(ratios))
    ]
    return gather_options(space, dense, units)


def gather_options(
    space: SearchSpace, dense: Mapping[str, Option], units: list[Mapping[str, Option]]
) -> dict[str, list[Option]]:
    """Every layer's options: ``keep`` first (where offered), then the units' options in
    unit order (method by method, grid ratio by grid ratio)."""
    options = {
        layer.name: [dense[layer.name]] if KEEP in layer.choices else [] for layer in space.layers
    }
    for unit in units:
        for name, option in unit.items():
            options[name].append(option)
    return options


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
    training (:func:`layer_options` in the study's :func:`scoring_context`)."""
    c = scoring_context(cfg, space, baseline, splits)
    options = layer_options(c.model, space, c.cost, c.calibration, grid, c.dense, c.score, failed)
    return Scored(options, c.dense, c.cost, c.score)


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
            method = option_method(o)
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
