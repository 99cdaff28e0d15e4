"""The baseline and the data are checked before any search: unreadable checkpoints and
caches, untrained or broken baselines, small training splits, unreadable images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tiny_study import logged, make_study, tiny_config
from torch.utils.data import DataLoader, TensorDataset

from autodecomp.config import load_config
from autodecomp.core.errors import ConfigError
from autodecomp.search.baseline import cache_paths, load_baseline
from autodecomp.search.study import prepare
from autodecomp.workload.data import DataSplits, load_data, make_loader
from autodecomp.workload.datasets import UnreadableImageError
from autodecomp.workload.models import get_model
from autodecomp.workload.train import train_baseline

STUDY = tiny_config(baseline={"epochs": 1}, space={"methods": ["tucker"], "ratio": None}, trials=1)


def _baseline(path: Path, **kwargs):
    cfg = load_config(path)
    prepared = prepare(cfg)
    with logged() as lines:
        baseline = load_baseline(cfg, prepared.model, prepared.splits, **kwargs)
    return cfg, baseline, lines


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny study whose baseline is trained and cached (nothing searched)."""
    return make_study(tmp_path_factory.mktemp("hardening"), STUDY)


def _copy(study: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    folder.mkdir()
    for source in study.parent.rglob("*"):
        if source.is_file():
            target = folder / source.relative_to(study.parent)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    return folder / "study.yaml"


@pytest.mark.parametrize(
    "damage",
    [
        lambda pt, record: pt.write_bytes(pt.read_bytes()[:200]),
        lambda pt, record: pt.write_bytes(b"garbage"),
        lambda pt, record: torch.save(get_model("resnet20").state_dict(), pt),
        lambda pt, record: record.write_text("{not json"),
        lambda pt, record: record.write_text(json.dumps({"val_accuracy": "high"})),
    ],
    ids=["truncated", "garbage", "other-model", "record-garbage", "record-no-accuracy"],
)
def test_an_unreadable_cache_is_retrained_with_a_warning(trained, tmp_path, damage):
    study = _copy(trained, tmp_path)
    cfg = load_config(study)
    pt, record = cache_paths(cfg)
    expected = json.loads(record.read_text())["val_accuracy"]
    damage(pt, record)
    with pytest.raises(ConfigError, match=r"cached baseline .*; delete baseline-\w+\.pt and"):
        _baseline(study, may_train=False)  # export: an error naming the files to delete
    _, baseline, lines = _baseline(study)
    warning = next(line for line in lines if line.startswith("warning:"))
    assert str(pt.parent) in warning and "training the baseline again" in warning
    assert baseline.accuracy == pytest.approx(expected)  # the same seeded recipe
    _, again, lines = _baseline(study)  # the rewritten cache is reused
    assert any("reusing" in line for line in lines) and again.accuracy == baseline.accuracy


def test_export_refuses_a_missing_cache_record(trained, tmp_path):
    study = _copy(trained, tmp_path)
    cache_paths(load_config(study))[1].unlink()
    with pytest.raises(ConfigError, match=r"baseline-\w+\.json' is missing"):
        _baseline(study, may_train=False)


def _write(folder: Path, **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump({**STUDY, **changes}))
    return path


def test_a_baseline_at_chance_gets_a_warning(tmp_path):
    state = get_model("digits_cnn", in_channels=1).state_dict()
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, tmp_path / "zero.pt")
    _, baseline, lines = _baseline(_write(tmp_path, baseline={"checkpoint": "zero.pt"}))
    assert baseline.accuracy < 0.2
    (warning,) = [line for line in lines if line.startswith("warning:")]
    assert "at chance level" in warning and "1/10" in warning


def test_a_trained_baseline_gets_no_warning(trained, tmp_path):
    _, baseline, lines = _baseline(_copy(trained, tmp_path))
    assert baseline.accuracy > 0.5 and not any(line.startswith("warning") for line in lines)


