"""The proxy fine-tune, written once: the search scores each trial with it, export replays it.

For trial ``number`` of a study seeded ``seed``, :func:`proxy_finetune`:

1. seeds Python, NumPy and torch with ``seed + number``;
2. recalibrates BatchNorm on ``bn_batches`` batches of the training loader seeded
   ``seed + number`` (phase ``"bn_recal"``; skipped when ``bn_batches`` is 0);
3. evaluates the pre-fine-tune accuracy on the validation loader (phase ``"pre_eval"``);
4. distils from the teacher for ``steps`` steps, ``warmup`` of them warming up, on the
   training loader seeded ``seed + number + 1`` (phase ``"distill"``);
5. evaluates the final accuracy (phase ``"eval"``); with ``steps == 0`` it is the
   pre-fine-tune accuracy and steps 4 and 5 are skipped.

The search and ``autodecomp export`` run this same code with the same seeds, so an export
without extra epochs rebuilds the trial's model bit for bit on the same device and threads.
The settings come as any object with :class:`ProxySettings`' fields (the study's
``ProxyConfig``): this floor sits below the configuration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import train
from .data import make_loader

__all__ = [
    "PHASES",
    "ProxyResult",
    "ProxySettings",
    "proxy_distill",
    "proxy_finetune",
    "proxy_loader",
]

PHASES = ("bn_recal", "pre_eval", "distill", "eval")  # the names handed to ``phase``

Phase = Callable[[str], AbstractContextManager[Any]]


class ProxySettings(Protocol):
    """The proxy fields the fine-tune reads (those of ``autodecomp.config.ProxyConfig``)."""

    @property
    def steps(self) -> int: ...
    @property
    def lr(self) -> float: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def temperature(self) -> float: ...
    @property
    def alpha(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def bn_batches(self) -> int: ...
    @property
    def warmup(self) -> int: ...


@dataclass(frozen=True)
class ProxyResult:
    """Validation accuracies before and after the distillation (equal when ``steps == 0``)."""

    pre_accuracy: float
    accuracy: float


def _untimed(_phase: str) -> AbstractContextManager[Any]:
    return nullcontext()


def proxy_loader(
    train_set: Dataset, proxy: ProxySettings, seed: int, *, num_workers: int = 0
) -> DataLoader:
    """The shuffled training loader of the fine-tune: ``proxy.batch_size`` batches, the order
    drawn from ``seed``, the last incomplete batch dropped unless it is the only one."""
    return make_loader(
        train_set,
        batch_size=proxy.batch_size,
        shuffle=True,
        seed=seed,
        num_workers=num_workers,
        drop_last=len(train_set) > proxy.batch_size,
    )


def proxy_distill(
    model: nn.Module,
    teacher: nn.Module,
    loader: Iterable[Any],
    proxy: ProxySettings,
    *,
    steps: int,
    lr: float,
    warmup: int,
    device: torch.device | str = "cpu",
    callback: Callable[[int, float], Any] | None = None,
) -> None:
    """:func:`~autodecomp.workload.train.distill` with the proxy's temperature, alpha and
    weight decay."""
    train.distill(
        model,
        teacher,
        loader,
        steps=steps,
        lr=lr,
        temperature=proxy.temperature,
        alpha=proxy.alpha,
        weight_decay=proxy.weight_decay,
        device=device,
        warmup_steps=warmup,
        callback=callback,
    )


def proxy_finetune(
    model: nn.Module,
    teacher: nn.Module,
    train_set: Dataset,
    val_loader: Iterable[Any],
    proxy: ProxySettings,
    *,
    seed: int,
    number: int,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    callback: Callable[[int, float], Any] | None = None,
    phase: Phase = _untimed,
    on_pre_eval: Callable[[float], Any] | None = None,
) -> ProxyResult:
    """Fine-tune ``model`` in place as the search's accuracy proxy (see the module docstring).

    Args:
        model: the compressed model (moved to ``device``; left in eval mode).
        teacher: the baseline it is distilled from (not modified).
        train_set: the training split.
        val_loader: the validation batches both accuracies are measured on.
        proxy: the settings (:class:`ProxySettings`).
        seed: the study's seed.
        number: the trial's number (offsets every seed).
        device: where to train and evaluate.
        num_workers: data-loading worker processes of the training loaders.
        callback: ``callback(step, loss)`` after every distillation step; may raise to stop.
        phase: ``phase(name)`` is a context manager around each phase in :data:`PHASES`
            (e.g. a clock); by default nothing.
        on_pre_eval: receives the pre-fine-tune accuracy as soon as it is known (before the
            distillation, which ``callback`` may stop).

    Returns:
        The validation accuracies before and after the distillation.
    """
    train.set_seed(seed + number)
    if proxy.bn_batches > 0:
        with phase("bn_recal"):
            loader = proxy_loader(train_set, proxy, seed + number, num_workers=num_workers)
            train.recalibrate_bn(model, loader, batches=proxy.bn_batches, device=device)
    with phase("pre_eval"):
        pre = train.evaluate(model, val_loader, device=device)
    if on_pre_eval is not None:
        on_pre_eval(pre)
    if proxy.steps == 0:
        return ProxyResult(pre, pre)
    with phase("distill"):
        loader = proxy_loader(train_set, proxy, seed + number + 1, num_workers=num_workers)
        proxy_distill(
            model, teacher, loader, proxy, steps=proxy.steps, lr=proxy.lr,
            warmup=proxy.warmup, device=device, callback=callback,
        )  # fmt: skip
    with phase("eval"):
        accuracy = train.evaluate(model, val_loader, device=device)
    return ProxyResult(pre, accuracy)
