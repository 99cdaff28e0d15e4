"""Create, resume and run a search study (storage URLs: :mod:`autodecomp.search.storage`).

Order of work in :func:`run_search`: validate everything that can be wrong (config, data,
model, search space, warm starts, sampler options, storage reachability, budgets that some
plan of the space meets) without writing anything; then load or train the baseline; then
create or load the Optuna study and run trials until ``trials`` of them are COMPLETE or
PRUNED (failed trials do not count), by the loop every worker runs
(:mod:`autodecomp.search.loop`): exactly the total under the study's start lock, even with
several ``search`` processes on one study; a heartbeat, so that a trial whose process was
killed is failed and re-queued by the next run; Ctrl-C or SIGTERM re-queue the running
trial. Re-running the same command resumes; warm-start trials are enqueued only when the
study is created. On resume the stored config must match, except ``trials``, ``storage``,
``device``, ``threads`` and ``deterministic``. The CLI writes the tables afterwards
(:func:`autodecomp.results.tables.summarise_search`), after a Ctrl-C too.
:func:`setup_study` does the same up to the study's creation and runs no trial: the start
of a study shared by many processes (:mod:`autodecomp.search.worker`).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import socket
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from ..compress.plan import plan_summary
from ..config import SAMPLERS, SamplerConfig, StudyConfig, config_from_dict
from ..config.samplers import make_pruner
from ..core.errors import ConfigError
from ..core.optuna_compat import set_metric_names
from ..factorize import default_cache
from ..measure.plan_cost import PlanCost
from ..workload import train
from ..workload.data import DataSplits, load_data
from ..workload.models import get_model
from ..workload.runtime import configure_runtime, environment
from .baseline import Baseline, load_baseline
from .ladder import Ladder
from .ladder_units import build_ladder, enqueue_units
from .loop import COUNTED, counted_text, run_until_total
from .objective import Objective
from .seeds import seed_each_trial, study_seeds
from .space import SearchSpace, check_budgets, resolve_space, uniform_params
from .storage import Heartbeat, check_storage, open_storage, setup_lock
from .uniform_arms import budget_arms

__all__ = [
    "COUNTED",
    "Prepared",
    "SearchResult",
    "check_same_config",
    "check_storage",
    "flat_config",
    "make_sampler",
    "open_storage",
    "open_study",
    "prepare",
    "prepare_baseline",
    "quiet_optuna",
    "run_search",
    "setup_study",
    "shared_factor_cache",
    "study_callbacks",
    "trial_summary",
]

_log = logging.getLogger(__name__)
_RATIOS = ("macs_ratio", "params_ratio")  # compressed / baseline, as trials store them

# Config keys that may differ between the stored study and a resuming run.
_HARMLESS = {"trials", "storage", "device", "threads", "deterministic", "space.source"}


def make_sampler(
    cfg: SamplerConfig, offset: int = 0, *, parallel: bool = False
) -> optuna.samplers.BaseSampler:
    """The Optuna sampler seeded with ``seed + offset``; ``options`` go to its constructor.

    Before every trial its random states are re-seeded from ``(seed, trial number)``
    (:func:`~autodecomp.search.seeds.seed_each_trial`), so a resumed study draws what an
    uninterrupted one would have; ``offset`` (a resume's trial count, a worker's own
    number; the seed wraps at 2**32) only seeds what it draws outside a trial.
    TPE's ``constant_liar`` (which re-reads the storage for every parameter so that
    parallel workers see each other's running trials) defaults to ``parallel``: off for
    one process, where it would only cost time.
    """
    cls = SAMPLERS.get(cfg.name)
    valid = [p for p in inspect.signature(cls).parameters if p not in ("seed", "constraints_func")]
    for key in cfg.options:
        if key not in valid:
            raise ConfigError(
                f"unknown sampler.options key {key!r} for {cfg.name}; valid: {', '.join(valid)}"
            )
    options = dict(cfg.options)
    if cfg.name == "tpe":
        options.setdefault("constant_liar", parallel)
    if cfg.name == "gp":  # method-scoped ratios are conditional: GP samples them independently
        options.setdefault("warn_independent_sampling", False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = cls(seed=(cfg.seed + offset) % 2**32, **options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"sampler {cfg.name} options {cfg.options}: {err}") from None
    return seed_each_trial(sampler, cfg.seed)


@dataclass(frozen=True)
class Prepared:
    """Everything validated before anything is written."""

    splits: DataSplits
    model: nn.Module
    space: SearchSpace
    sampler: optuna.samplers.BaseSampler
    warm_starts: tuple[tuple[str, dict[str, Any]], ...]  # (label, fixed params)


def prepare(cfg: StudyConfig) -> Prepared:
    """Build data, model, search space, warm starts and sampler (reads only: ``export`` uses
    it on a read-only study folder; :func:`prepare_baseline` also checks storage and budgets).

    First sets torch's determinism and thread count (``deterministic``, ``threads``:
    :func:`~autodecomp.workload.runtime.configure_runtime`); the model's initial weights
    are drawn from generators seeded with ``seed`` (:mod:`autodecomp.search.seeds`).

    Raises:
        ConfigError: anything invalid; nothing has been written when it is raised.
    """
    configure_runtime(deterministic=cfg.is_deterministic, threads=cfg.threads, device=cfg.device)
    d = cfg.data
    try:
        splits = load_data(
            d.name,
            root=None if d.root is None else str(d.root),
            image_size=d.image_size,
            channels=d.channels,
            seed=cfg.seed,
            val_fraction=d.val_fraction,
            test_fraction=d.test_fraction,
        )
    except ValueError as err:
        raise ConfigError(f"data: {err}") from None
    train.set_seed(cfg.seed)
    try:
        model = get_model(
            cfg.model.name,
            num_classes=splits.num_classes,
            in_channels=splits.input_shape[0],
            **cfg.model.kwargs,
        )
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model: {err}") from None
    space = resolve_space(model, cfg.space, splits.input_shape)
    warm: list[tuple[str, dict[str, Any]]] = []
    for start in cfg.warm_start:
        params = uniform_params(space, start.method, start.ratio)
        if all(params != seen for _, seen in warm):
            label = start.method if start.ratio is None else f"{start.method}@{start.ratio}"
            warm.append((label, params))
    sampler = make_sampler(cfg.sampler)
    return Prepared(splits, model, space, sampler, tuple(warm))


def flat_config(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config mapping as ``{"dotted.key": value}``."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flat_config(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def check_same_config(name: str, stored: Mapping[str, Any] | None, new: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` if ``new`` differs from the stored config beyond what a
    resume may change (``trials``, ``storage``, ``device``, ``threads``, ``deterministic``).
    Keys the stored config lacks (a study made by an older version) compare as their
    defaults."""
    if stored is None:
        return
    with suppress(ConfigError):  # unreadable: compared as stored, the message names the key
        stored = config_from_dict(stored, ".").to_dict()
    old_flat, new_flat = flat_config(stored), flat_config(new)
    for key in sorted(set(old_flat) | set(new_flat)):
        if key in _HARMLESS or old_flat.get(key) == new_flat.get(key):
            continue
        raise ConfigError(
            f"study {name!r} was created with {key}={old_flat.get(key)!r}, now "
            f"{new_flat.get(key)!r}; only trials, storage, device, threads and deterministic may "
            "change on resume "
            "(choose a new study name, or delete the study)"
        )


