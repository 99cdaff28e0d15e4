"""Trained ResNet-20 and torchvision ResNet-18 on the built-in digits (32x32, 3 channels).

No weights can be downloaded here, so the solver benchmarks train their own: SGD with the
baseline trainer (``autodecomp.workload.train.train_baseline``), seed 0, cached under
``bench/results/trained/`` (git-ignored) and reused::

    python bench/trained.py            # trains what is missing, prints val accuracies
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

import autodecomp as ad
from autodecomp.workload import train
from autodecomp.workload.data import load_data, make_loader
from autodecomp.workload.datasets import DataSplits

FOLDER = Path(__file__).resolve().parent / "results" / "trained"
EPOCHS = {"resnet20": 15, "resnet18": 10}
_log = logging.getLogger(__name__)


def digits() -> DataSplits:
    """The digits at 32x32 with 3 channels, seed 0 (the studies' splits)."""
    return load_data("digits", image_size=32, channels=3, seed=0)


def trained_model(name: str) -> nn.Module:
    """``name`` (``resnet20`` or ``resnet18``) trained on the digits, from the cache if there."""
    path = FOLDER / f"{name}-digits32.pt"
    model = ad.get_model(name, num_classes=10)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    train.set_seed(0)
    splits = digits()
    loader = make_loader(splits.train, batch_size=128, shuffle=True, seed=0)
    train.train_baseline(model, loader, epochs=EPOCHS[name], lr=0.1, warmup_epochs=1)
    FOLDER.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def accuracy(model: nn.Module) -> float:
    val = make_loader(digits().val, batch_size=256, shuffle=False)
    return train.evaluate(model, val)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    for name in EPOCHS:
        print(f"{name}: val accuracy {accuracy(trained_model(name)):.4f}")
