"""Kill a child process at a chosen moment without racing it."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    process: subprocess.Popen,
    busy: Callable[[], T | None],
    *,
    deadline: float,
    describe: Callable[[], str] = lambda: "",
) -> T:
    """What ``busy()`` returns once it returns something, while ``process`` runs and
    before ``deadline`` (a ``time.monotonic()`` value). A look that fails (a store not
    created yet, or locked) counts as nothing. ``describe()`` explains a failure (e.g. the
    process's log)."""
    while True:
        assert process.poll() is None, describe()
        assert time.monotonic() < deadline, describe()
        if (seen := _look(busy)) is not None:
            return seen
        time.sleep(0.02)


def kill_while(
    process: subprocess.Popen,
    busy: Callable[[], T | None],
    *,
    timeout: float = 120,
    describe: Callable[[], str] = lambda: "",
) -> T:
    """SIGKILL ``process`` while ``busy()`` returns something (e.g. its running trial) and
    return that. ``busy()`` is checked again with the process frozen (see
    :func:`kill_if_still`), so a loaded machine cannot finish the trial between the look
    and the kill."""
    deadline = time.monotonic() + timeout
    while True:
        wait_for(process, busy, deadline=deadline, describe=describe)
        if (seen := kill_if_still(process, busy)) is not None:
            return seen


def kill_if_still(process: subprocess.Popen, busy: Callable[[], T | None]) -> T | None:
    """Freeze ``process`` (SIGSTOP) and look at ``busy()``: SIGKILL it and return what was
    seen if it still is busy, else let it go on (SIGCONT) and return None."""
    process.send_signal(signal.SIGSTOP)
    seen = _look(busy)
    if seen is None:
        process.send_signal(signal.SIGCONT)
        return None
    process.kill()
    process.wait(timeout=10)
    return seen


def _look(busy: Callable[[], T | None]) -> T | None:
    try:
        return busy()
    except Exception:  # e.g. sqlite locked by the frozen process: look again
        return None
