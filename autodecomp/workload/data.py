"""Data for the search: train / validation / test splits by name, and seeded loaders.

A data set is a built-in name (:mod:`autodecomp.workload.datasets`: ``"digits"``,
``"cifar10"``, ``"cifar100"``, ``"imagefolder"``; nothing is ever downloaded) or
``"package.module:callable"``: a user function returning :class:`DataSplits`. It is
called with those of the keyword arguments ``root``, ``image_size``, ``channels``,
``seed``, ``val_fraction``, ``test_fraction`` that its signature accepts (all of them if
it takes ``**kwargs``).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..core.user_code import call_user, import_callable
from .datasets import DATASETS, DataSet, DataSplits, stratified_split

__all__ = [
    "DATASETS",
    "DataSet",
    "DataSplits",
    "data_names",
    "load_data",
    "make_loader",
    "stratified_split",
]


def data_names() -> list[str]:
    """Names of the built-in data sets, in the order they are registered."""
    return [name for name, _ in DATASETS.in_order()]


def load_data(
    name: str,
    *,
    root: str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> DataSplits:
    """Load a data set by name as train / val / test splits.

    Args:
        name: a registered name (:func:`data_names`: ``"digits"``, ``"cifar10"``,
            ``"cifar100"``, ``"imagefolder"``) or ``"package.module:callable"`` (see the
            module docstring).
        root: local folder of the data (CIFAR and imagefolder).
        image_size: side of the (square) inputs; defaults: digits 16, CIFAR 32, imagefolder 224.
        channels: input channels; digits any >= 1 (default 1), image data 1 or 3 (default 3).
        seed: seed of the splits.
        val_fraction: validation share (of all digits; of the train set otherwise).
        test_fraction: test share (digits only; the other data sets have a test set).

    Raises:
        ValueError: unknown name, bad argument, or data missing under ``root``.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size!r}")
    if channels is not None and channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels!r}")
    if name not in DATASETS and ":" in name:
        options = {
            "root": root,
            "image_size": image_size,
            "channels": channels,
            "seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
        }
        return _user_data(name, options)
    if name not in DATASETS:
        valid = ", ".join(data_names())
        raise ValueError(f"unknown data set {name!r}; valid: {valid} or 'package.module:callable'")
    data = DATASETS.get(name)
    if data.needs_root and root is None:
        raise ValueError(f"{name} needs root=: {data.root}")
    return data.load(
        root=None if root is None else Path(root).expanduser(),
        image_size=image_size or data.image_size,
        channels=channels,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A ``DataLoader`` whose shuffling (and worker seeding) follows ``seed``.

    Each pass over the loader draws a new order from the seeded generator, so the sequence
    of epochs is the same in every run.
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=num_workers > 0,
    )


def _user_data(name: str, options: dict[str, Any]) -> DataSplits:
    """Call ``"package.module:callable"``; any failure is a one-line ``ValueError`` naming it."""
    fn = import_callable(name, "data set")
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature: pass everything
        params = [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        names = {p.name for p in params}
        options = {k: v for k, v in options.items() if k in names}
    splits = call_user(fn, name, "data set", **options)
    if not isinstance(splits, DataSplits):
        raise ValueError(f"data set {name!r} returned {type(splits).__name__}, not DataSplits")
    _check_splits(name, splits)
    return splits


def _check_splits(name: str, splits: DataSplits) -> None:
    """What the search relies on: a class count >= 2, a (C, H, W) shape, non-empty splits."""
    n, shape = splits.num_classes, splits.input_shape
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"data set {name!r}: num_classes must be an integer >= 2, got {n!r}")
    if not (
        isinstance(shape, tuple | list)
        and len(shape) == 3
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
    ):
        raise ValueError(f"data set {name!r}: input_shape must be (C, H, W) ints, got {shape!r}")
    for part in ("train", "val", "test"):
        try:
            size = len(getattr(splits, part))
        except TypeError:
            continue  # an iterable-style data set: its length is unknown
        if size == 0:
            raise ValueError(f"data set {name!r}: the {part} split is empty")
