"""A tiny study folder for end-to-end tests: its ``study.yaml``, the baseline trained once."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from autodecomp.config import load_config
from autodecomp.results.tables import summarise_search
from autodecomp.search.baseline import load_baseline
from autodecomp.search.study import prepare, run_search


def make_study(folder: Path, config: dict[str, Any], *, search: bool = False) -> Path:
    """Write ``folder/tiny/study.yaml``, train and cache its baseline (``search``: run the
    whole study instead); returns the ``study.yaml`` path."""
    path = folder / "tiny" / "study.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(path)
    if search:
        summarise_search(run_search(cfg).study, cfg)
    else:
        prepared = prepare(cfg)
        load_baseline(cfg, prepared.model, prepared.splits)
    return path


@contextmanager
def logged(level: int = logging.INFO) -> Iterator[list[str]]:
    """The messages the ``autodecomp`` loggers log in the ``with`` block at ``level`` and
    above (what an injected ``log=lines.append`` received before the package logged)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger, handler = logging.getLogger("autodecomp"), Collect(level)
    saved = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)
