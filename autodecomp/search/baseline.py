"""The baseline (teacher) network: loaded from a checkpoint, or trained once and cached.

A trained baseline is cached in ``<study folder>/cache/baseline-<key>.pt`` (a state dict,
written atomically) with ``baseline-<key>.json`` next to it holding its accuracy. The key
hashes the model, data and recipe, so a changed recipe trains a new baseline instead of
reusing a stale one; an unchanged one is reused on resume. Checking the cache and training
happen under an exclusive lock (``baseline-<key>.lock``), so processes sharing the study
folder train it exactly once: the others wait, then load it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import StudyConfig
from ..core.errors import ConfigError
from ..core.files import atomic_write, exclusive_lock
from ..measure.cost import count_macs, count_params
from ..workload import train
from ..workload.data import DataSplits, make_loader

__all__ = ["Baseline", "cache_paths", "load_baseline"]


@dataclass(frozen=True)
class Baseline:
    """The trained dense model (eval mode, on the study's device) and its measurements."""

    model: nn.Module
    accuracy: float
    macs: int
    params: int
    input_shape: tuple[int, int, int]
    checkpoint: Path

    def info(self) -> dict[str, Any]:
        """JSON-serialisable summary (stored on the study)."""
        return {
            "accuracy": self.accuracy,
            "macs": self.macs,
            "params": self.params,
            "input_shape": list(self.input_shape),
            "checkpoint": str(self.checkpoint),
        }


def cache_paths(cfg: StudyConfig) -> tuple[Path, Path]:
    """``(state dict, json)`` paths of the cached baseline for this model, data and recipe."""
    recipe = {
        "model": cfg.to_dict()["model"],
        "data": cfg.to_dict()["data"],
        "baseline": cfg.to_dict()["baseline"],
        "seed": cfg.seed,
    }
    key = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    folder = cfg.folder / "cache"
    return folder / f"baseline-{key}.pt", folder / f"baseline-{key}.json"


def _load_state(model: nn.Module, path: Path, device: str) -> None:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        model.load_state_dict(state)
    except (RuntimeError, OSError, KeyError, TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"baseline checkpoint {str(path)!r} does not fit the model: {first}"
        ) from None


def load_baseline(
    cfg: StudyConfig,
    model: nn.Module,
    splits: DataSplits,
    *,
    log: Callable[[str], None] = print,
) -> Baseline:
    """Load (``baseline.checkpoint``), reuse (cache) or train the baseline, then measure it.

    Args:
        cfg: the study.
        model: the freshly built model; its weights are replaced.
        splits: the data; accuracy is measured on ``splits.val``.
        log: receives progress lines.
    """
    device = cfg.device
    model = model.to(device)
    val = make_loader(splits.val, batch_size=cfg.proxy.eval_batch_size, shuffle=False)
    if cfg.baseline.checkpoint is not None:
        path = cfg.baseline.checkpoint
        _load_state(model, path, device)
        accuracy = train.evaluate(model, val, device=device)
    else:
        path, meta = cache_paths(cfg)
        with exclusive_lock(path.with_suffix(".lock")):
            if path.exists() and meta.exists():
                _load_state(model, path, device)
                accuracy = float(json.loads(meta.read_text())["val_accuracy"])
                log(f"baseline: reusing {path.name} (val accuracy {accuracy:.4f})")
            else:
                accuracy = _train(cfg, model, splits, val, path, meta, log)
    model.eval()
    shape = tuple(splits.input_shape)
    return Baseline(model, accuracy, count_macs(model, shape), count_params(model), shape, path)


def _train(
    cfg: StudyConfig,
    model: nn.Module,
    splits: DataSplits,
    val: DataLoader,
    path: Path,
    meta: Path,
    log: Callable[[str], None],
) -> float:
    """Train by the recipe, measure, and cache the state dict and its accuracies."""
    recipe = cfg.baseline
    log(f"baseline: training {cfg.model.name} for {recipe.epochs} epochs (cached in {path.parent})")
    train.set_seed(cfg.seed)
    loader = make_loader(
        splits.train,
        batch_size=recipe.batch_size,
        shuffle=True,
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
        drop_last=True,
    )
    start = time.perf_counter()
    train.train_baseline(
        model,
        loader,
        epochs=recipe.epochs,
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
        device=cfg.device,
        log=log,
    )
    seconds = time.perf_counter() - start
    accuracy = train.evaluate(model, val, device=cfg.device)
    test = make_loader(splits.test, batch_size=cfg.proxy.eval_batch_size, shuffle=False)
    record = {
        "val_accuracy": accuracy,
        "test_accuracy": train.evaluate(model, test, device=cfg.device),
        "seconds": round(seconds, 3),
        "model": cfg.model.name,
        "epochs": recipe.epochs,
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    atomic_write(meta, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
    log(
        f"baseline: val accuracy {accuracy:.4f}, test accuracy {record['test_accuracy']:.4f} "
        f"({seconds:.1f} s)"
    )
    return accuracy
