from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from autodecomp.workload.data import DataSplits, load_data, make_loader, stratified_split


def _rows(dataset: TensorDataset) -> set[bytes]:
    return {row.numpy().tobytes() for row in dataset.tensors[0]}


def test_digits_splits_sizes_disjoint_stratified():
    splits = load_data("digits", seed=0)
    sizes = [len(splits.train), len(splits.val), len(splits.test)]
    assert sizes == [1258, 180, 359] and sum(sizes) == 1797
    # The 1,797 digit images are pairwise distinct, so disjoint splits have distinct rows.
    rows = [_rows(s) for s in (splits.train, splits.val, splits.test)]
    assert len(rows[0] | rows[1] | rows[2]) == 1797
    assert np.bincount(splits.val.tensors[1].numpy()).tolist() == [18] * 10
    assert splits.num_classes == 10 and splits.input_shape == (1, 16, 16)
    parts = [np.bincount(s.tensors[1].numpy()) for s in (splits.train, splits.val, splits.test)]
    per_class = sum(parts)
    for counts, size in zip(parts, sizes, strict=True):
        # every class gives its share of the split, within one item
        assert np.all(np.abs(counts - per_class * size / 1797) < 1)


def test_digits_normalised_on_train():
    x = load_data("digits", seed=3).train.tensors[0]
    assert x.dtype == torch.float32
    assert abs(x.mean().item()) < 1e-5 and abs(x.std().item() - 1) < 1e-5


def test_digits_deterministic_under_seed():
    a, b, c = (load_data("digits", seed=s) for s in (7, 7, 8))
    assert torch.equal(a.val.tensors[0], b.val.tensors[0])
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert _rows(a.test) != _rows(c.test)


@pytest.mark.parametrize(("size", "channels"), [(32, 3), (8, 1), (4, 2)])
def test_digits_image_size_and_channels(size, channels):
    splits = load_data("digits", image_size=size, channels=channels)
    x = splits.train.tensors[0]
    assert x.shape[1:] == (channels, size, size) and splits.input_shape == (channels, size, size)
    assert torch.equal(x[:, :1].expand_as(x), x)


def test_stratified_split_exact_counts():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    rest, part = stratified_split(labels, 11, seed=0)
    assert len(part) == 11 and np.intersect1d(rest, part).size == 0
    assert np.array_equal(np.sort(np.concatenate([rest, part])), np.arange(100))
    # quotas 5.5, 3.3, 2.2 -> floors 5, 3, 2, the remaining one to the largest remainder
    assert np.bincount(labels[part]).tolist() == [6, 3, 2]
    assert np.array_equal(stratified_split(labels, 11, seed=0)[1], part)


def test_bad_arguments_and_names():
    with pytest.raises(ValueError, match="digits, cifar10, cifar100, imagefolder"):
        load_data("mnist")
    with pytest.raises(ValueError, match="val_fraction"):
        load_data("digits", val_fraction=0)
    with pytest.raises(ValueError, match="test_fraction"):
        load_data("digits", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="cannot import data set"):
        load_data("no_such_module_xyz:fn")


@pytest.mark.parametrize(
    ("name", "folder"), [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_missing_cifar_names_path(tmp_path, name, folder):
    with pytest.raises(ValueError, match="must be placed there") as info:
        load_data(name, root=str(tmp_path))
    assert str(tmp_path / folder) in str(info.value)
    with pytest.raises(ValueError, match="root="):
        load_data(name)


def _fake_cifar10(root, n_train=100, n_test=30):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    per_batch = n_train // 5
    for i in range(1, 6):
        entry = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": [j % 10 for j in range(per_batch)],
        }
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(entry))
    test = {"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), "labels": [0] * n_test}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({"label_names": [str(i) for i in range(10)]})
    )


def test_cifar_from_local_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    _fake_cifar10(tmp_path)
    splits = load_data("cifar10", root=str(tmp_path), seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 30)
    assert splits.num_classes == 10 and splits.input_shape == (3, 32, 32)
    assert np.bincount([splits.val[i][1] for i in range(10)]).tolist() == [1] * 10
    assert torch.equal(splits.val[0][0], splits.val[0][0])  # no augmentation on val
    torch.manual_seed(0)
    first = torch.stack([splits.train[0][0] for _ in range(4)])
    assert not torch.equal(first[0], first[1]) or not torch.equal(first[2], first[3])
    gray = load_data("cifar10", root=str(tmp_path), channels=1, image_size=16)
    assert gray.train[0][0].shape == (1, 16, 16) and gray.test[0][0].shape == (1, 16, 16)


def _image_tree(root, parts, classes=("cat", "dog"), per_class=5):
    for part in parts:
        for name in classes:
            folder = root / part / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (40, 30), (i * 40, 10, 200)).save(folder / f"{i}.png")


def test_imagefolder_carves_val(tmp_path):
    _image_tree(tmp_path, ("train", "test"))
    splits = load_data("imagefolder", root=str(tmp_path), image_size=24, val_fraction=0.2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 10)
    assert splits.num_classes == 2 and splits.input_shape == (3, 24, 24)
    assert splits.val[0][0].shape == (3, 24, 24) and splits.train[0][0].shape == (3, 24, 24)
    assert sorted(splits.val[i][1] for i in range(2)) == [0, 1]


def test_imagefolder_val_folder_and_errors(tmp_path):
    _image_tree(tmp_path, ("train", "val", "test"))
    splits = load_data("imagefolder", root=str(tmp_path), image_size=16, channels=1)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 10, 10)
    assert splits.test[0][0].shape == (1, 16, 16)
    with pytest.raises(ValueError, match=str(tmp_path / "missing" / "train")):
        load_data("imagefolder", root=str(tmp_path / "missing"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "test").mkdir()
    with pytest.raises(ValueError, match="class folder"):
        load_data("imagefolder", root=str(tmp_path / "empty"))
    other = tmp_path / "other"
    _image_tree(other, ("train",))
    _image_tree(other, ("test",), classes=("cat", "emu"))
    with pytest.raises(ValueError, match="classes"):
        load_data("imagefolder", root=str(other))


def user_splits(seed, image_size=None):
    data = TensorDataset(torch.full((4, 1, 2, 2), float(seed)), torch.zeros(4, dtype=torch.long))
    return DataSplits(data, data, data, 2, (1, 2, 2))


def user_bad(**kwargs):
    return 42


def test_user_callable(tmp_path):
    splits = load_data(f"{__name__}:user_splits", seed=5, root=str(tmp_path))
    assert splits.train.tensors[0][0, 0, 0, 0] == 5 and splits.num_classes == 2
    with pytest.raises(ValueError, match="not DataSplits"):
        load_data(f"{__name__}:user_bad")


def test_make_loader_seeded_order():
    data = TensorDataset(torch.arange(50))

    def order(seed, epochs=2):
        loader = make_loader(data, batch_size=8, shuffle=True, seed=seed)
        return [torch.cat([b[0] for b in loader]).tolist() for _ in range(epochs)]

    first = order(1)
    assert first == order(1)
    assert first[0] != first[1] and sorted(first[0]) == list(range(50))
    assert first != order(2)
    loader = make_loader(data, batch_size=8, shuffle=False, drop_last=True)
    assert torch.cat([b[0] for b in loader]).tolist() == list(range(48))
