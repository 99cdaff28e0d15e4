"""The baseline (teacher) network: loaded from a checkpoint, or trained once and cached.

A trained baseline is cached in ``<study folder>/cache/baseline-<key>.pt`` (a state dict,
written atomically) with ``baseline-<key>.json`` next to it holding its accuracy. The key
hashes the model, data and recipe, so a changed recipe trains a new baseline instead of
reusing a stale one; an unchanged one is reused on resume. Checking the cache and training
happen under an exclusive lock (``baseline-<key>.lock``), so processes sharing the study
folder train it exactly once: the others wait, then load it. A cache that cannot be read
(truncated, garbage, not fitting the model) is treated as absent: a warning line, then the
baseline is trained again and the cache rewritten (``may_train=False``, as export uses,
makes it a one-line error naming the file instead).

Before any search the baseline is checked: the model's output must have one logit per
class, every weight must be finite (else a one-line error naming the tensor), and a
validation accuracy at chance level gets a warning line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
import time
from contextlib import nullcontext
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

_log = logging.getLogger(__name__)


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


_PICKLED = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")  # torch.load(weights_only=True)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _read_state(path: Path, device: str, what: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (a plain one, or under a ``"state_dict"`` key)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        found = _PICKLED.search(str(err))
        if found is None:  # bytes that are no pickle torch.load reads
            raise ConfigError(
                f"{what} {str(path)!r} is not a PyTorch file (unreadable pickle data)"
            ) from None
        raise ConfigError(
            f"{what} {str(path)!r} holds a pickled {found[1]} (Python objects are never "
            "unpickled): save a state dict instead, torch.save(model.state_dict(), path)"
        ) from None
    except Exception as err:  # torch.load fails on foreign or truncated bytes in many ways
        raise ConfigError(
            f"{what} {str(path)!r} is not a readable PyTorch file ({_first_line(err)})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ConfigError(
            f"{what} {str(path)!r} is not a state dict (a mapping of names to tensors), got "
            f"{type(state).__name__}"
        )
    return state


def _load_state(model: nn.Module, path: Path, device: str, what: str = "baseline checkpoint"):
    """Load ``path`` into ``model``; on any failure the model's weights are left as they were."""
    state = _read_state(path, device, what)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        model.load_state_dict(before)
        raise ConfigError(
            f"{what} {str(path)!r} does not fit the model: {_first_line(err)}"
        ) from None


def _read_cache(model: nn.Module, path: Path, meta: Path, device: str) -> float:
    """Load the cached baseline into ``model`` and return its recorded validation accuracy.

    Raises:
        ConfigError: either file is unreadable or does not fit (the model is unchanged).
    """
    try:
        accuracy = json.loads(meta.read_text())["val_accuracy"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"cached baseline record {str(meta)!r} is unreadable ({_first_line(err)})"
        ) from None
    if isinstance(accuracy, bool) or not isinstance(accuracy, int | float):
        raise ConfigError(f"cached baseline record {str(meta)!r} has no accuracy")
    _load_state(model, path, device, "cached baseline")
    return float(accuracy)


def _check_output(cfg: StudyConfig, model: nn.Module, splits: DataSplits) -> None:
    """One logit per class for a batch of the data's input shape, else a one-line error."""
    shape, classes = (2, *splits.input_shape), splits.num_classes
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(shape, device=cfg.device))
    except Exception as err:  # a user model may fail in any way
        raise ConfigError(
            f"model {cfg.model.name!r} fails on a batch of shape {tuple(shape)} (the data's "
            f"input shape): {type(err).__name__}: {_first_line(err)}"
        ) from None
    finally:
        model.train(was_training)
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != (2, classes):
        raise ConfigError(
            f"model {cfg.model.name!r} outputs {got} for a batch of shape {tuple(shape)}; "
            f"data set {cfg.data.name!r} has {classes} classes, so it must output (2, {classes})"
        )


