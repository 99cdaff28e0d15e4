"""The allocation ladder built by every process of a study, through the study's storage.

Scoring the ladder's options (:mod:`autodecomp.search.options`) is split into units: one
per (offered method, grid ratio), scoring that method at that ratio on every layer, and
with ``initial_design.tracks`` one per offered method, listing its uniform plans
(:func:`~autodecomp.search.allocate.uniform_candidates`). Creating a study
(:func:`enqueue_units`) makes a companion Optuna study ``<name>:ladder`` in the same
storage with one WAITING trial per unit (user attribute ``ladder_unit``) and scores nothing.

Every process running the study's trials first runs :func:`build_ladder`: Optuna's
storage is the scheduler. The process runs the companion study's trials by the loop every
process of a study runs (:func:`~autodecomp.search.loop.run_until_total`): under the
study's start lock it pops a WAITING unit (``storage.set_trial_state_values(trial,
RUNNING)``, which only one process wins), scores it with a heartbeat, stores its rows as
user attributes and tells it COMPLETE; a unit whose process died is failed after the
heartbeat's grace period and re-queued, an interrupted one at once. Once every unit is
COMPLETE, the first process to take the study's start lock assembles the ladder from the
stored rows, in the units' fixed order (so the ladder does not depend on which process
scored what; equal to :func:`~autodecomp.search.allocate.allocation_ladder`), stores it
on the study (``allocation_ladder``, ``layer_option_scores``, and ``ladder_build``: the
seconds from the first claim to the ladder stored, the units and processes), enqueues its
first rung and deletes the companion study; the others find it stored.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..config import StudyConfig
from ..workload.data import DataSplits
from .allocate import Rung, Rungs, assemble_ladder, uniform_candidates, uniform_rungs
from .baseline import Baseline
from .ladder import Ladder
from .loop import run_until_total
from .options import (
    Option,
    Scored,
    ScoringContext,
    gather_options,
    grid_ratios,
    offered_methods,
    scoring_context,
    unit_options,
)
from .space import SearchSpace, layer_params
from .storage import Heartbeat, trial_start_lock

__all__ = [
    "BUILD_ATTR",
    "UNIT_ATTR",
    "BuildResult",
    "build_ladder",
    "enqueue_units",
    "ladder_build",
    "ladder_units",
    "units_study_name",
]

_log = logging.getLogger(__name__)
UNIT_ATTR = "ladder_unit"  # a unit trial's user attribute: which unit it is
BUILD_ATTR = "ladder_build"  # the study's user attribute: how the ladder was built
_ROWS = "rows"  # a scored unit's result (user attribute)
_SUFFIX = ":ladder"
_POLL_S = 1.0  # seconds between looks while others score the last units

Unit = dict[str, Any]  # {"kind": "options", "method", "index"} or {"kind": "uniform", "method"}


def units_study_name(name: str) -> str:
    """The companion study holding the units of study ``name``'s ladder."""
    return f"{name}{_SUFFIX}"


def ladder_units(cfg: StudyConfig, space: SearchSpace) -> list[Unit]:
    """The units of the study's ladder in their fixed order: method by method, grid ratio by
    grid ratio, then (with tracks) each method's uniform plans."""
    methods = offered_methods(space)
    units: list[Unit] = [
        {"kind": "options", "method": m, "index": i}
        for m in methods
        for i in range(cfg.initial_design.grid)
    ]
    if cfg.initial_design.tracks > 0:
        units += [{"kind": "uniform", "method": m} for m in methods]
    return units


def _claim_order(units: list[Unit]) -> list[Unit]:
    """The order the units are enqueued (and so claimed) in: the dearest first, so that the
    last units to finish are short ones: the uniform plans (64 ratios each, some fitted),
    then the options by grid ratio, the highest first (they fit the largest ranks)."""
    return sorted(units, key=lambda u: (u["kind"] != "uniform", -u.get("index", 0)))


def enqueue_units(
    storage: optuna.storages.BaseStorage, cfg: StudyConfig, space: SearchSpace
) -> None:
    """Create the companion study of ``cfg.name`` with one WAITING trial per unit (one left
    by an interrupted creation is replaced)."""
    name = units_study_name(cfg.name)
    with suppress(KeyError):
        optuna.delete_study(study_name=name, storage=storage)
    units = optuna.create_study(study_name=name, storage=storage)
    for unit in _claim_order(ladder_units(cfg, space)):
        units.enqueue_trial({}, user_attrs={UNIT_ATTR: unit})


