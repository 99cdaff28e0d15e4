"""Measured inference latency of a (compressed) model, cached per model structure.

Real decomposed layers are often slower than their MAC count suggests (several small
kernels instead of one large one), so the search can use measured latency as an objective
(``objectives: [accuracy, macs, latency]``) or a budget (``budgets.max_latency_ms``).

:func:`measure_latency` runs ``warmup`` forward passes, then times ``repeats`` of them (in
``torch.inference_mode``, eval mode, on a fixed random batch; CUDA work is synchronised
before each clock read; CPU timings use a fixed number of intra-op threads) and returns the
median in milliseconds. :class:`LatencyMeter` measures each model structure (the method and
final rank of every searched layer) once on the CPU and, when the study runs on a GPU, on
that GPU too; later trials with the same structure reuse the figures, and previous trials
of a resumed study seed the cache from their ``latency_ms`` attribute.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["LatencyMeter", "measure_latency", "structure_key"]

Measure = Callable[..., float]


class LatencySettings(Protocol):
    """How to time a model (the study's ``latency`` section satisfies it)."""

    batch_size: int
    warmup: int
    repeats: int
    threads: int
    device: str


@contextmanager
def _threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    batch_size: int = 1,
    warmup: int = 5,
    repeats: int = 20,
    device: str = "cpu",
    threads: int = 1,
) -> float:
    """Median milliseconds of one forward pass of a ``batch_size`` batch on ``device``.

    The model is used as it is when it already lives on ``device``, otherwise a copy is
    moved there; its train / eval mode is restored.
    """
    target = torch.device(device)
    param = next(model.parameters(), None)
    if param is not None and param.device != target:
        model = copy.deepcopy(model).to(target)
    dtype = param.dtype if param is not None else torch.float32
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn((batch_size, *input_shape), generator=generator).to(target, dtype)
    cuda = target.type == "cuda"
    times = []
    was_training = model.training
    model.eval()
    try:
        with _threads(threads), torch.inference_mode():
            for _ in range(warmup):
                model(inputs)
            for _ in range(repeats):
                if cuda:
                    torch.cuda.synchronize(target)
                start = time.perf_counter()
                model(inputs)
                if cuda:
                    torch.cuda.synchronize(target)
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return statistics.median(times) * 1e3


def structure_key(layers: Mapping[str, Mapping[str, Any]]) -> str:
    """A model's structure: method and final rank per searched layer, as sorted JSON."""
    return json.dumps(
        {name: [rec["method"], rec.get("rank")] for name, rec in layers.items()}, sort_keys=True
    )


class LatencyMeter:
    """Latency per structure on the CPU and, for a study on a GPU, on that GPU.

    Args:
        cfg: the ``latency`` section of the study.
        input_shape: ``(C, H, W)`` of one input.
        study_device: the study's device; a CUDA device is measured besides the CPU.
        measure: the timing function (:func:`measure_latency`; tests pass a fake).
    """

    def __init__(
        self,
        cfg: LatencySettings,
        input_shape: tuple[int, ...],
        study_device: str,
        measure: Measure = measure_latency,
    ) -> None:
        self.cfg, self.input_shape, self.measure = cfg, tuple(input_shape), measure
        self.devices = {"cpu": "cpu"}
        if study_device.startswith("cuda"):
            self.devices["cuda"] = study_device
        self._cache: dict[str, dict[str, float]] = {}
        self.measurements = 0

    def __call__(self, model: nn.Module, key: str) -> dict[str, float]:
        """``{"cpu": ms[, "cuda": ms]}`` of ``model``, measured unless ``key`` is cached."""
        if key not in self._cache:
            c = self.cfg
            self._cache[key] = {
                kind: round(
                    self.measure(
                        model,
                        self.input_shape,
                        batch_size=c.batch_size,
                        warmup=c.warmup,
                        repeats=c.repeats,
                        device=device,
                        threads=c.threads,
                    ),
                    6,
                )
                for kind, device in self.devices.items()
            }
            self.measurements += 1
        return dict(self._cache[key])

    def remember(self, key: str, values: Mapping[str, float]) -> None:
        """Seed the cache (e.g. from a stored trial) unless it already holds ``key``."""
        if set(self.devices) <= set(values):
            self._cache.setdefault(key, {k: float(values[k]) for k in self.devices})

    def value(self, values: Mapping[str, float]) -> float:
        """The figure the objective and the budget use: on ``cfg.device``."""
        return values[self.cfg.device]
