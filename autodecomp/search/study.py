"""Create, resume and run a search study (storage URLs: :mod:`autodecomp.search.storage`).

Order of work in :func:`run_search`: validate everything that can be wrong (config, data,
model, search space, warm starts, sampler options, storage reachability) without writing
anything; then load or train the baseline; then create or load the Optuna study and run
trials until ``trials`` of them are COMPLETE or PRUNED (failed trials do not count; each
run starts at most the missing number of trials, so a run with failures ends short and a
rerun tops it up). Re-running the same command resumes; warm-start trials are enqueued only
when the study is created. On resume the stored config must match, except ``trials``,
``storage``, ``device`` and ``threads``. The CLI writes the tables afterwards
(:func:`autodecomp.results.tables.summarise_search`), after a Ctrl-C too.
:func:`setup_study` does the same up to the study's creation and runs no trial: the start
of a study shared by many processes (:mod:`autodecomp.search.worker`).
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from ..compress.plan import plan_summary
from ..config import SAMPLERS, SamplerConfig, StudyConfig, config_from_dict
from ..core.errors import ConfigError
from ..factorize import default_cache
from ..workload.data import DataSplits, load_data
from ..workload.models import get_model
from .allocate import Ladder, allocation_ladder
from .baseline import Baseline, load_baseline
from .objective import CATCH, Objective
from .space import SearchSpace, resolve_space, uniform_params
from .storage import check_storage, open_storage

__all__ = [
    "COUNTED",
    "Prepared",
    "SearchResult",
    "check_same_config",
    "check_storage",
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

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
# Config keys that may differ between the stored study and a resuming run.
_HARMLESS = {"trials", "storage", "device", "threads", "space.source"}


def make_sampler(
    cfg: SamplerConfig, offset: int = 0, *, parallel: bool = False
) -> optuna.samplers.BaseSampler:
    """The Optuna sampler seeded with ``seed + offset``; ``options`` go to its constructor.

    A resumed study passes its trial count as ``offset`` so that it does not replay the
    random draws of the first run; each worker passes its own (the seed wraps at 2**32).
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
            return cls(seed=(cfg.seed + offset) % 2**32, **options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"sampler {cfg.name} options {cfg.options}: {err}") from None


@dataclass(frozen=True)
class Prepared:
    """Everything validated before anything is written."""

    splits: DataSplits
    model: nn.Module
    space: SearchSpace
    sampler: optuna.samplers.BaseSampler
    warm_starts: tuple[tuple[str, dict[str, Any]], ...]  # (label, fixed params)


