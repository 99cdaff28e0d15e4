"""A tiny study for end-to-end tests: its config (:func:`tiny_config`), its folder with the
``study.yaml`` and the baseline trained once (:func:`make_study`)."""

from __future__ import annotations

import copy
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

TINY: dict[str, Any] = {
    "model": "digits_cnn",
    "data": {"name": "digits", "image_size": 8},
    "baseline": {"epochs": 2, "lr": 0.05, "batch_size": 64},
    "space": {"layers": {"exclude": ["conv1"]}, "ratio": {"range": [0.1, 0.9], "log": True}},
    "threads": 1,
}
SHORT_PROXY: dict[str, Any] = {"steps": 4, "batch_size": 32, "bn_batches": 1}
"""A proxy fine-tune of 4 steps: enough for a trial to train, short enough for a test."""


def tiny_config(**changes: Any) -> dict[str, Any]:
    """:data:`TINY` (digits_cnn on 8x8 digits, ``conv1`` left dense, log ratios 0.1-0.9, one
    thread) with ``changes``: a mapping given for a section that is one updates its keys
    (``None`` removes a key), anything else replaces the key (``None`` removes it)."""
    out = copy.deepcopy(TINY)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = {k: v for k, v in {**out[key], **value}.items() if v is not None}
        if value is None:
            out.pop(key, None)
        else:
            out[key] = copy.deepcopy(value)  # callers' constants (SHORT_PROXY) stay untouched
    return out


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
