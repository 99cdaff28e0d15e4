"""Reproducible runs: deterministic kernels, a fixed thread count, and the record of both.

On the CPU a trained network depends on the number of intra-op threads (reductions are
split into as many partial sums as there are threads), so :func:`configure_runtime` fixes
it in deterministic mode: ``threads`` when given, else :data:`DETERMINISTIC_THREADS`,
whatever the machine has. It also turns on ``torch.use_deterministic_algorithms`` (on CUDA
with ``CUBLAS_WORKSPACE_CONFIG`` set and cuDNN's autotuner off; an operation without a
deterministic CUDA kernel warns instead of failing the study). :func:`environment` is what
a study records at its creation, so that a result can be checked elsewhere against it.
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from ..core.version import __version__

__all__ = ["DETERMINISTIC_THREADS", "LIBRARIES", "configure_runtime", "environment"]

DETERMINISTIC_THREADS = 1  # CPU intra-op threads in deterministic mode when none are set
LIBRARIES = ("torch", "numpy", "optuna", "scikit-learn", "tensorly", "fvcore", "torchvision")
_CUBLAS = ":4096:8"  # the workspace setting cuBLAS needs for deterministic results


def configure_runtime(*, deterministic: bool, threads: int | None, device: str) -> int:
    """Set torch's determinism and intra-op thread count for a run; returns the thread count.

    Args:
        deterministic: deterministic kernels and (when ``threads`` is ``None``)
            :data:`DETERMINISTIC_THREADS` threads; ``False`` leaves torch's defaults, except
            ``threads`` when given.
        threads: intra-op threads (``None``: see ``deterministic``).
        device: the run's device (``cuda...`` also configures cuBLAS / cuDNN).
    """
    if threads is None and deterministic:
        threads = DETERMINISTIC_THREADS
    if threads is not None:
        torch.set_num_threads(threads)
    cuda = device.startswith("cuda")
    if deterministic and cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", _CUBLAS)
    torch.use_deterministic_algorithms(deterministic, warn_only=cuda)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False if deterministic else torch.backends.cudnn.benchmark
    return torch.get_num_threads()


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment(device: str) -> dict[str, Any]:
    """Where a run happens: versions, platform, device (and GPU), threads, determinism."""
    found = {name: _version(name) for name in LIBRARIES}
    out: dict[str, Any] = {
        "versions": {
            "autodecomp": __version__,
            "python": platform.python_version(),
            **{k: v for k, v in found.items() if v is not None},
            "torch": str(torch.__version__),
        },
        "platform": platform.platform(),
        "machine": platform.machine(),
        "device": device,
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        out["gpu"] = torch.cuda.get_device_name(index)
        out["cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version()
    return out
