"""Training utilities: baseline training, evaluation, BatchNorm recalibration, distillation."""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["distill", "evaluate", "kd_loss", "recalibrate_bn", "set_seed", "train_baseline"]

Batch = Any
_log = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (all devices) random generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to(batch: Batch, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = batch[0], batch[1]
    return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)


def _cycle(loader: Iterable[Batch]) -> Iterator[Batch]:
    """Endless batches: a fresh pass over ``loader`` whenever one ends (new shuffle each)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the data loader yields no batches")


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[Batch], device: torch.device | str = "cpu"
) -> float:
    """Top-1 accuracy in [0, 1] over ``loader``, in eval mode; the model's mode is restored."""
    was_training = model.training
    model.to(device).eval()
    correct = total = 0
    try:
        for batch in loader:
            inputs, targets = _to(batch, device)
            correct += (model(inputs).argmax(dim=1) == targets).sum().item()
            total += targets.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("cannot evaluate on an empty data loader")
    return correct / total


def _cosine(total_steps: int, warmup: int = 0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _sgd(params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def train_baseline(
    model: nn.Module,
    train_loader: Iterable[Batch],
    *,
    epochs: int,
    lr: float,
    weight_decay: float = 5e-4,
    device: torch.device | str = "cpu",
    warmup_epochs: float = 0.0,
    label_smoothing: float = 0.0,
) -> nn.Module:
    """Train from scratch with cross-entropy: SGD (momentum 0.9, Nesterov), per-step cosine LR.

    Args:
        model: the model (moved to ``device``, trained in place).
        train_loader: training batches ``(inputs, targets)``.
        epochs: passes over ``train_loader``.
        lr: peak learning rate.
        weight_decay: L2 penalty on all parameters.
        device: where to train.
        warmup_epochs: linear warm-up length (may be fractional).
        label_smoothing: cross-entropy label smoothing.

    Returns:
        ``model``, in eval mode. A one-line summary of every epoch is logged (INFO).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    if steps_per_epoch == 0:  # e.g. fewer samples than one batch with drop_last=True
        raise ValueError("the training loader yields no batches: nothing would be trained")
    model.to(device).train()
    optimizer = _sgd(model.parameters(), lr, weight_decay)
    warmup = round(warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _cosine(epochs * steps_per_epoch, warmup)
    )
    for epoch in range(1, epochs + 1):
        start, total_loss, seen = time.perf_counter(), 0.0, 0
        for batch in train_loader:
            inputs, targets = _to(batch, device)
            loss = F.cross_entropy(model(inputs), targets, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * targets.numel()
            seen += targets.numel()
        if not math.isfinite(total_loss):
            raise FloatingPointError(f"training loss became non-finite in epoch {epoch}")
        _log.info(
            "epoch %d/%d loss %.4f (%.1f s)",
            epoch,
            epochs,
            total_loss / max(1, seen),
            time.perf_counter() - start,
        )
    return model.eval()


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module, loader: Iterable[Batch], *, batches: int, device: torch.device | str = "cpu"
) -> None:
    """Re-estimate BatchNorm running statistics from ``batches`` batches; no gradient steps.

    Running statistics are reset and re-accumulated as a plain average (``momentum=None``)
    with only the BatchNorm layers in train mode (dropout etc. stay in eval mode, as at
    inference). The loader is cycled if it has fewer batches. Momenta are restored and the
    model is left in eval mode. Models without BatchNorm are left unchanged.
    """
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    norms = _batch_norms(model)
    model.to(device).eval()
    if not norms:
        return
    momenta = [bn.momentum for bn in norms]
    try:
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        for batch in itertools.islice(_cycle(loader), batches):
            model(_to(batch, device)[0])
    finally:
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
        model.eval()


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)`` (batch mean)."""
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    loss = alpha * t * t * kl
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(student_logits, targets)
    return loss


def distill(
    student: nn.Module,
    teacher: nn.Module,
    loader: Iterable[Batch],
    *,
    steps: int,
    lr: float,
    temperature: float = 4.0,
    alpha: float = 0.9,
    weight_decay: float = 0.0,
    device: torch.device | str = "cpu",
    callback: Callable[[int, float], Any] | None = None,
    optimizer: str = "sgd",
    warmup_steps: int = 0,
) -> dict[str, Any]:
    """Fine-tune ``student`` for ``steps`` optimizer steps with knowledge distillation.

    The loss is :func:`kd_loss`. The teacher runs in eval mode without gradients and is not
    modified (its mode is restored afterwards); the loader is cycled as needed.

    Args:
        student: the model to fine-tune (moved to ``device``, trained in place).
        teacher: the reference model (moved to ``device``).
        loader: training batches ``(inputs, targets)``.
        steps: number of optimizer steps (0 does nothing).
        lr: peak learning rate, decayed to 0 by a per-step cosine schedule.
        temperature: softmax temperature T.
        alpha: weight of the distillation term; ``1 - alpha`` weighs cross-entropy.
        weight_decay: L2 penalty.
        device: where to train.
        callback: ``callback(step, loss)`` after every step (``step`` counts from 1); it may
            raise (e.g. ``optuna.TrialPruned``) to stop early; the exception propagates.
        optimizer: ``"sgd"`` (momentum 0.9, Nesterov) or ``"adam"`` (AdamW).
        warmup_steps: linear learning-rate warm-up length.

    Returns:
        ``{"steps": steps done, "final_loss": mean loss of the last 10% of the steps
        (at least one), "seconds": wall time}``. The student is left in eval mode.

    Raises:
        FloatingPointError: the loss became NaN or infinite.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    start = time.perf_counter()
    teacher_was_training = teacher.training
    teacher.to(device).eval()
    student.to(device).train()
    params = [p for p in student.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = _sgd(params, lr, weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(steps, warmup_steps))
    recent: deque[float] = deque(maxlen=max(1, steps // 10))
    try:
        for step, batch in zip(range(1, steps + 1), _cycle(loader), strict=False):
            inputs, targets = _to(batch, device)
            with torch.no_grad():
                teacher_logits = teacher(inputs)
            loss = kd_loss(
                student(inputs), teacher_logits, targets, temperature=temperature, alpha=alpha
            )
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"distillation loss became {value} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            scheduler.step()
            recent.append(value)
            if callback is not None:
                callback(step, value)
    finally:
        teacher.train(teacher_was_training)
        student.eval()
    final = sum(recent) / len(recent) if recent else float("nan")
    return {"steps": steps, "final_loss": final, "seconds": time.perf_counter() - start}
