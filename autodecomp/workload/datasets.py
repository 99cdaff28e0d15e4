"""The built-in data sets, each registered once in :data:`DATASETS` (nothing is downloaded).

- ``"digits"``: scikit-learn's 1,797 handwritten 8x8 digits (shipped with scikit-learn),
  split by class-stratified seeded sampling, scaled to [0, 1], bilinearly resized to
  ``image_size`` (default 16), normalised with the train split's mean / std and repeated to
  ``channels`` (default 1). Held in memory as ``TensorDataset``.
- ``"cifar10"`` / ``"cifar100"``: torchvision's CIFAR from a local ``root`` holding the
  extracted ``cifar-10-batches-py`` / ``cifar-100-python`` folder; the validation split is
  carved from the training set (stratified, seeded); the official test set is the test split.
- ``"imagefolder"``: ``root/train/<class>/*``, ``root/test/<class>/*`` and optionally
  ``root/val/<class>/*`` (otherwise carved from train); ``image_size`` default 224.

Adding a data set is one ``DATASETS.add(name, DataSet(load, image_size, root_hint))``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ..core.errors import ConfigError
from ..core.registry import Registry

__all__ = ["DATASETS", "DataSet", "DataSplits", "UnreadableImageError", "stratified_split"]

_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_LUMA = (0.299, 0.587, 0.114)


class UnreadableImageError(ConfigError):
    """An image file of a data set cannot be decoded; the message (one line) names the file.

    Raised when a batch is loaded, which may be in a ``DataLoader`` worker: the worker's
    exception reaches the main process re-raised as ``UnreadableImageError(text)`` with its
    traceback in ``text``, so the one-line message is taken back from the traceback's end.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if "\n" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip().splitlines()[0]
        super().__init__(message)


def _read_image(path: str) -> Any:
    """The RGB image at ``path`` (torchvision's default loader), or a one-line error naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert("RGB")
    except UnidentifiedImageError:
        reason = "not an image format PIL can decode"
    except Exception as err:  # PIL raises many types for truncated or huge files
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    raise UnreadableImageError(
        f"imagefolder: cannot read image {path}: {reason} (delete or replace the file)"
    )


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


@dataclass(frozen=True)
class DataSet:
    """A built-in data set, registered by name in :data:`DATASETS`.

    Attributes:
        load: ``load(root=, image_size=, channels=, seed=, val_fraction=, test_fraction=)``
            returning :class:`DataSplits`; ``root`` is a ``Path`` (or ``None``) and
            ``image_size`` is already defaulted.
        image_size: default side of the (square) inputs.
        root: what the local ``root`` folder must hold; ``""`` for a data set that needs none.
    """

    load: Callable[..., DataSplits]
    image_size: int
    root: str = ""

    @property
    def needs_root(self) -> bool:
        """Whether the data is read from a local ``root`` folder."""
        return bool(self.root)


DATASETS: Registry[DataSet] = Registry("data set")


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
    *,
    image_size: int,
    channels: int | None,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    **_: Any,
) -> DataSplits:
    if not (0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"test_fraction must be in (0, 1) with val_fraction + test_fraction < 1, "
            f"got {test_fraction!r} and {val_fraction!r}"
        )
    channels = channels or 1
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


@dataclass(frozen=True)
class _Cifar:
    """One CIFAR variant: torchvision class, extracted folder, channel statistics, classes."""

    name: str
    class_name: str
    folder: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int


def _cifar(
    info: _Cifar,
    *,
    root: Path,
    image_size: int,
    channels: int | None,
    seed: int,
    val_fraction: float,
    **_: Any,
) -> DataSplits:
    import torchvision
    from torchvision import transforms as T

    name, folder, mean, std = info.name, info.folder, info.mean, info.std
    path, size, channels = root, image_size, _image_channels(channels)
    if not (path / folder).is_dir():
        raise ValueError(
            f"{name} not found at {path / folder}: the data set must be placed there "
            "(extracted archive; nothing is downloaded)"
        )

    resize = [T.Resize(size)] if size != 32 else []
    crop = [T.RandomCrop(size, padding=max(1, size // 8))]
    train_tf = _pipeline(resize + crop, channels, (mean, std), flip=True)
    eval_tf = _pipeline(resize, channels, (mean, std), flip=False)
    cls = getattr(torchvision.datasets, info.class_name)
    try:
        base = cls(str(path), train=True, download=False)
        test = cls(str(path), train=False, download=False, transform=eval_tf)
    except RuntimeError as err:
        raise ValueError(f"{name} at {path / folder} is unreadable ({err})") from None
    train, val = _split_train(base, base.targets, val_fraction, seed, train_tf, eval_tf)
    return DataSplits(train, val, test, info.num_classes, (channels, size, size))


def _imagefolder(
    *,
    root: Path,
    image_size: int,
    channels: int | None,
    seed: int,
    val_fraction: float,
    **_: Any,
) -> DataSplits:
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    path, size, channels = root, image_size, _image_channels(channels)
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
        folder = functools.partial(ImageFolder, loader=_read_image)
        base = folder(str(path / "train"))
        test = folder(str(path / "test"), transform=eval_tf)
        has_val = (path / "val").is_dir()
        val = folder(str(path / "val"), transform=eval_tf) if has_val else None
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


def _add_cifar(info: _Cifar) -> None:
    hint = f"a folder holding the extracted '{info.folder}' folder"
    DATASETS.add(info.name, DataSet(functools.partial(_cifar, info), 32, hint))


DATASETS.add("digits", DataSet(_digits, 16))
_add_cifar(
    _Cifar(
        "cifar10", "CIFAR10", "cifar-10-batches-py",
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10,
    )
)  # fmt: skip
_add_cifar(
    _Cifar(
        "cifar100", "CIFAR100", "cifar-100-python",
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 100,
    )
)  # fmt: skip
DATASETS.add(
    "imagefolder", DataSet(_imagefolder, 224, "a folder with train/ and test/ (val/ optional)")
)
