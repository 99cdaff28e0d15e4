"""The trial loop of every process that runs a study's trials (``autodecomp search`` and
``autodecomp worker``): each rule lives here once.

- **Exactly the total.** Under a lock shared by the study's processes
  (:func:`~autodecomp.search.storage.trial_start_lock`), a process fails the trials whose
  heartbeat stopped (their parameters are re-queued), counts the COMPLETE + PRUNED and the
  RUNNING trials, and starts a trial only while their sum is below the total. It returns
  once COMPLETE + PRUNED reach the total, and meanwhile waits for the last running trials,
  since one of them may still fail or lose its process. Failed trials do not count.
- **No trial lost.** A trial runs with the storage's heartbeat; a process killed mid-trial
  leaves it silent, and after the grace period the next process that looks fails it and
  re-queues its parameters. Ctrl-C or SIGTERM (a batch system's time limit) fails the
  running trial and re-queues its parameters at once.
- A process whose last :data:`MAX_FAILURES_IN_A_ROW` trials all failed stops.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from ..core.errors import ConfigError
from ..core.optuna_compat import trial_id
from .objective import CATCH
from .storage import Heartbeat, shown, trial_start_lock

__all__ = [
    "COUNTED",
    "MAX_FAILURES_IN_A_ROW",
    "LoopResult",
    "TooManyFailures",
    "counted_text",
    "run_trials",
    "run_until_total",
    "sigterm_as_interrupt",
]

_log = logging.getLogger(__name__)
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_FAILURES_IN_A_ROW = 5

Callback = Callable[[optuna.Study, FrozenTrial], None]


class TooManyFailures(RuntimeError):
    """This process's last trials all failed: something is wrong with it or the study."""


def counted_text(counted: int, total: int, verb: str) -> str:
    """``"4/6 trials done"``; ``"8 trials done (more than trials: 6)"`` when a study has more
    than its total (it was run with a larger one before)."""
    if counted <= total:
        return f"{counted}/{total} trials {verb}"
    return f"{counted} trials {verb} (more than trials: {total})"


