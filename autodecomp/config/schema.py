"""The validated configuration of a study: frozen dataclasses, each setting declared once.

A section read from ``study.yaml`` (``data``, ``baseline``, ``proxy``, ``budgets``,
``latency``, ``sampler``, ``initial_design``, ``model``) declares each key as a field with
its default and its check (:func:`~autodecomp.config.checks.setting`); the loader builds it
with :func:`~autodecomp.config.checks.section`. Paths are absolute here; ``to_dict`` stores
them relative to the study folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.budget import absolute_limit
from ..measure.objectives import objective
from .checks import (
    at_least,
    budget,
    budgets,
    choice,
    existing_path,
    flag,
    known,
    optional,
    positive,
    setting,
    table,
    text,
    within,
)
from .samplers import PRUNERS, SAMPLERS

__all__ = [
    "BaselineConfig",
    "Budgets",
    "DataConfig",
    "InitialDesign",
    "LatencyConfig",
    "LayerRule",
    "ModelConfig",
    "ProxyConfig",
    "RatioRange",
    "SamplerConfig",
    "SpaceConfig",
    "StudyConfig",
    "WarmStart",
]


@dataclass(frozen=True)
class RatioRange:
    """Range of a parameter ratio (fraction of the dense layer's parameters)."""

    lo: float
    hi: float
    log: bool = False
    step: float | None = None


@dataclass(frozen=True)
class LayerRule:
    """A per-layer override: settings for the target layers matching ``layers`` (globs)."""

    layers: tuple[str, ...]
    methods: tuple[str, ...] | None = None
    keep: bool | None = None
    ratio: RatioRange | None = None
    ranks: dict[str, tuple[Any, ...]] | None = None


@dataclass(frozen=True)
class SpaceConfig:
    """A search space: target layers, allowed methods, ratio / rank choices per layer.

    ``shift_prune``: range of the fraction of intermediate channels removed from each shift
    block (and from layers decomposed into shift blocks); ``None`` disables pruning.
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    keep: bool = True
    ratio: RatioRange = RatioRange(0.1, 0.8)
    ranks: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    shift_prune: RatioRange | None = None
    overrides: tuple[LayerRule, ...] = ()
    init: str = "weight"  # "data": decomposed layers fit their output on calibration images
    rank_multiple: int = 1  # ratio-chosen channel ranks >= this are rounded down to a multiple
    solvers: dict[str, str] = field(default_factory=dict)  # method -> "tensorly" (the default
    # "autodecomp" is left out); carried into plan entries as the option "solver"
    max_layer_macs: float = 1.0  # no option over this fraction of its dense layer's MACs
    source: str = "<inline>"


# ---- study -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    """The model to compress: a registered name (or import path) and its builder's arguments."""

    name: str = setting(check=text)
    kwargs: dict[str, Any] = setting(check=table, factory=dict)


@dataclass(frozen=True)
class DataConfig:
    """The data set (:func:`autodecomp.workload.data.load_data`) and its loaders' workers."""

    name: str = setting("digits", check=text)
    root: Path | None = setting(None, check=optional(existing_path))
    image_size: int | None = setting(None, check=optional(at_least(1)))
    channels: int | None = setting(None, check=optional(at_least(1)))
    val_fraction: float = setting(0.1, check=within(0.0, 0.9))
    test_fraction: float = setting(0.2, check=within(0.0, 0.9))
    num_workers: int = setting(0, check=at_least(0))


@dataclass(frozen=True)
class BaselineConfig:
    """A checkpoint (state dict) to load, or the recipe that trains the baseline once."""

    checkpoint: Path | None = setting(None, check=optional(existing_path))
    epochs: int = setting(20, check=at_least(0))
    lr: float = setting(0.05, check=positive)
    batch_size: int = setting(64, check=at_least(1))
    weight_decay: float = setting(5e-4, check=within(0.0))


@dataclass(frozen=True)
class ProxyConfig:
    """The per-trial accuracy proxy: BN recalibration, short distillation, evaluation.

    Zero-training scores are computed on ``calibration_size`` fixed training images (0
    turns them off); a trial whose whole-network output error exceeds ``max_output_error``
    is pruned before any training (``None``: never).
    """

    steps: int = setting(100, check=at_least(0))
    lr: float = setting(0.01, check=positive)
    batch_size: int = setting(64, check=at_least(1))
    temperature: float = setting(4.0, check=positive)
    alpha: float = setting(0.9, check=within(0.0, 1.0))
    weight_decay: float = setting(0.0, check=within(0.0))
    bn_batches: int = setting(4, check=at_least(0))
    eval_batch_size: int = setting(256, check=at_least(1))
    accuracy_floor: float = setting(0.0, check=within(0.0, 1.0))
    floor_step: int = setting(0, check=at_least(0))
    floor_batches: int = setting(2, check=at_least(1))
    calibration_size: int = setting(64, check=at_least(0))
    max_output_error: float | None = setting(None, check=optional(positive))
    # linear LR warm-up of the distillation; None: steps // 10
    warmup_steps: int | None = setting(None, check=optional(at_least(0)))

    @property
    def warmup(self) -> int:
        """The distillation's warm-up steps (``warmup_steps``, by default a tenth of ``steps``)."""
        return self.steps // 10 if self.warmup_steps is None else min(self.warmup_steps, self.steps)


@dataclass(frozen=True)
class Budgets:
    """Upper limits; a value <= 1 is a fraction of the baseline, a larger one an absolute count.

    ``max_macs`` / ``max_params`` are read by :func:`autodecomp.core.budget.parse_budget`
    (``0.5``, ``'50%'``, ``'0.5x'``, ``700000``, ``'700k'``, ``'2.5M'``).
    ``max_latency_ms`` is always absolute: median milliseconds per batch (see
    :class:`LatencyConfig`).
    """

    max_macs: float | None = setting(None, check=budget)
    max_params: float | None = setting(None, check=budget)
    max_latency_ms: float | None = setting(None, check=optional(positive))

    def limits(self, baseline_macs: int, baseline_params: int) -> dict[str, float]:
        """Absolute limits keyed by ``"macs"`` / ``"params"`` / ``"latency"`` (those set)."""
        out = {
            key: absolute_limit(value, base)
            for key, value, base in (
                ("macs", self.max_macs, baseline_macs),
                ("params", self.max_params, baseline_params),
            )
            if value is not None
        }
        if self.max_latency_ms is not None:
            out["latency"] = self.max_latency_ms
        return out


@dataclass(frozen=True)
class LatencyConfig:
    """How inference latency is measured (median over ``repeats`` after ``warmup`` runs).

    Measured when ``latency`` is an objective, ``budgets.max_latency_ms`` is set, or
    ``measure`` is true: on the CPU with ``threads`` intra-op threads, and also on the
    study's GPU when it runs on one; ``device`` picks the one the objective / budget uses.
    """

    batch_size: int = setting(1, check=at_least(1))
    warmup: int = setting(5, check=at_least(0))
    repeats: int = setting(20, check=at_least(1))
    threads: int = setting(1, check=at_least(1))
    device: str = setting("cpu", check=choice(("cpu", "cuda")))
    measure: bool = setting(False, check=flag)


@dataclass(frozen=True)
class SamplerConfig:
    """The Optuna sampler (:data:`~autodecomp.config.samplers.SAMPLERS`), its seed and options,
    and the multi-fidelity pruner of the proxy fine-tune
    (:func:`~autodecomp.config.samplers.make_pruner`): ``pruner`` (``none`` or
    ``successive_halving``), its first rung ``pruner_min_steps`` (None: ``proxy.steps`` /
    ``pruner_reduction``**2) and ``pruner_reduction`` (rungs grow, and survivors shrink, by it).
    """

    name: str = setting("tpe", check=known(SAMPLERS))
    seed: int = setting(0, check=at_least(0))
    options: dict[str, Any] = setting(check=table, factory=dict)
    pruner: str = setting("none", check=known(PRUNERS))
    pruner_min_steps: int | None = setting(None, check=optional(at_least(1)))
    pruner_reduction: int = setting(3, check=at_least(2))


@dataclass(frozen=True)
class WarmStart:
    """A uniform baseline enqueued on study creation: every target layer ``method`` at ``ratio``."""

    method: str
    ratio: float | None = None


@dataclass(frozen=True)
class InitialDesign:
    """Zero-training allocations enqueued on study creation (:mod:`autodecomp.search.allocate`).

    ``plans`` of them (0: none), from ``grid`` ratios per method and layer, each option
    scored by ``score``: ``network`` (the relative logit error of the baseline with only
    that layer replaced) or ``layer`` (the layer's relative output error); ``tracks``
    single-method uniform sweeps join the error front's plans, each probed once first;
    ``balanced`` adds the minimax-error plans (every layer its cheapest option under one
    shared error cap, in the spirit of ALDS) as a track of their own. ``uniform_at``: MAC
    budgets (the ones the study's models will be exported at) where every offered method's
    dearest uniform plan is enqueued before anything else
    (:func:`~autodecomp.search.uniform_arms.budget_arms`).
    """

    plans: int = setting(0, check=at_least(0))
    grid: int = setting(8, check=at_least(2))
    score: str = setting("network", check=choice(("network", "layer")))
    tracks: int = setting(0, check=at_least(0))
    balanced: bool = setting(False, check=flag)
    uniform_at: tuple[float, ...] = setting((), check=budgets)


@dataclass(frozen=True)
class StudyConfig:
    """A whole study, validated. ``folder`` holds the outputs (db, baseline cache, tables)."""

    name: str
    folder: Path
    model: ModelConfig
    data: DataConfig
    baseline: BaselineConfig
    space: SpaceConfig
    proxy: ProxyConfig
    budgets: Budgets
    objectives: tuple[str, ...]
    sampler: SamplerConfig
    trials: int
    storage: str
    device: str
    seed: int = 0
    threads: int | None = None
    warm_start: tuple[WarmStart, ...] = ()
    latency: LatencyConfig = LatencyConfig()
    initial_design: InitialDesign = InitialDesign()
    # deterministic kernels and a fixed CPU thread count (autodecomp.workload.runtime);
    # None: on for a CPU study, off on a GPU (see ``is_deterministic``)
    deterministic: bool | None = setting(None, check=optional(flag))

    @property
    def is_deterministic(self) -> bool:
        """Whether runs use deterministic kernels and a fixed thread count (``deterministic``,
        by default on unless the study runs on a GPU)."""
        if self.deterministic is not None:
            return self.deterministic
        return not self.device.startswith("cuda")

    @property
    def directions(self) -> list[str]:
        """Optuna's direction of each objective, in order."""
        return [objective(name).direction for name in self.objectives]

    @property
    def measures_latency(self) -> bool:
        """Whether trials measure latency (an objective, a budget, or asked for)."""
        return (
            "latency" in self.objectives
            or self.budgets.max_latency_ms is not None
            or self.latency.measure
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (paths relative to the study folder), stored on the study."""
        return _jsonable(asdict(self), self.folder)


def _jsonable(value: Any, folder: Path) -> Any:
    if isinstance(value, Path):
        return os.path.relpath(value, folder) if value != folder else "."
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, folder) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v, folder) for v in value]
    return value