def _key(unit: Mapping[str, Any]) -> tuple[str, str, int]:
    return unit["kind"], unit["method"], int(unit.get("index", -1))


def _unit_text(unit: Unit, ratios: list[float]) -> str:
    if unit["kind"] == "uniform":
        return f"uniform {unit['method']}"
    return f"{unit['method']} @ {ratios[unit['index']]:.3g}"


class _UnitObjective:
    """Scores the unit of a trial of the companion study (the scoring context is built on
    the first unit this process claims)."""

    def __init__(
        self,
        cfg: StudyConfig,
        space: SearchSpace,
        baseline: Baseline,
        splits: DataSplits,
        units: list[Unit],
    ) -> None:
        self.cfg, self.space, self.baseline, self.splits = cfg, space, baseline, splits
        self.units = units
        self.ratios = grid_ratios(space, cfg.initial_design.grid)
        self._context: ScoringContext | None = None

    @property
    def context(self) -> ScoringContext:
        if self._context is None:
            self._context = scoring_context(self.cfg, self.space, self.baseline, self.splits)
        return self._context

    def _unit(self, trial: optuna.Trial) -> Unit:
        """The trial's unit; a fresh trial (every retry of a unit spent) adopts a unit that
        no trial holds any more."""
        unit = trial.user_attrs.get(UNIT_ATTR)
        if unit is not None:
            return unit
        held = {
            _key(t.user_attrs[UNIT_ATTR])
            for t in trial.study.get_trials(deepcopy=False)
            if UNIT_ATTR in t.user_attrs and t.state != TrialState.FAIL
        }
        unit = next(u for u in self.units if _key(u) not in held)
        trial.set_user_attr(UNIT_ATTR, unit)
        return unit

    def __call__(self, trial: optuna.Trial) -> float:
        start = time.perf_counter()
        unit = self._unit(trial)
        if unit["kind"] == "uniform":
            limits = self.cfg.budgets.limits(self.baseline.macs, self.baseline.params)
            c = self.context
            rows: list[Any] = uniform_candidates(
                c.model, self.space, c.cost, unit["method"], limits
            )
            what = f"{len(rows)} uniform plans"
        else:
            failed: list[str] = []
            options = unit_options(self.context, unit["method"], self.ratios, unit["index"], failed)
            rows = [[n, o.macs, o.params_count, float(o.error), o.rank] for n, o in options.items()]
            what = f"{len(rows)} layer options" + (f" ({len(failed)} failed)" if failed else "")
        trial.set_user_attr(_ROWS, rows)
        seconds = time.perf_counter() - start
        _log.info(f"ladder unit {_unit_text(unit, self.ratios)}: {what} in {seconds:.1f} s")
        return seconds


def _results(trials: list[FrozenTrial]) -> dict[tuple[str, str, int], FrozenTrial]:
    """Each unit's COMPLETE trial (the first, should one have been scored twice)."""
    done: dict[tuple[str, str, int], FrozenTrial] = {}
    for trial in trials:
        if trial.state == TrialState.COMPLETE:
            done.setdefault(_key(trial.user_attrs[UNIT_ATTR]), trial)
    return done


def _assemble(
    cfg: StudyConfig,
    space: SearchSpace,
    baseline: Baseline,
    context: ScoringContext,
    units: list[Unit],
    done: Mapping[tuple[str, str, int], FrozenTrial],
) -> Rungs:
    """The ladder from the units' stored rows, read in the units' fixed order."""
    ratios = grid_ratios(space, cfg.initial_design.grid)
    layers = {layer.name: layer for layer in space.layers}
    scored_units: list[dict[str, Option]] = []
    uniform: dict[str, list[Rung]] = {}
    for unit in units:
        rows = done[_key(unit)].user_attrs[_ROWS]
        method = unit["method"]
        if unit["kind"] == "uniform":
            uniform[method] = uniform_rungs(space, method, [(m, r) for m, r in rows])
            continue
        ratio = ratios[unit["index"]]
        scored_units.append(
            {
                name: Option(
                    layer_params(layers[name], method, ratio), macs, count, error, ratio, rank
                )
                for name, macs, count, error, rank in rows
            }
        )
    options = gather_options(space, context.dense, scored_units)
    scored = Scored(options, context.dense, context.cost, context.score)
    return assemble_ladder(cfg, space, baseline, scored, uniform, cfg.initial_design.grid)


