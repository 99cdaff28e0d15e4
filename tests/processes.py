"""Kill a child process at a chosen moment without racing it."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def kill_while(
    process: subprocess.Popen,
    busy: Callable[[], T | None],
    *,
    timeout: float = 120,
    describe: Callable[[], str] = lambda: "",
) -> T:
    """SIGKILL ``process`` while ``busy()`` returns something (e.g. its running trial) and
    return that. ``busy()`` is checked again with the process frozen (SIGSTOP), so what it
    saw is what the kill leaves behind: a loaded machine cannot finish the trial between
    the look and the kill. A look that fails (a store locked by the frozen process) counts
    as not busy. ``describe()`` explains a timeout (e.g. the process's log)."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, describe()
        assert time.monotonic() < deadline, describe()
        if _look(busy) is None:
            time.sleep(0.02)
            continue
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
