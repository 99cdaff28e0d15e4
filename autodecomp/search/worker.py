"""``autodecomp worker``: one of many processes running the trials of one shared study.

Optuna distributes the work: every worker loads the same study from a storage that several
processes can write (PostgreSQL across nodes, a journal file on one node; see
:mod:`autodecomp.search.storage`) and asks it for trials; nothing here schedules. A worker needs
only the study's name and storage URL: ``autodecomp create STUDY.yaml --storage URL``
creates the study and stores on it the config, the study folder (holding the
baseline checkpoint and the factor cache, so it must be shared by every node at the same
path, or given with ``--folder``) and the baseline's measurements.

Run until the total: under a lock shared by the study's processes
(:func:`~autodecomp.search.storage.trial_start_lock`), a worker fails the trials whose heartbeat
stopped (their parameters are re-queued), counts the COMPLETE + PRUNED and the RUNNING
trials, and starts a trial only while their sum is below the total. It exits once COMPLETE
+ PRUNED reach the total, and meanwhile waits for the last running trials, since one of
them may still fail or lose its worker. So concurrent workers stop at exactly the total.
Ctrl-C or SIGTERM (a SLURM time limit) fails the running trial and re-queues its
parameters too. Each worker seeds its sampler from its ``index`` (TPE with
``constant_liar``) and records host, pid, index, seed and device on its trials (user
attribute ``worker``).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from ..config import StudyConfig, config_from_dict
from ..core.errors import ConfigError
from .baseline import Baseline, cache_paths
from .objective import CATCH, Objective
from .storage import Heartbeat, check_storage, journal_path, open_storage, shown, trial_start_lock
from .study import (
    COUNTED,
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

MAX_FAILURES_IN_A_ROW = 5
_SEED_STRIDE = 1_000_003  # worker k samples with seed: study seed + stride * (k + 1)

Callback = Callable[[optuna.Study, FrozenTrial], None]


class TooManyFailures(RuntimeError):
    """This process's last trials all failed: something is wrong with it or the study."""


@dataclass(frozen=True)
class WorkerResult:
    ran: int  # trials this worker finished, in any state
    counted: int  # the study's COMPLETE + PRUNED trials when the worker stopped
    total: int
    interrupted: bool = False
    stopped: str | None = None  # why it stopped before the total, if it did

    @property
    def finished(self) -> bool:
        return self.counted >= self.total


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


def _fail_stale_trials(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _one_trial(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], Any],
    held: ExitStack,
    *,
    catch: tuple[type[Exception], ...],
    attrs: Mapping[str, Any],
    callbacks: Sequence[Callback],
    retry: Callback | None,
) -> TrialState | None:
    """Run one trial; ``held`` (the start lock) is released once the trial exists."""
    started: list[optuna.Trial] = []
    finished: list[TrialState] = []

    def run(trial: optuna.Trial) -> Any:
        started.append(trial)
        held.close()
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return objective(trial)

    def record(_study: optuna.Study, trial: FrozenTrial) -> None:
        finished.append(trial.state)

    try:
        study.optimize(run, n_trials=1, catch=catch, callbacks=[*callbacks, record])
    except UpdateFinishedTrialError:
        return None  # failed as stale by another process meanwhile (and re-queued)
    except KeyboardInterrupt:
        if started and retry is not None:  # re-queue the interrupted trial's parameters
            number = started[0].number
            frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
            if frozen.state == TrialState.FAIL:
                retry(study, frozen)
        raise
    return finished[0] if finished else None