def _exists(storage: optuna.storages.BaseStorage, name: str) -> bool:
    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        return False
    return True


def open_study(
    cfg: StudyConfig,
    prepared: Prepared,
    baseline: Baseline,
    storage: optuna.storages.BaseStorage | None = None,
) -> optuna.Study:
    """Load the study, or create it (storing config, folder and baseline, enqueueing warm
    starts). Workers find the baseline and factor cache in the stored ``folder``. A new
    study with an allocation ladder (``initial_design.plans``) gets its scoring units
    enqueued in a companion study first (:func:`~autodecomp.search.ladder_units.enqueue_units`;
    nothing is scored here): every process running its trials builds the ladder together
    (:func:`build_ladder`), then climbs it. Enqueued first: the warm starts, then the uniform
    arms at ``initial_design.uniform_at`` (:func:`budget_arms`). ``storage``: the opened
    ``cfg.storage`` (default: opened here, with the default heartbeat)."""
    storage = storage or open_storage(cfg.storage)
    config = cfg.to_dict()
    if cfg.initial_design.plans > 0 and not _exists(storage, cfg.name):
        enqueue_units(storage, cfg, prepared.space)
    try:
        study = optuna.create_study(
            study_name=cfg.name,
            storage=storage,
            sampler=prepared.sampler,
            directions=cfg.directions,
            pruner=make_pruner(cfg.sampler, cfg.proxy.steps),
        )
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(
            study_name=cfg.name,
            storage=storage,
            sampler=prepared.sampler,
            pruner=make_pruner(cfg.sampler, cfg.proxy.steps),
        )
        check_same_config(cfg.name, study.user_attrs.get("config"), config)
        if study.metric_names is None:  # made before studies named their values
            set_metric_names(study, cfg.objectives)
        study.sampler = make_sampler(cfg.sampler, offset=len(study.get_trials(deepcopy=False)))
        return study
    set_metric_names(study, cfg.objectives)
    study.set_user_attr("config", config)
    study.set_user_attr("folder", str(cfg.folder))
    study.set_user_attr("baseline", baseline.info())
    limits = cfg.budgets.limits(baseline.macs, baseline.params)
    study.set_user_attr("limits", limits)
    study.set_user_attr("environment", {**environment(cfg.device), "seeds": study_seeds(cfg)})
    arms = []
    if cfg.initial_design.uniform_at:
        cost = PlanCost(baseline.model, baseline.input_shape, prepared.space.names)
        arms = budget_arms(
            baseline.model, prepared.space, cost, cfg.initial_design.uniform_at, limits
        )
    for label, params in prepared.warm_starts:
        study.enqueue_trial(params, user_attrs={"warm_start": label})
    for label, params in arms:  # a plan already enqueued as a warm start runs once
        study.enqueue_trial(params, user_attrs={"warm_start": label}, skip_if_exists=True)
    return study