def prepare(cfg: StudyConfig) -> Prepared:
    """Build data, model, search space, warm starts and sampler, and check the storage.

    Raises:
        ConfigError: anything invalid; nothing has been written when it is raised.
    """
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
    try:
        model = get_model(
            cfg.model.name,
            num_classes=splits.num_classes,
            in_channels=splits.input_shape[0],
            **cfg.model.kwargs,
        )
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model: {err}") from None
    space = resolve_space(model, cfg.space)
    warm: list[tuple[str, dict[str, Any]]] = []
    for start in cfg.warm_start:
        params = uniform_params(space, start.method, start.ratio)
        if all(params != seen for _, seen in warm):
            label = start.method if start.ratio is None else f"{start.method}@{start.ratio}"
            warm.append((label, params))
    sampler = make_sampler(cfg.sampler)
    check_storage(cfg.storage)
    return Prepared(splits, model, space, sampler, tuple(warm))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def check_same_config(name: str, stored: Mapping[str, Any] | None, new: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` if ``new`` differs from the stored config beyond what a
    resume may change (``trials``, ``storage``, ``device``, ``threads``). Keys the stored
    config lacks (a study made by an older version) compare as their defaults."""
    if stored is None:
        return
    with suppress(ConfigError):  # unreadable: compared as stored, the message names the key
        stored = config_from_dict(stored, ".").to_dict()
    old_flat, new_flat = _flatten(stored), _flatten(new)
    for key in sorted(set(old_flat) | set(new_flat)):
        if key in _HARMLESS or old_flat.get(key) == new_flat.get(key):
            continue
        raise ConfigError(
            f"study {name!r} was created with {key}={old_flat.get(key)!r}, now "
            f"{new_flat.get(key)!r}; only trials, storage, device and threads may change on resume "
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
    log: Callable[[str], None] | None = None,
) -> optuna.Study:
    """Load the study, or create it (storing config, folder and baseline, enqueueing warm
    starts, then the first rung of the allocation ladder). Workers find the baseline and
    factor cache in the stored ``folder``. The allocation ladder (:mod:`autodecomp.search.allocate`)
    is computed before the study is created: an interrupted creation leaves nothing behind."""
    storage = open_storage(cfg.storage)
    config = cfg.to_dict()
    ladder = None
    if cfg.initial_design.plans > 0 and not _exists(storage, cfg.name):
        rungs = allocation_ladder(
            cfg, prepared.space, baseline, prepared.splits, cfg.initial_design.grid, log=log
        )
        accuracy_index = cfg.objectives.index("accuracy")
        ladder = Ladder(rungs, cfg.initial_design.plans, accuracy_index, baseline.accuracy)
        if log is not None:
            log(f"up to {min(ladder.plans, len(rungs))} trials climb it, after any warm starts")
    try:
        study = optuna.create_study(
            study_name=cfg.name,
            storage=storage,
            sampler=prepared.sampler,
            directions=cfg.directions,
        )
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=cfg.name, storage=storage, sampler=prepared.sampler)
        check_same_config(cfg.name, study.user_attrs.get("config"), config)
        study.sampler = make_sampler(cfg.sampler, offset=len(study.get_trials(deepcopy=False)))
        return study
    study.set_user_attr("config", config)
    study.set_user_attr("folder", str(cfg.folder))
    study.set_user_attr("baseline", baseline.info())
    study.set_user_attr("limits", cfg.budgets.limits(baseline.macs, baseline.params))
    for label, params in prepared.warm_starts:
        study.enqueue_trial(params, user_attrs={"warm_start": label})
    if ladder is not None:
        ladder.store(study)
    return study


def trial_summary(trial: FrozenTrial, accuracy_index: int) -> str:
    """One line per finished trial: state, cost ratios, accuracy, seconds, plan."""
    attrs = trial.user_attrs
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    parts = [f"trial {trial.number:4d}", f"{trial.state.name:8s}"]
    if "macs_ratio" in attrs:
        parts.append(f"MACs {attrs['macs_ratio']:.3f}x params {attrs['params_ratio']:.3f}x")
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
def _progress(
    cfg: StudyConfig, done: int, log: Callable[[str], None]
) -> Iterator[Callable[[optuna.Study, FrozenTrial], None]]:
    from tqdm.auto import tqdm

    accuracy_index = cfg.objectives.index("accuracy")
    bar = tqdm(total=cfg.trials, initial=done, unit="trial", file=sys.stderr, disable=None)

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state in COUNTED:
            bar.update(1)
        line = trial_summary(trial, accuracy_index)
        if bar.disable:
            log(line)
        else:
            bar.write(line)

    try:
        yield callback
    finally:
        bar.close()


@dataclass(frozen=True)
class SearchResult:
    study: optuna.Study
    interrupted: bool


def _count(study: optuna.Study, states: tuple[TrialState, ...]) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna's own per-trial logs (with tracebacks) are replaced by one line per trial."""
    verbosity = optuna.logging.get_verbosity()
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


def _optimize(
    study: optuna.Study,
    objective: Objective,
    cfg: StudyConfig,
    done: int,
    log: Callable[[str], None],
) -> bool:
    """Run the missing trials; returns True when interrupted by Ctrl-C."""
    callbacks = study_callbacks(study, cfg)
    try:
        with _progress(cfg, done, log) as progress:
            study.optimize(
                objective,
                n_trials=cfg.trials - done,
                catch=CATCH,
                callbacks=[*callbacks, progress],
            )
    except KeyboardInterrupt:
        log("interrupted: writing the tables of the trials so far")
        return True
    return False


def prepare_baseline(
    cfg: StudyConfig, log: Callable[[str], None] = print
) -> tuple[Prepared, Baseline]:
    """:func:`prepare` (nothing written), then load, reuse or train the baseline."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    prepared = prepare(cfg)
    return prepared, load_baseline(cfg, prepared.model, prepared.splits, log=log)


def setup_study(cfg: StudyConfig, *, log: Callable[[str], None] = print) -> optuna.Study:
    """Validate, prepare the baseline and create (or check) the study; run no trial.

    The first step of a study shared by many processes: afterwards ``autodecomp worker``
    processes join it with only its name and storage URL.
    """
    prepared, baseline = prepare_baseline(cfg, log)
    with quiet_optuna(), shared_factor_cache(cfg.folder / "cache" / "factors"):
        study = open_study(cfg, prepared, baseline, log)
    log(
        f"study {cfg.name!r} is ready: {_count(study, COUNTED)}/{cfg.trials} trials done; "
        f"baseline val accuracy {baseline.accuracy:.4f}, cache in {cfg.folder / 'cache'}"
    )
    log(f"start workers with: autodecomp worker --study {cfg.name} --storage {cfg.storage}")
    if cfg.storage.startswith("sqlite"):
        log("(SQLite is for one process; several: journal:///... or postgresql+psycopg2://...)")
    return study


def run_search(cfg: StudyConfig, *, log: Callable[[str], None] = print) -> SearchResult:
    """Validate, prepare the baseline, run (or resume) the study until it has its trials."""
    prepared, baseline = prepare_baseline(cfg, log)
    with quiet_optuna(), shared_factor_cache(cfg.folder / "cache" / "factors"):
        study = open_study(cfg, prepared, baseline, log)
        done = _count(study, COUNTED)
        log(
            f"study {cfg.name!r}: {done}/{cfg.trials} trials done; baseline val accuracy "
            f"{baseline.accuracy:.4f}, {baseline.macs:,} MACs, {baseline.params:,} params; "
            f"{len(prepared.space.layers)} layers searched, "
            f"{len(prepared.space.blocks)} shift blocks pruned"
        )
        interrupted = False
        if done < cfg.trials:
            objective = Objective(cfg, prepared.space, baseline, prepared.splits)
            interrupted = _optimize(study, objective, cfg, done, log)
    return SearchResult(study, interrupted)