def run_trials(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], Any],
    total: int,
    start_lock: Callable[[], AbstractContextManager[None]],
    *,
    catch: tuple[type[Exception], ...] = (),
    attrs: Mapping[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    retry: Callback | None = None,
    poll_s: float = 2.0,
    max_failures: int = MAX_FAILURES_IN_A_ROW,
) -> int:
    """Run ``objective`` in trials of ``study`` until ``total`` of them are COMPLETE or PRUNED.

    Args:
        study: the shared study (its storage should have a heartbeat).
        objective: the function of a trial, as for ``study.optimize``.
        total: COMPLETE + PRUNED trials at which every process stops.
        start_lock: makes the lock held while counting trials and starting one.
        catch: exceptions that fail a trial without stopping the process.
        attrs: user attributes set on each trial first.
        callbacks: called with each finished trial.
        retry: re-queues an interrupted trial (the storage's stale-trial callback).
        poll_s: seconds between looks at the study while the last trials run elsewhere.
        max_failures: stop (:class:`TooManyFailures`) after this many failures in a row.

    Returns:
        The number of trials this process finished.
    """
    ran = failures = 0
    while True:
        with ExitStack() as held:
            held.enter_context(start_lock())
            _fail_stale_trials(study)
            active = study.get_trials(deepcopy=False, states=(*COUNTED, TrialState.RUNNING))
            if sum(t.state in COUNTED for t in active) >= total:
                return ran
            if len(active) < total:
                state = _one_trial(
                    study,
                    objective,
                    held,
                    catch=catch,
                    attrs=attrs or {},
                    callbacks=callbacks,
                    retry=retry,
                )
                ran += state is not None
                failures = failures + 1 if state == TrialState.FAIL else 0
                if failures >= max_failures:
                    raise TooManyFailures(f"the last {failures} trials of this worker failed")
                continue
        time.sleep(poll_s)  # the last trials run elsewhere: one may fail or lose its worker


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a batch system's time limit or preemption) ends the worker like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    log: Callable[[str], None] = print,
) -> WorkerResult:
    """Join the study and run its trials until it has ``total`` COMPLETE + PRUNED trials.

    Args:
        study_name: the study, created by ``autodecomp create``.
        url: its storage (PostgreSQL, or a journal file on one node).
        total: the study's total (default: ``trials`` of its stored config).
        device: this worker's device, e.g. ``cuda:1`` (default: the stored one).
        folder: the study folder, if not at the path it was created at.
        index: this worker's number, which seeds its sampler (default: the process id).
        heartbeat: heartbeat and retry settings (default: :class:`Heartbeat`).
        log: receives progress lines.

    Raises:
        ConfigError: an unreachable storage, a missing study, folder or baseline.
    """
    from sqlalchemy.exc import SQLAlchemyError

    heartbeat = heartbeat or Heartbeat()
    check_storage(url)
    journal = journal_path(url)
    if journal is not None and not journal.is_file():
        raise ConfigError(f"storage {url!r}: no journal file {str(journal)!r}; create the study")
    storage = open_storage(url, heartbeat)
    with quiet_optuna():
        study = join_study(storage, url, study_name)
    cfg = worker_config(study, url, folder=folder, device=device, total=total)
    _check_baseline_files(cfg)
    prepared, baseline = prepare_baseline(cfg, log)
    _check_same_baseline(study, baseline)

    index = os.getpid() if index is None else index
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
    log(
        f"worker {index} ({identity['host']} pid {identity['pid']}, {cfg.device}, sampler "
        f"seed {identity['seed']}) joined study {study_name!r} at {shown(url)}: "
        f"{_counted(study)}/{cfg.trials} trials counted"
    )

    def progress(_study: optuna.Study, trial: FrozenTrial) -> None:
        log(f"worker {index}: {trial_summary(trial, accuracy_index)}")

    ran, interrupted, stopped = 0, False, None
    try:
        with (
            quiet_optuna(),
            shared_factor_cache(cfg.folder / "cache" / "factors"),
            _sigterm_as_interrupt(),
        ):
            ran = run_trials(
                study,
                objective,
                cfg.trials,
                lambda: trial_start_lock(url, storage, study_name),
                catch=CATCH,
                attrs={"worker": identity},
                callbacks=[*study_callbacks(study, cfg), progress],
                retry=heartbeat.retry_callback(),
                poll_s=min(5.0, heartbeat.interval),
            )
    except KeyboardInterrupt:
        interrupted = True
        log(f"worker {index}: interrupted; its running trial is re-queued")
    except TooManyFailures as err:
        stopped = str(err)
        log(f"worker {index}: stopping: {stopped}")
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"storage {shown(url)} failed: {first}") from None
    counted = _counted(study)
    failed = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
    log(
        f"worker {index}: study {study_name!r} has {counted}/{cfg.trials} trials counted "
        f"({failed} failed); this worker ran {ran}. Tables and plots: autodecomp report "
        f"{url} --study-name {study_name}"
    )
    return WorkerResult(ran, counted, cfg.trials, interrupted, stopped)