def trial_summary(trial: FrozenTrial, accuracy_index: int) -> str:
    """One line per finished trial: state, compression factors (baseline / compressed, as
    the report shows them: ``MACs ÷ 10.33``), accuracy, seconds, plan."""
    attrs = trial.user_attrs
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    parts = [f"trial {trial.number:4d}", f"{trial.state.name:8s}"]
    if "macs_ratio" in attrs:
        macs, params = (1 / attrs[k] if attrs[k] else math.inf for k in _RATIOS)
        parts.append(f"MACs ÷ {macs:.2f} params ÷ {params:.2f}")
    if trial.state == TrialState.COMPLETE and attrs.get("over_budget"):
        parts.append("over budget (not trained)")
    elif trial.state == TrialState.COMPLETE:
        pre = attrs.get("pre_ft_accuracy")
        pre_text = f" (pre-ft {pre:.4f})" if pre is not None else ""
        parts.append(f"acc {trial.values[accuracy_index]:.4f}{pre_text}")
    else:
        parts.append(str(attrs.get("pruned") or attrs.get("fail_reason") or "interrupted"))
    parts += [f"{seconds:6.1f} s", plan_summary(attrs.get("plan"))]
    return "  ".join(parts)


@contextmanager
def _progress(cfg: StudyConfig, done: int) -> Iterator[Callable[[optuna.Study, FrozenTrial], None]]:
    from tqdm.auto import tqdm

    accuracy_index = cfg.objectives.index("accuracy")
    shown = _log.isEnabledFor(logging.INFO)  # no bar under --quiet
    bar = tqdm(
        total=cfg.trials,
        initial=done,
        unit="trial",
        file=sys.stderr,
        disable=None if shown else True,
    )

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state in COUNTED:
            bar.update(1)
        with bar.external_write_mode():  # the line is not drawn over the bar
            _log.info(trial_summary(trial, accuracy_index))

    try:
        yield callback
    finally:
        bar.close()


@dataclass(frozen=True)
class SearchResult:
    study: optuna.Study
    interrupted: bool  # Ctrl-C or SIGTERM: the running trial was re-queued
    stopped: str | None = None  # why it stopped before the total (too many failures)


def _count(study: optuna.Study, states: tuple[TrialState, ...]) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna's own per-trial logs (with tracebacks) are replaced by one line per trial,
    unless the ``autodecomp`` loggers show DEBUG lines (``--verbose``)."""
    verbosity = optuna.logging.get_verbosity()
    if not _log.isEnabledFor(logging.DEBUG):
        optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


@contextmanager
def shared_factor_cache(folder: Path) -> Iterator[None]:
    """Keep factorisations (e.g. CP / PDP by ALS) on disk in the study folder for resumes."""
    previous = default_cache.directory
    default_cache.set_directory(folder)
    try:
        yield
    finally:
        default_cache.set_directory(previous)


def study_callbacks(
    study: optuna.Study, cfg: StudyConfig
) -> list[Callable[[optuna.Study, FrozenTrial], None]]:
    """Callbacks every process running trials of ``study`` passes to ``study.optimize``:
    the allocation ladder's next rung, when the study has one."""
    ladder = Ladder.from_study(study, cfg.objectives.index("accuracy"))
    return [] if ladder is None else [ladder]