def small_splits(seed=0, **kwargs) -> DataSplits:
    """20 training images (fewer than a batch), separable by their mean."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(20) % 2
    x = torch.randn(20, 1, 8, 8, generator=g) + 2 * y.view(-1, 1, 1, 1).float()
    data = TensorDataset(x, y)
    return DataSplits(data, data, data, 2, (1, 8, 8))


def test_a_training_split_smaller_than_a_batch_still_trains(tmp_path):
    study = _write(
        tmp_path,
        data={"name": f"{__name__}:small_splits"},
        baseline={"epochs": 2, "lr": 0.05, "batch_size": 64},
        space={"methods": ["tucker"]},
    )
    cfg = load_config(study)
    prepared = prepare(cfg)
    before = {k: v.clone() for k, v in prepared.model.state_dict().items()}
    with logged() as lines:
        baseline = load_baseline(cfg, prepared.model, prepared.splits)
    losses = [line for line in lines if line.startswith("epoch ")]
    assert len(losses) == 2 and all("loss 0.0000" not in line for line in losses)
    after = baseline.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_an_empty_training_loader_is_an_error():
    empty = DataLoader(
        TensorDataset(torch.zeros(3, 1, 8, 8), torch.zeros(3).long()), batch_size=4, drop_last=True
    )
    with pytest.raises(ValueError, match="yields no batches"):
        train_baseline(get_model("digits_cnn", in_channels=1), empty, epochs=1, lr=0.1)


def test_a_baseline_that_diverges_is_one_line(tmp_path):
    path = _write(tmp_path, baseline={"epochs": 1, "lr": 1e12, "batch_size": 64})
    with pytest.raises(ConfigError, match=r"baseline training diverged .*lower baseline\.lr"):
        _baseline(path)


def _images(root: Path) -> None:
    rng = np.random.default_rng(0)
    for part in ("train", "test"):
        for label in ("ant", "bee"):
            where = root / part / label
            where.mkdir(parents=True)
            for i in range(4):
                Image.fromarray((rng.random((8, 8, 3)) * 255).astype("uint8")).save(
                    where / f"{i}.png"
                )


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_is_one_line_naming_it(tmp_path, workers):
    _images(tmp_path)
    good = (tmp_path / "train" / "ant" / "0.png").read_bytes()
    (tmp_path / "train" / "bee" / "cut.png").write_bytes(good[: len(good) // 2])
    splits = load_data("imagefolder", root=str(tmp_path), image_size=8, val_fraction=0.2)
    loader = make_loader(splits.train, batch_size=4, shuffle=False, num_workers=workers)
    with pytest.raises(UnreadableImageError) as info:
        for _ in loader:
            pass
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"imagefolder: cannot read image {tmp_path / 'train' / 'bee'}")
    assert isinstance(info.value, ConfigError)


def raising_data(**kwargs):
    raise KeyError("labels.csv")


def one_class_data(**kwargs):
    data = TensorDataset(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))
    return DataSplits(data, data, data, 1, (1, 2, 2))


def raising_model(num_classes, **kwargs):
    raise ZeroDivisionError("bad width")


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda: load_data(f"{__name__}:raising_data"), "raised KeyError: 'labels.csv'"),
        (lambda: load_data(f"{__name__}:one_class_data"), "num_classes must be an integer >= 2"),
        (lambda: load_data(f"{__name__}:small_splits_typo"), "cannot import data set"),
        (lambda: get_model(f"{__name__}:raising_model"), "raised ZeroDivisionError: bad width"),
        (lambda: get_model(f"{__name__}:STUDY"), "is a dict, not a callable"),
    ],
    ids=["data-raises", "data-one-class", "data-missing", "model-raises", "model-not-callable"],
)
def test_broken_user_callables_are_one_line_value_errors(call, expected):
    with pytest.raises(ValueError, match=r"'test_hardening:\w+'") as info:
        call()
    assert expected in str(info.value) and "\n" not in str(info.value)
