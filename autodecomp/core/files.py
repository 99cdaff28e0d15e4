"""Safe file writing shared by every process of a study: atomic replace and an exclusive lock."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

__all__ = ["atomic_write", "exclusive_lock"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it onto ``path``.

    Readers (other workers included) see the old file or the new one, never a half-written
    one. The temporary name keeps ``path``'s suffix so writers that infer the format from it
    (matplotlib, pandas) behave; the result is world-readable (0644) like a plain write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}"
    )
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def exclusive_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) for the ``with`` block.

    Used so that one process of a study creates a shared artefact (the trained baseline)
    while the others wait and then read it. ``filelock`` picks the operating system's lock
    (``flock`` on POSIX, ``msvcrt.locking`` on Windows): the lock is released if the holder
    dies, and the file is left in place for the next holder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path, mode=0o644):
        yield