def _fail_stale_trials(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _stored(trial: optuna.Trial) -> FrozenTrial:
    """``trial`` as its storage has it now (another process may have ended it)."""
    return trial.storage.get_trial(trial_id(trial))


def _log_failed_meanwhile(number: int) -> None:
    """Log that another process failed trial ``number`` as stale (and re-queued it)."""
    _log.warning(
        "trial %d was failed as stale by another process (its heartbeat came late) and its "
        "parameters re-queued; this run's result is dropped",
        number,
    )


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
    ended_elsewhere: list[bool] = []  # failed as stale by another process while it ran
    finished: list[TrialState] = []

    def run(trial: optuna.Trial) -> Any:
        started.append(trial)
        held.close()
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        value = objective(trial)
        _raise_if_interrupted()  # an interrupt that a finaliser swallowed fails the trial
        if _stored(trial).state != TrialState.RUNNING:
            # Optuna fails with an AssertionError when it tells a value to a FAIL trial, and
            # with the ValueError handled below when it tells an error
            ended_elsewhere.append(True)
            raise RuntimeError(f"trial {trial.number} was failed as stale meanwhile")
        return value

    def record(_study: optuna.Study, trial: FrozenTrial) -> None:
        finished.append(trial.state)

    try:
        study.optimize(run, n_trials=1, catch=catch, callbacks=[*callbacks, record])
    except UpdateFinishedTrialError:  # the trial wrote to the storage after that
        _log_failed_meanwhile(started[0].number)
        return None
    except ValueError:  # "Cannot tell a FAIL trial.", when the objective returned after that
        if not ended_elsewhere:
            raise
        _log_failed_meanwhile(started[0].number)
        return None
    except KeyboardInterrupt:
        if started and retry is not None:  # re-queue the interrupted trial's parameters
            frozen = _stored(started[0])
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
    on_wait: Callable[[int], None] | None = None,
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
        on_wait: called with the number of RUNNING trials when this process starts waiting
            for them (they run elsewhere, or belong to a process that died).

    Returns:
        The number of trials this process finished.
    """
    ran = failures = 0
    waiting = False
    while True:
        _raise_if_interrupted()
        with ExitStack() as held:
            held.enter_context(start_lock())
            _fail_stale_trials(study)
            active = study.get_trials(deepcopy=False, states=(*COUNTED, TrialState.RUNNING))
            if sum(t.state in COUNTED for t in active) >= total:
                return ran
            if len(active) < total:
                waiting = False
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
                    raise TooManyFailures(f"the last {failures} trials of this process failed")
                continue
        if not waiting and on_wait is not None:
            on_wait(sum(t.state == TrialState.RUNNING for t in active))
        waiting = True
        time.sleep(poll_s)  # the last trials run elsewhere: one may fail or lose its process


_INTERRUPTED = threading.Event()  # set by Ctrl-C / SIGTERM inside sigterm_as_interrupt


def _raise_if_interrupted() -> None:
    """Raise the KeyboardInterrupt of a signal whose own was swallowed: Python ignores an
    exception raised in a finaliser or weakref callback (e.g. SQLAlchemy's), which is
    where the signal handler runs when the signal arrives during garbage collection."""
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a batch system's time limit or preemption) ends the process like Ctrl-C;
    either is also remembered (:func:`_raise_if_interrupted`) so a swallowed one still ends
    the running trial and the loop."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: Any) -> None:
        _INTERRUPTED.set()
        raise KeyboardInterrupt

    _INTERRUPTED.clear()
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _INTERRUPTED.clear()


@dataclass(frozen=True)
class LoopResult:
    ran: int  # trials this process finished, in any state
    interrupted: bool = False  # Ctrl-C or SIGTERM: the running trial was re-queued
    stopped: str | None = None  # why it stopped before the total (too many failures)


def run_until_total(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], Any],
    *,
    url: str,
    storage: optuna.storages.BaseStorage,
    total: int,
    heartbeat: Heartbeat,
    attrs: Mapping[str, Any],
    callbacks: Sequence[Callback] = (),
    catch: tuple[type[Exception], ...] = CATCH,
    poll_s: float | None = None,
) -> LoopResult:
    """:func:`run_trials` as a process of the study runs it: with the study's start lock,
    the objective's failures caught (``catch``, default
    :data:`~autodecomp.search.objective.CATCH`), the
    interrupted trial re-queued on Ctrl-C or SIGTERM, and a storage failure turned into a
    one-line :class:`ConfigError`. When this process starts waiting for running trials of
    others, it logs a line.

    Args:
        study: the study, loaded from ``storage`` (opened with ``heartbeat``).
        objective: the trial function.
        url: the storage's URL (picks the start lock; shown in messages).
        storage: the opened storage.
        total: COMPLETE + PRUNED trials at which the study is done.
        heartbeat: the storage's heartbeat settings (the retry callback, the polling period).
        attrs: user attributes set on each trial (the process's identity).
        callbacks: called with each finished trial.
        catch: exceptions that fail a trial without stopping the process.
        poll_s: seconds between looks at the study while others run its last trials
            (default: the heartbeat's interval, at most 5 s).
    """
    from sqlalchemy.exc import SQLAlchemyError

    finished: list[int] = []

    def count(_study: optuna.Study, trial: FrozenTrial) -> None:
        finished.append(trial.number)

    def waiting(running: int) -> None:
        _log.info(
            f"waiting for {running} running trial(s) of other processes (a trial whose process "
            f"died is failed and re-queued after {heartbeat.grace_s} s without a heartbeat)"
        )

    try:
        with sigterm_as_interrupt():
            run_trials(
                study,
                objective,
                total,
                lambda: trial_start_lock(url, storage, study.study_name),
                catch=catch,
                attrs=attrs,
                callbacks=[*callbacks, count],
                retry=heartbeat.retry_callback(),
                poll_s=min(5.0, heartbeat.interval) if poll_s is None else poll_s,
                on_wait=waiting,
            )
    except KeyboardInterrupt:
        return LoopResult(len(finished), interrupted=True)
    except TooManyFailures as err:
        return LoopResult(len(finished), stopped=str(err))
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"storage {shown(url)} failed: {first}") from None
    return LoopResult(len(finished))