def prepare_baseline(cfg: StudyConfig, *, may_train: bool = True) -> tuple[Prepared, Baseline]:
    """:func:`prepare`, check the storage and that the budgets admit a plan of the space
    (:func:`~autodecomp.search.space.check_budgets`), all with nothing written; then load,
    reuse or (``may_train``; workers never do) train the baseline."""
    prepared = prepare(cfg)
    check_storage(cfg.storage)
    check_budgets(prepared.model, prepared.space, cfg.budgets, prepared.splits.input_shape)
    baseline = load_baseline(cfg, prepared.model, prepared.splits, may_train=may_train)
    return prepared, baseline


def setup_study(cfg: StudyConfig) -> optuna.Study:
    """Validate, prepare the baseline and create (or check) the study; run no trial.

    The first step of a study shared by many processes: afterwards ``autodecomp worker``
    processes join it with only its name and storage URL.
    """
    prepared, baseline = prepare_baseline(cfg)
    factors = cfg.folder / "cache" / "factors"
    with setup_lock(cfg.storage), quiet_optuna(), shared_factor_cache(factors):
        study = open_study(cfg, prepared, baseline)
    _log.info(
        f"study {cfg.name!r} is ready: {counted_text(_count(study, COUNTED), cfg.trials, 'done')}; "
        f"baseline val accuracy {baseline.accuracy:.4f}, cache in {cfg.folder / 'cache'}"
    )
    if cfg.initial_design.plans > 0 and Ladder.ATTR not in study.user_attrs:
        _log.info("the workers build the allocation ladder together, then climb it")
    _log.info(f"start workers with: autodecomp worker --study {cfg.name} --storage {cfg.storage}")
    if cfg.storage.startswith("sqlite"):
        _log.info(
            "(SQLite is for one process; several: journal:///... or postgresql+psycopg2://...)"
        )
    return study


def run_search(
    cfg: StudyConfig,
    *,
    heartbeat: Heartbeat | None = None,
) -> SearchResult:
    """Validate, prepare the baseline, create (or load) the study, then run its trials until
    it has ``trials`` COMPLETE + PRUNED ones: what :func:`setup_study` does, then a worker's loop
    (:func:`~autodecomp.search.loop.run_until_total`; ``heartbeat``: its heartbeat and
    retry settings, default :class:`~autodecomp.search.storage.Heartbeat`)."""
    heartbeat = heartbeat or Heartbeat()
    prepared, baseline = prepare_baseline(cfg)
    with quiet_optuna(), shared_factor_cache(cfg.folder / "cache" / "factors"):
        with setup_lock(cfg.storage):  # concurrent runs: one creates the study, once
            storage = open_storage(cfg.storage, heartbeat)
            study = open_study(cfg, prepared, baseline, storage)
        done = _count(study, COUNTED)
        _log.info(
            f"study {cfg.name!r}: {counted_text(done, cfg.trials, 'done')}"
            f"{'; nothing to run' if done >= cfg.trials else ''}; baseline val accuracy "
            f"{baseline.accuracy:.4f}, {baseline.macs:,} MACs, {baseline.params:,} params; "
            f"{len(prepared.space.layers)} layers searched, "
            f"{len(prepared.space.blocks)} shift blocks pruned"
        )
        if done >= cfg.trials:
            return SearchResult(study, interrupted=False)
        identity = {"host": socket.gethostname(), "pid": os.getpid(), "device": cfg.device}
        attrs = {"worker": {**identity, "command": "search"}}
        built = build_ladder(
            study,
            cfg,
            prepared.space,
            baseline,
            prepared.splits,
            url=cfg.storage,
            storage=storage,
            heartbeat=heartbeat,
            attrs=attrs,
        )
        if built.interrupted:
            _log.info("interrupted while building the allocation ladder (its unit is re-queued)")
            return SearchResult(study, interrupted=True)
        objective = Objective(cfg, prepared.space, baseline, prepared.splits)
        with _progress(cfg, done) as progress:
            result = run_until_total(
                study,
                objective,
                url=cfg.storage,
                storage=storage,
                total=cfg.trials,
                heartbeat=heartbeat,
                attrs=attrs,
                callbacks=[*study_callbacks(study, cfg), progress],
            )
    if result.interrupted:
        _log.info(
            "interrupted (the running trial is re-queued): writing the tables of the trials so far"
        )
    if result.stopped:
        _log.warning(f"stopping: {result.stopped}")
    return SearchResult(study, result.interrupted, result.stopped)
