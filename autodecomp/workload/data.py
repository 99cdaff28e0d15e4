"""Data sets for the search: train / validation / test splits and seeded loaders.

Built-in names (nothing is ever downloaded):

- ``"digits"``: scikit-learn's 1,797 handwritten 8x8 digits (shipped with scikit-learn),
  split by class-stratified seeded sampling, scaled to [0, 1], bilinearly resized to
  ``image_size`` (default 16), normalised with the train split's mean / std and repeated to
  ``channels`` (default 1). Held in memory as ``TensorDataset``.
- ``"cifar10"`` / ``"cifar100"``: torchvision's CIFAR from a local ``root`` holding the
  extracted ``cifar-10-batches-py`` / ``cifar-100-python`` folder; the validation split is
  carved from the training set (stratified, seeded); the official test set is the test split.
- ``"imagefolder"``: ``root/train/<class>/*``, ``root/test/<class>/*`` and optionally
  ``root/val/<class>/*`` (otherwise carved from train); ``image_size`` default 224.
- ``"package.module:callable"``: a user function returning :class:`DataSplits`. It is
  called with those of the keyword arguments ``root``, ``image_size``, ``channels``,
  ``seed``, ``val_fraction``, ``test_fraction`` that its signature accepts (all of them if
  it takes ``**kwargs``).
"""

from __future__ import annotations

import functools
import gzip
import importlib
import importlib.util
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["DATA_NAMES", "DataSplits", "load_data", "make_loader", "stratified_split"]

DATA_NAMES = ("digits", "cifar10", "cifar100", "imagefolder")

_CIFAR = {
    # name: (torchvision class, folder, mean, std, classes)
    "cifar10": (
        "CIFAR10",
        "cifar-10-batches-py",
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        10,
    ),
    "cifar100": (
        "CIFAR100",
        "cifar-100-python",
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        100,
    ),
}
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class DataSplits:
    """Train / validation / test data sets of one task.

    Attributes:
        train: training set (with augmentation where the data set has one).
        val: validation set, used by the search to score trials.
        test: held-out test set.
        num_classes: number of labels.
        input_shape: ``(C, H, W)`` of one input.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]


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
        name: ``"digits"``, ``"cifar10"``, ``"cifar100"``, ``"imagefolder"`` or
            ``"package.module:callable"`` (see the module docstring).
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
    if name == "digits":
        if not (0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"test_fraction must be in (0, 1) with val_fraction + test_fraction < 1, "
                f"got {test_fraction!r} and {val_fraction!r}"
            )
        return _digits(image_size or 16, channels or 1, seed, val_fraction, test_fraction)
    if name in _CIFAR:
        return _cifar(name, root, image_size or 32, _image_channels(channels), seed, val_fraction)
    if name == "imagefolder":
        return _imagefolder(root, image_size or 224, _image_channels(channels), seed, val_fraction)
    if ":" in name:
        options = {
            "root": root,
            "image_size": image_size,
            "channels": channels,
            "seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
        }
        return _user_data(name, options)
    raise ValueError(
        f"unknown data set {name!r}; valid: {', '.join(DATA_NAMES)} or 'package.module:callable'"
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


def stratified_split(
    labels: Sequence[int] | np.ndarray, count: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (rest, part) with ``count`` items in ``part``, classes in proportion.

    Each class gives ``count * n_class / n`` items, rounded by largest remainder (ties to
    the lower label) so the total is exactly ``count``. Both index arrays are sorted.
    """
    labels = np.asarray(labels)
    if not 0 <= count <= len(labels):
        raise ValueError(f"cannot take {count} of {len(labels)} items")
    rng = np.random.default_rng(seed)
    classes, sizes = np.unique(labels, return_counts=True)
    quota = count * sizes / len(labels)
    take = np.floor(quota).astype(int)
    order = np.argsort(-(quota - take), kind="stable")
    take[order[: count - take.sum()]] += 1
    part = [
        rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)
    ]
    part = np.sort(np.concatenate(part)) if part else np.zeros(0, dtype=int)
    rest = np.setdiff1d(np.arange(len(labels)), part)
    return rest, part


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) float32 images in [0, 16] and int64 labels, read offline."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is not None and path.is_file():
        with gzip.open(path, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
        images, labels = table[:, :-1], table[:, -1]
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images, labels = bunch.data.astype(np.float32), bunch.target
    return images.reshape(-1, 8, 8), labels.astype(np.int64)


def _digits(
    image_size: int, channels: int, seed: int, val_fraction: float, test_fraction: float
) -> DataSplits:
    images, labels = _digits_arrays()
    n = len(labels)
    rest, test = stratified_split(labels, round(test_fraction * n), seed)
    keep, val = stratified_split(labels[rest], round(val_fraction * n), seed + 1)
    train, val = rest[keep], rest[val]
    x = torch.from_numpy(images / 16.0).unsqueeze(1)
    if image_size != 8:
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", antialias=image_size < 8
        )
    x = (x - x[train].mean()) / x[train].std()
    y = torch.from_numpy(labels)

    def subset(index: np.ndarray) -> TensorDataset:
        index = torch.from_numpy(index)
        return TensorDataset(x[index].expand(-1, channels, -1, -1), y[index])

    return DataSplits(
        subset(train), subset(val), subset(test), 10, (channels, image_size, image_size)
    )


