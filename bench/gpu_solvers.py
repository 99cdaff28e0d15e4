"""Solvers on the GPU against the CPU: the same cold ``decompose_conv`` of a few ResNet
kernels on both devices, time and relative kernel error per (layer, method).

Each fit gets a fresh factor cache; the GPU is warmed up first (CUDA context, cuBLAS and
cuSOLVER handles) on a small conv, and synchronised around every timed fit. The layer must
come out on the device it was given (parameters and dtype), else the run fails. Kernels are
those of untrained ResNet-20 and torchvision ResNet-18 (seeded Kaiming init: a flat spectrum,
the slowest case for the ALS solvers)::

    python bench/gpu_solvers.py                        # cuda against cpu
    python bench/gpu_solvers.py --device cpu --layers resnet20:layer1.1.conv1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch import nn

import autodecomp as ad
from autodecomp.factorize.cache import FactorCache

LAYERS = [
    "resnet20:layer1.1.conv1",
    "resnet20:layer3.1.conv1",
    "resnet18:layer2.1.conv1",
    "resnet18:layer4.1.conv1",
]
METHODS = ["cp", "pdp", "tucker", "tt"]


def _kernel(spec: str) -> nn.Conv2d:
    model_name, layer = spec.split(":")
    torch.manual_seed(0)
    return ad.get_model(model_name, num_classes=10, in_channels=3).get_submodule(layer)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit(conv: nn.Conv2d, method: str, ratio: float) -> tuple[float, float, object]:
    """``(seconds, relative kernel error, rank)`` of a cold decomposition of ``conv``."""
    device = conv.weight.device
    _sync(device)
    start = time.perf_counter()
    layer = ad.decompose_conv(conv, method, ratio=ratio, cache=FactorCache())
    _sync(device)
    seconds = time.perf_counter() - start
    where = {t.device for t in [*layer.parameters(), *layer.buffers()]}
    if where != {device} or {p.dtype for p in layer.parameters()} != {conv.weight.dtype}:
        raise SystemExit(f"{method}: layer on {where}, expected {device} ({conv.weight.dtype})")
    with torch.no_grad():
        error = float((layer.dense_weight() - conv.weight).norm() / conv.weight.norm())
    return seconds, error, layer.rank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="the device compared with the CPU")
    parser.add_argument("--layers", nargs="+", default=LAYERS, help="model:layer")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=2, help="fits per device, fastest kept")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warm = nn.Conv2d(8, 8, 3).to(device)
    for method in args.methods:
        fit(warm, method, 0.5)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"cold decompose_conv at ratio {args.ratio}, fastest of {args.repeats}: "
          f"cpu ({torch.get_num_threads()} threads) vs {device} ({name})")  # fmt: skip
    header = f"{'layer':<26}{'method':<8}{'cpu s':>9}{'dev s':>9}{'speedup':>9}"
    print(header + f"{'cpu err':>10}{'dev err':>10}  rank")
    speedups: dict[str, list[float]] = {m: [] for m in args.methods}
    for spec in args.layers:
        conv = _kernel(spec)
        on_device = _kernel(spec).to(device)
        for method in args.methods:
            cpu = min(fit(conv, method, args.ratio) for _ in range(args.repeats))
            dev = min(fit(on_device, method, args.ratio) for _ in range(args.repeats))
            speedups[method].append(cpu[0] / dev[0])
            rank = json.dumps(cpu[2], separators=(",", ":"))
            print(f"{spec:<26}{method:<8}{cpu[0]:>9.3f}{dev[0]:>9.3f}{cpu[0] / dev[0]:>8.2f}x"
                  f"{cpu[1]:>10.4f}{dev[1]:>10.4f}  {rank}")  # fmt: skip
    for method, values in speedups.items():
        mean = math.exp(sum(map(math.log, values)) / len(values))
        print(f"{method}: geometric-mean speedup {mean:.2f}x over {len(values)} layers")


if __name__ == "__main__":
    main()