def _check_finite(model: nn.Module, where: Path) -> None:
    """Every parameter and buffer is finite, else a one-line error naming the first tensor."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ConfigError(
                f"baseline {str(where)!r}: {name} has {bad} non-finite (NaN or inf) values of "
                f"{tensor.numel()}; the search needs a baseline with finite weights"
            )


def _warn_if_chance(accuracy: float, classes: int) -> None:
    """A warning line when the accuracy is within a tenth of the way from chance to 1."""
    chance = 1 / classes
    if accuracy <= chance + 0.1 * (1 - chance):
        _log.warning(
            f"warning: the baseline's validation accuracy {accuracy:.4f} is at chance level "
            f"(1/{classes} classes = {chance:.4f}): it looks untrained or broken, and the "
            "search would compare noise; check baseline.checkpoint or the training recipe"
        )


def _check_trainable(cfg: StudyConfig, splits: DataSplits) -> None:
    """A recipe that can train: epochs >= 1 and at least two training images."""
    if cfg.baseline.epochs < 1:
        raise ConfigError(
            "baseline.epochs is 0 and no baseline.checkpoint is given: nothing would train "
            "the baseline; set baseline.epochs >= 1 or baseline.checkpoint"
        )
    size = len(splits.train)
    if size < 2:
        raise ConfigError(
            f"the training split has {size} image(s): the baseline needs at least 2 to train"
        )


def load_baseline(
    cfg: StudyConfig,
    model: nn.Module,
    splits: DataSplits,
    *,
    may_train: bool = True,
) -> Baseline:
    """Load (``baseline.checkpoint``), reuse (cache) or train the baseline, then measure it;
    progress lines are logged (INFO; a baseline at chance level or an unreadable cache: WARNING).

    Args:
        cfg: the study.
        model: the freshly built model; its weights are replaced.
        splits: the data; accuracy is measured on ``splits.val``.
        may_train: train when there is no cache, or over an unreadable one (with a warning
            line); ``False`` (export) makes either an error naming the file.

    Raises:
        ConfigError: an unreadable or unfitting checkpoint (or cache, without ``may_train``),
            no cache without ``may_train``, a model whose output does not fit the data,
            non-finite weights, a recipe that cannot train.
    """
    device = cfg.device
    model = model.to(device)
    _check_output(cfg, model, splits)
    val = make_loader(splits.val, batch_size=cfg.proxy.eval_batch_size, shuffle=False)
    if cfg.baseline.checkpoint is not None:
        path = cfg.baseline.checkpoint
        _load_state(model, path, device)
        _check_finite(model, path)
        accuracy = train.evaluate(model, val, device=device)
    else:
        path, meta = cache_paths(cfg)
        if may_train:
            _check_trainable(cfg, splits)  # before the lock: a bad recipe leaves no file
        # Readers need no lock (the cache is renamed into place whole), and take none, so
        # that export works on a read-only study folder.
        lock = exclusive_lock(path.with_suffix(".lock")) if may_train else nullcontext()
        with lock:
            accuracy = None
            if path.exists() and meta.exists():
                try:
                    accuracy = _read_cache(model, path, meta, device)
                    _log.info("baseline: reusing %s (val accuracy %.4f)", path.name, accuracy)
                except ConfigError as err:
                    if not may_train:
                        raise ConfigError(
                            f"{err}; delete {path.name} and {meta.name} in {path.parent} and run "
                            "the search again to retrain it"
                        ) from None
                    _log.warning(
                        "warning: %s; ignoring the cache and training the baseline again", err
                    )
            elif not may_train:
                missing = meta if path.exists() else path
                raise ConfigError(
                    f"cached baseline {str(missing)!r} is missing: run the search to train it"
                )
            if accuracy is None:
                try:
                    accuracy = _train(cfg, model, splits, val, path, meta)
                except FloatingPointError as err:
                    raise ConfigError(
                        f"baseline training diverged ({_first_line(err)}); lower baseline.lr"
                    ) from None
        _check_finite(model, path)
    model.eval()
    _warn_if_chance(accuracy, splits.num_classes)
    shape = tuple(splits.input_shape)
    return Baseline(model, accuracy, count_macs(model, shape), count_params(model), shape, path)


def _save_state(state: dict[str, torch.Tensor], tmp: str) -> None:
    """``torch.save`` through a file object: the archive's inner folder is then the fixed
    ``archive``, not the temporary file's random name, so equal weights give equal bytes."""
    with open(tmp, "wb") as handle:
        torch.save(state, handle)


def _train(
    cfg: StudyConfig,
    model: nn.Module,
    splits: DataSplits,
    val: DataLoader,
    path: Path,
    meta: Path,
) -> float:
    """Train by the recipe, measure, and cache the state dict and its accuracies."""
    recipe = cfg.baseline
    _log.info(
        "baseline: training %s for %d epochs (cached in %s)",
        cfg.model.name,
        recipe.epochs,
        path.parent,
    )
    train.set_seed(cfg.seed)
    loader = make_loader(
        splits.train,
        batch_size=recipe.batch_size,
        shuffle=True,
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
        drop_last=len(splits.train) > recipe.batch_size,  # never an empty epoch
    )
    start = time.perf_counter()
    train.train_baseline(
        model,
        loader,
        epochs=recipe.epochs,
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
        device=cfg.device,
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
    atomic_write(path, lambda tmp: _save_state(state, tmp))
    atomic_write(meta, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
    _log.info(
        "baseline: val accuracy %.4f, test accuracy %.4f (%.1f s)",
        accuracy,
        record["test_accuracy"],
        seconds,
    )
    return accuracy
