"""``autodecomp worker``: one of many processes running the trials of one shared study.

Optuna distributes the work: every worker loads the same study from a storage that several
processes can write (PostgreSQL across nodes, a journal file on one node; see
:mod:`autodecomp.search.storage`) and asks it for trials; nothing here schedules. A worker needs
only the study's name and storage URL: ``autodecomp create STUDY.yaml --storage URL``
creates the study and stores on it the config, the study folder (holding the
baseline checkpoint and the factor cache, so it must be shared by every node at the same
path, or given with ``--folder``) and the baseline's measurements.

A worker first helps build the study's allocation ladder (:mod:`autodecomp.search.ladder_units`:
it scores units until none is left, one worker assembles the ladder), then runs the loop
every process of a study runs (:mod:`autodecomp.search.loop`, shared
with ``autodecomp search``): exactly the total under the study's start lock, stale trials
failed and re-queued, Ctrl-C or SIGTERM (a SLURM time limit) re-queueing the running trial.
Each worker seeds its sampler from its ``index`` (TPE with ``constant_liar``) and records
host, pid, index, seed and device on its trials (user attribute ``worker``).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..config import StudyConfig, config_from_dict
from ..core.errors import ConfigError
from ..core.logs import worker_fields
from .baseline import Baseline, cache_paths
from .ladder_units import build_ladder
from .loop import (
    COUNTED,
    MAX_FAILURES_IN_A_ROW,
    TooManyFailures,
    counted_text,
    run_trials,
    run_until_total,
)
from .objective import Objective
from .storage import Heartbeat, check_storage, journal_path, open_storage, shown
from .study import (
    make_sampler,
    prepare_baseline,
    quiet_optuna,
    shared_factor_cache,
    study_callbacks,
    trial_summary,
)

__all__ = [
    "MAX_FAILURES_IN_A_ROW",
    "TooManyFailures",
    "WorkerResult",
    "join_study",
    "run_trials",
    "run_worker",
    "worker_config",
]

_log = logging.getLogger(__name__)
_SEED_STRIDE = 1_000_003  # worker k samples with seed: study seed + stride * (k + 1)


@dataclass(frozen=True)
class WorkerResult:
    ran: int  # trials this worker finished, in any state
    counted: int  # the study's COMPLETE + PRUNED trials when the worker stopped
    total: int
    interrupted: bool = False
    stopped: str | None = None  # why it stopped before the total, if it did
    ladder_built: bool = False  # ladder_only: the study's ladder is stored

    @property
    def finished(self) -> bool:
        return self.counted >= self.total or self.ladder_built


def join_study(storage: optuna.storages.BaseStorage, url: str, name: str) -> optuna.Study:
    """Load the existing study ``name``; a missing one is a :class:`ConfigError`."""
    names = [s.study_name for s in storage.get_all_studies()]
    if name not in names:
        raise ConfigError(
            f"storage {shown(url)} has no study {name!r} (studies there: "
            f"{', '.join(names) or 'none'}); create it with: autodecomp create STUDY.yaml "
            "--storage URL"
        )
    return optuna.load_study(study_name=name, storage=storage)


def worker_config(
    study: optuna.Study,
    url: str,
    *,
    folder: str | os.PathLike[str] | None = None,
    device: str | None = None,
    total: int | None = None,
) -> StudyConfig:
    """The study's stored config, with this worker's storage, device and total."""
    stored = study.user_attrs.get("config")
    where = folder if folder is not None else study.user_attrs.get("folder")
    if stored is None or where is None:
        raise ConfigError(
            f"study {study.study_name!r} has no stored config and folder: create it with "
            "autodecomp create STUDY.yaml --storage URL"
        )
    if not Path(where).expanduser().is_dir():
        raise ConfigError(
            f"study folder {str(where)!r} is not on this node: share it at that path with "
            "every worker, or give its path here with --folder"
        )
    if total is not None and total < 1:
        raise ConfigError(f"--trials-total must be >= 1, got {total}")
    cfg = config_from_dict(stored, where, device=device)
    return replace(cfg, storage=url, trials=cfg.trials if total is None else total)


def _check_baseline_files(cfg: StudyConfig) -> None:
    """Workers never train the baseline: the one the study was created with must be here."""
    files = [cfg.baseline.checkpoint] if cfg.baseline.checkpoint else list(cache_paths(cfg))
    for path in files:
        if not path.is_file():
            raise ConfigError(
                f"baseline file {str(path)!r} is missing: every worker must see the study "
                "folder the study was created in (same path, or --folder)"
            )


def _check_same_baseline(study: optuna.Study, baseline: Baseline) -> None:
    stored = study.user_attrs.get("baseline") or {}
    now = {"macs": baseline.macs, "params": baseline.params}
    if any(stored.get(k) != v for k, v in now.items()):
        raise ConfigError(
            f"baseline {str(baseline.checkpoint)!r} has {now}, but study "
            f"{study.study_name!r} was created with a baseline of "
            f"{ {k: stored.get(k) for k in now} }"
        )


def _counted(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


def run_worker(
    study_name: str,
    url: str,
    *,
    total: int | None = None,
    device: str | None = None,
    folder: str | os.PathLike[str] | None = None,
    index: int | None = None,
    heartbeat: Heartbeat | None = None,
    ladder_only: bool = False,
) -> WorkerResult:
    """Join the study and run its trials until it has ``total`` COMPLETE + PRUNED trials.

    Every line it logs is the worker's (:func:`~autodecomp.core.logs.worker_fields`: the
    command line shows a timestamp and ``worker <index>:`` before each).

    Args:
        study_name: the study, created by ``autodecomp create``.
        url: its storage (PostgreSQL, or a journal file on one node).
        total: the study's total (default: ``trials`` of its stored config).
        device: this worker's device, e.g. ``cuda:1`` (default: the stored one).
        folder: the study folder, if not at the path it was created at.
        index: this worker's number, which seeds its sampler (default: the process id).
        heartbeat: heartbeat and retry settings (default: :class:`Heartbeat`).
        ladder_only: help build the study's allocation ladder, then return without
            running a trial.

    Raises:
        ConfigError: an unreachable storage, a missing study, folder or baseline.
    """
    index = os.getpid() if index is None else index
    with worker_fields(index):
        return _run(
            study_name, url, total, device, folder, index, heartbeat or Heartbeat(), ladder_only
        )


def _run(
    study_name: str,
    url: str,
    total: int | None,
    device: str | None,
    folder: str | os.PathLike[str] | None,
    index: int,
    heartbeat: Heartbeat,
    ladder_only: bool,
) -> WorkerResult:
    check_storage(url)
    journal = journal_path(url)
    if journal is not None and not journal.is_file():
        raise ConfigError(f"storage {url!r}: no journal file {str(journal)!r}; create the study")
    storage = open_storage(url, heartbeat)
    with quiet_optuna():
        study = join_study(storage, url, study_name)
    cfg = worker_config(study, url, folder=folder, device=device, total=total)
    _check_baseline_files(cfg)
    prepared, baseline = prepare_baseline(cfg, may_train=False)
    _check_same_baseline(study, baseline)

    offset = _SEED_STRIDE * (index + 1)
    study.sampler = make_sampler(cfg.sampler, offset, parallel=True)
    identity = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "index": index,
        "seed": (cfg.sampler.seed + offset) % 2**32,
        "device": cfg.device,
    }
    objective = Objective(cfg, prepared.space, baseline, prepared.splits)
    accuracy_index = cfg.objectives.index("accuracy")
    _log.info(
        f"joined study {study_name!r} at {shown(url)} ({identity['host']} pid "
        f"{identity['pid']}, {cfg.device}, sampler seed {identity['seed']}): "
        f"{counted_text(_counted(study), cfg.trials, 'counted')}"
    )

    def progress(_study: optuna.Study, trial: FrozenTrial) -> None:
        _log.info(trial_summary(trial, accuracy_index))

    with quiet_optuna(), shared_factor_cache(cfg.folder / "cache" / "factors"):
        built = build_ladder(
            study,
            cfg,
            prepared.space,
            baseline,
            prepared.splits,
            url=url,
            storage=storage,
            heartbeat=heartbeat,
            attrs={"worker": identity},
        )
        if built.interrupted:
            _log.info("interrupted while building the allocation ladder; its unit is re-queued")
            return WorkerResult(built.scored, _counted(study), cfg.trials, interrupted=True)
        if ladder_only:
            _log.info(f"allocation ladder built ({built.scored} units scored here); no trial run")
            return WorkerResult(built.scored, _counted(study), cfg.trials, ladder_built=True)
        result = run_until_total(
            study,
            objective,
            url=url,
            storage=storage,
            total=cfg.trials,
            heartbeat=heartbeat,
            attrs={"worker": identity},
            callbacks=[*study_callbacks(study, cfg), progress],
        )
    if result.interrupted:
        _log.info("interrupted; its running trial is re-queued")
    if result.stopped:
        _log.warning(f"stopping: {result.stopped}")
    counted = _counted(study)
    failed = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
    _log.info(
        f"study {study_name!r} has {counted_text(counted, cfg.trials, 'counted')} "
        f"({failed} failed); this worker ran {result.ran}. Tables and plots: "
        f"autodecomp report {url} --study-name {study_name}"
    )
    return WorkerResult(result.ran, counted, cfg.trials, result.interrupted, result.stopped)