@dataclass(frozen=True)
class BuildResult:
    """How :func:`build_ladder` ended in this process."""

    scored: int = 0  # units this process scored
    interrupted: bool = False  # Ctrl-C or SIGTERM: its running unit was re-queued


def build_ladder(
    study: optuna.Study,
    cfg: StudyConfig,
    space: SearchSpace,
    baseline: Baseline,
    splits: DataSplits,
    *,
    url: str,
    storage: optuna.storages.BaseStorage,
    heartbeat: Heartbeat,
    attrs: Mapping[str, Any],
) -> BuildResult:
    """Score units of ``study``'s ladder until none is left, wait for those others score,
    then assemble and store the ladder once (see the module's text). Nothing to do when the
    ladder is stored or the study has no units (no ladder, or created before units).

    Args:
        study: the study, loaded from ``storage``.
        cfg, space, baseline, splits: the study's config, search space, baseline and data.
        url: the storage's URL (picks the start lock).
        storage: the opened storage (with ``heartbeat``).
        heartbeat: its heartbeat settings.
        attrs: user attributes set on each unit trial (the process's identity).
    """
    name = units_study_name(study.study_name)
    if Ladder.ATTR in study.user_attrs or name not in _study_names(storage):
        return BuildResult()
    units = ladder_units(cfg, space)
    objective = _UnitObjective(cfg, space, baseline, splits, units)
    try:
        result = run_until_total(
            optuna.load_study(study_name=name, storage=storage),
            objective,
            url=url,
            storage=storage,
            total=len(units),
            heartbeat=heartbeat,
            attrs=attrs,
            catch=(),
            poll_s=_POLL_S,
        )
    except KeyError:  # the companion study was deleted: the ladder is stored
        if Ladder.ATTR not in study.user_attrs:
            raise
        return BuildResult()
    if result.interrupted:
        return BuildResult(result.ran, interrupted=True)
    with trial_start_lock(url, storage, study.study_name):
        if Ladder.ATTR not in study.user_attrs:
            _store(study, cfg, space, baseline, objective.context, units, storage)
    return BuildResult(result.ran)


def _study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return [s.study_name for s in storage.get_all_studies()]


def _store(
    study: optuna.Study,
    cfg: StudyConfig,
    space: SearchSpace,
    baseline: Baseline,
    context: ScoringContext,
    units: list[Unit],
    storage: optuna.storages.BaseStorage,
) -> None:
    """Assemble the ladder, store it on ``study`` with its build record, enqueue its first
    rung and delete the companion study."""
    start = time.perf_counter()
    name = units_study_name(study.study_name)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    done = _results(trials)
    rungs = _assemble(cfg, space, baseline, context, units, done)
    accuracy_index = cfg.objectives.index("accuracy")
    ladder = Ladder(rungs, cfg.initial_design.plans, accuracy_index, baseline.accuracy)
    starts = [t.datetime_start.timestamp() for t in done.values() if t.datetime_start]
    by_process: dict[str, int] = {}
    for trial in done.values():
        pid = str((trial.user_attrs.get("worker") or {}).get("pid"))
        by_process[pid] = by_process.get(pid, 0) + 1
    record = {
        "seconds": round(time.time() - min(starts), 3) if starts else 0.0,
        "units": len(units),
        "unit_seconds": round(sum(t.value or 0.0 for t in done.values()), 3),
        "processes": len(by_process),
        "by_process": by_process,
        "completed": sum(t.state == TrialState.COMPLETE for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "assemble_seconds": round(time.perf_counter() - start, 3),
        "assembled_by": os.getpid(),
    }
    study.set_user_attr(BUILD_ATTR, record)
    ladder.store(study)
    optuna.delete_study(study_name=name, storage=storage)
    _log.info(
        f"allocation ladder stored: {len(rungs)} rungs from {record['units']} units scored by "
        f"{record['processes']} process(es) in {record['seconds']:.1f} s; up to "
        f"{min(ladder.plans, len(rungs))} trials climb it, after any warm starts"
    )


def ladder_build(study: optuna.Study) -> dict[str, Any] | None:
    """The study's ladder build record, or None: ``seconds`` from the first unit claimed to
    the ladder stored, ``units``, ``unit_seconds`` (their scoring time summed),
    ``processes`` and ``by_process`` (units scored per process id), the unit trials
    ``completed`` and ``failed`` (a dead or interrupted process's), ``assemble_seconds``,
    ``assembled_by``."""
    return study.user_attrs.get(BUILD_ATTR)