def _image_channels(channels: int | None) -> int:
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3 for image data, got {channels!r}")
    return channels or 3


class _Transformed(Dataset):
    """``dataset[indices[i]]`` with ``transform`` applied to the image."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Callable) -> None:
        self.dataset, self.indices, self.transform = dataset, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        image, label = self.dataset[int(self.indices[i])]
        return self.transform(image), label


def _pipeline(
    geometry: list, channels: int, stats: tuple[Sequence[float], Sequence[float]], *, flip: bool
) -> Callable:
    """Grayscale (for 1 channel), ``geometry`` (resize / crop), optional flip, tensor, normalise.

    For one channel the RGB statistics are mixed with the luma weights (an approximation).
    """
    from torchvision import transforms as T

    mean, std = stats
    steps = []
    if channels == 1:
        steps.append(T.Grayscale(1))
        mean, std = ([sum(w * v for w, v in zip(_LUMA, s, strict=True))] for s in (mean, std))
    steps += geometry
    if flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def _split_train(
    base: Dataset, labels: Sequence[int], val_fraction: float, seed: int, train_tf, eval_tf
) -> tuple[Dataset, Dataset]:
    train, val = stratified_split(labels, round(val_fraction * len(labels)), seed)
    return _Transformed(base, train, train_tf), _Transformed(base, val, eval_tf)


def _cifar(
    name: str, root: str | None, size: int, channels: int, seed: int, val_fraction: float
) -> DataSplits:
    import torchvision
    from torchvision import transforms as T

    class_name, folder, mean, std, num_classes = _CIFAR[name]
    if root is None:
        raise ValueError(f"{name} needs root=: a folder holding the extracted '{folder}' folder")
    path = Path(root).expanduser()
    if not (path / folder).is_dir():
        raise ValueError(
            f"{name} not found at {path / folder}: the data set must be placed there "
            "(extracted archive; nothing is downloaded)"
        )

    resize = [T.Resize(size)] if size != 32 else []
    crop = [T.RandomCrop(size, padding=max(1, size // 8))]
    train_tf = _pipeline(resize + crop, channels, (mean, std), flip=True)
    eval_tf = _pipeline(resize, channels, (mean, std), flip=False)
    cls = getattr(torchvision.datasets, class_name)
    try:
        base = cls(str(path), train=True, download=False)
        test = cls(str(path), train=False, download=False, transform=eval_tf)
    except RuntimeError as err:
        raise ValueError(f"{name} at {path / folder} is unreadable ({err})") from None
    train, val = _split_train(base, base.targets, val_fraction, seed, train_tf, eval_tf)
    return DataSplits(train, val, test, num_classes, (channels, size, size))


def _imagefolder(
    root: str | None, size: int, channels: int, seed: int, val_fraction: float
) -> DataSplits:
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    if root is None:
        raise ValueError("imagefolder needs root=: a folder with train/ and test/ (val/ optional)")
    path = Path(root).expanduser()
    for part in ("train", "test"):
        if not (path / part).is_dir():
            raise ValueError(
                f"imagefolder: {path / part} not found; the data set must be placed there as "
                "<root>/{train,test}[,/val]/<class>/<image>"
            )

    train_tf = _pipeline([T.RandomResizedCrop(size)], channels, _IMAGENET_STATS, flip=True)
    center = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
    eval_tf = _pipeline(center, channels, _IMAGENET_STATS, flip=False)
    try:
        base = ImageFolder(str(path / "train"))
        test = ImageFolder(str(path / "test"), transform=eval_tf)
        has_val = (path / "val").is_dir()
        val = ImageFolder(str(path / "val"), transform=eval_tf) if has_val else None
    except FileNotFoundError as err:
        raise ValueError(f"imagefolder under {path}: {err}") from None
    if val is not None:
        train = _Transformed(base, range(len(base)), train_tf)
        folders = (test, val)
    else:
        train, val = _split_train(base, base.targets, val_fraction, seed, train_tf, eval_tf)
        folders = (test,)
    for other in folders:
        if other.classes != base.classes:
            raise ValueError(f"imagefolder: classes of {other.root} differ from {path / 'train'}")
    return DataSplits(train, val, test, len(base.classes), (channels, size, size))


def _user_data(name: str, options: dict[str, Any]) -> DataSplits:
    module_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import data set {name!r}: {err}") from None
    params = inspect.signature(fn).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        names = {p.name for p in params}
        options = {k: v for k, v in options.items() if k in names}
    splits = fn(**options)
    if not isinstance(splits, DataSplits):
        raise ValueError(f"data set {name!r} returned {type(splits).__name__}, not DataSplits")
    return splits
