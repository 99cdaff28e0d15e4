"""Where the package's log lines go: plain text or one JSON object per line, worker fields.

Every module logs to ``logging.getLogger(__name__)``, a child of the ``autodecomp`` logger;
the library installs no handler (an application configures logging as it likes). The
command line calls :func:`console_logging`: INFO and DEBUG lines to stdout, WARNING and
above to stderr, each as its bare message, or (``--log-json``) as one JSON object with
``time``, ``level``, ``logger``, ``message`` and, inside :func:`worker_fields`, ``worker``.
A worker's text lines start with a timestamp and ``worker <index>:``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

__all__ = ["LOGGER", "JsonFormatter", "TextFormatter", "console_logging", "worker_fields"]

LOGGER = "autodecomp"
_WORKER: ContextVar[int | None] = ContextVar("autodecomp_worker", default=None)


@contextmanager
def worker_fields(index: int) -> Iterator[None]:
    """Lines logged in the ``with`` block (this thread or task) are worker ``index``'s."""
    token = _WORKER.set(index)
    try:
        yield
    finally:
        _WORKER.reset(token)


def _worker(record: logging.LogRecord) -> Any:
    return getattr(record, "worker", None)


class _Route(logging.Filter):
    """Fills ``record.worker`` from :func:`worker_fields` (unless the call passed it in
    ``extra``) and lets through the records below WARNING, or (``errors``) the others."""

    def __init__(self, errors: bool) -> None:
        super().__init__()
        self.errors = errors

    def filter(self, record: logging.LogRecord) -> bool:
        if _worker(record) is None:
            record.worker = _WORKER.get()
        return (record.levelno >= logging.WARNING) == self.errors


class TextFormatter(logging.Formatter):
    """The bare message; a worker's lines as ``2025-01-31 12:00:00 worker 3: message``."""

    def __init__(self) -> None:
        super().__init__("%(message)s", datefmt="%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        worker = _worker(record)
        if worker is None:
            return text
        return f"{self.formatTime(record, self.datefmt)} worker {worker}: {text}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (ISO 8601, UTC), ``level``, ``logger``,
    ``message``, and ``worker`` and ``exception`` when there are any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if _worker(record) is not None:
            entry["worker"] = _worker(record)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


@contextmanager
def console_logging(level: int = logging.INFO, *, json_lines: bool = False) -> Iterator[None]:
    """Send the ``autodecomp`` logger's records at ``level`` and above to the console for
    the ``with`` block (INFO and DEBUG: stdout; WARNING and above: stderr), as text or
    (``json_lines``) JSON; the logger's handlers, level and propagation are restored after.

    The streams are the ``sys.stdout`` / ``sys.stderr`` of the moment the block starts.
    """
    logger = logging.getLogger(LOGGER)
    formatter: logging.Formatter = JsonFormatter() if json_lines else TextFormatter()
    handlers = []
    for stream, errors in ((sys.stdout, False), (sys.stderr, True)):
        handler = logging.StreamHandler(stream)
        handler.addFilter(_Route(errors))
        handler.setFormatter(formatter)
        handlers.append(handler)
    saved = logger.level, logger.propagate
    logger.setLevel(level)
    logger.propagate = False  # the command owns the console: no second copy via the root
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            handler.flush()
            logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
