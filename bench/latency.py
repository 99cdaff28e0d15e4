"""Latency of decomposed conv layers against the dense conv they replace.

For every registered method (or ``--methods``), every parameter ratio and every batch size,
on the 3x3 convs of torchvision's resnet18 (one per stage, at their real input size for
``--image-size``) and of the CIFAR resnet20 (one per stage, 32x32 input), time the forward
of the decomposed layer and of the dense conv, interleaved round by round in one process
(``torch.inference_mode``, eval mode, one intra-op thread on the CPU, CUDA synchronised
around every timed call), and print per row:

- ``dense_ms`` / ``ms``: median latency of the dense conv / the decomposed layer;
- ``speedup``: ``dense_ms / ms``;
- ``mac_x``: the MAC reduction ``dense MACs / layer MACs`` (fvcore counts,
  ``autodecomp.measure.cost.count_macs``);
- ``realised``: ``speedup / mac_x``, the share of the MAC reduction that shows up as
  speed; rows below ``--target`` (default 0.6) are flagged ``*``.

A summary gives each method's median ``realised`` and how many rows reach the target.
Layers with more than ``--max-macs`` (default 4) times the dense MACs (tensor-train at
most ratios: its channel cores cost more than the dense conv) are listed but not timed.
Factors are random (timing does not depend on their values; GKPD / SeKron use their
default factor structure at each rank, where ``ratio`` on a real kernel may pick another).

    python bench/latency.py                      # defaults: about 3-5 minutes on one core
    python bench/latency.py --quick              # a smoke run: about 30 s
    python bench/latency.py --methods tucker pdp cp --ratios 0.25 --batch 32
    python bench/latency.py --models resnet20 --image-size 112 --repeats 15
    python bench/latency.py --device cuda        # when a GPU is present
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import autodecomp as ad
from autodecomp.decompositions import ConvSpec, get_method
from autodecomp.measure.cost import count_macs
from autodecomp.workload.models import get_model

# one non-strided 3x3 conv per stage
LAYERS = {
    "resnet18": ["layer1.1.conv1", "layer2.1.conv1", "layer3.1.conv1", "layer4.1.conv1"],
    "resnet20": ["layer1.1.conv1", "layer2.1.conv1", "layer3.1.conv1"],
}
NATIVE_SIZE = {"resnet20": 32}


@dataclass
class Row:
    model: str
    layer: str
    geometry: str
    method: str
    ratio: float
    batch: int
    dense_ms: float
    ms: float
    mac_x: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.ms

    @property
    def realised(self) -> float:
        return self.speedup / self.mac_x


def conv_inputs(model_name: str, image_size: int) -> list[tuple[str, nn.Conv2d, tuple[int, ...]]]:
    """``(name, conv, (C, H, W) of its input)`` for the benchmarked convs of a model."""
    torch.manual_seed(0)
    model = get_model(model_name, num_classes=10).eval()
    size = NATIVE_SIZE.get(model_name, image_size)
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, args, _out, name=name: shapes.__setitem__(name, tuple(args[0].shape[1:]))
        )
        for name in LAYERS[model_name]
    ]
    with torch.inference_mode():
        model(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return [(name, model.get_submodule(name), shapes[name]) for name in LAYERS[model_name]]


def build(conv: nn.Conv2d, method: str, ratio: float, rank_multiple: int = 1) -> nn.Module | None:
    """The method's layer at ``ratio`` (its channel ranks rounded down to ``rank_multiple``)
    with random factors, or ``None`` if unsupported."""
    cls = get_method(method)
    spec = ConvSpec.from_conv(conv)
    if cls.unsupported_reason(spec) is not None:
        return None
    rank = cls.rank_for_ratio(spec, ratio, rank_multiple)
    layer = cls.random(spec, rank, torch.Generator().manual_seed(0))
    with torch.no_grad():  # keep activations O(1) through long chains
        for param in layer.parameters():
            param.mul_(param.shape[0] ** -0.5 if param.dim() > 1 else 1.0)
    return layer.eval()


def time_interleaved(
    modules: list[nn.Module], x: torch.Tensor, warmup: int, repeats: int
) -> list[float]:
    """Median ms of each module; every round runs all modules once, so load hits all alike."""
    cuda = x.device.type == "cuda"
    times: list[list[float]] = [[] for _ in modules]
    with torch.inference_mode():
        for round_ in range(warmup + repeats):
            for k, module in enumerate(modules):
                if cuda:
                    torch.cuda.synchronize(x.device)
                start = time.perf_counter()
                module(x)
                if cuda:
                    torch.cuda.synchronize(x.device)
                if round_ >= warmup:
                    times[k].append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


def bench_layer(
    model: str,
    name: str,
    conv: nn.Conv2d,
    shape: tuple[int, ...],
    args: argparse.Namespace,
) -> list[Row]:
    device = torch.device(args.device)
    dense_macs = count_macs(conv, shape)
    spec = ConvSpec.from_conv(conv)
    geometry = f"{spec.in_channels}->{spec.out_channels} {shape[1]}x{shape[2]}"
    entries = []
    for method in args.methods:
        for ratio in args.ratios:
            ranks: list[Any] = []
            for multiple in args.rank_multiple:
                layer = build(conv, method, ratio, multiple)
                if layer is None or layer.rank in ranks:  # alignment changed nothing
                    continue
                ranks.append(layer.rank)
                label = method if multiple == 1 else f"{method}/{multiple}"
                mac_x = dense_macs / count_macs(layer, shape)
                if mac_x * args.max_macs < 1:
                    print(f"not timed: {model} {name} {label} ratio {ratio}: MACs {1 / mac_x:.1f}x")
                else:
                    entries.append((label, ratio, layer, mac_x))
    rows = []
    dense = conv.eval().to(device)
    for batch in args.batch:
        x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0)).to(device)
        layers = [entry[2].to(device) for entry in entries]
        ms = time_interleaved([dense, *layers], x, args.warmup, args.repeats)
        print(f"timed {model} {name} batch {batch}", file=sys.stderr, flush=True)
        for (method, ratio, _, mac_x), t in zip(entries, ms[1:], strict=True):
            rows.append(Row(model, name, geometry, method, ratio, batch, ms[0], t, mac_x))
    return rows


def print_rows(rows: list[Row], target: float) -> None:
    head = (
        f"{'model':9} {'layer':15} {'geometry':16} {'method':9} {'ratio':>5} {'batch':>5} "
        f"{'dense_ms':>9} {'ms':>9} {'speedup':>7} {'mac_x':>6} {'realised':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        flag = " *" if r.realised < target else ""
        print(
            f"{r.model:9} {r.layer:15} {r.geometry:16} {r.method:9} {r.ratio:5.2f} {r.batch:5d} "
            f"{r.dense_ms:9.3f} {r.ms:9.3f} {r.speedup:7.2f} {r.mac_x:6.2f} {r.realised:8.2f}"
            f"{flag}"
        )


def print_summary(rows: list[Row], target: float) -> None:
    print(f"\nsummary (realised = speed-up / MAC reduction; target >= {target})")
    print(f"{'method':9} {'rows':>4} {'median':>7} {'min':>6} {'max':>6} {'>=target':>9}")
    for method in dict.fromkeys(r.method for r in rows):
        values = [r.realised for r in rows if r.method == method]
        ok = sum(v >= target for v in values)
        print(
            f"{method:9} {len(values):4d} {statistics.median(values):7.2f} {min(values):6.2f} "
            f"{max(values):6.2f} {ok:5d}/{len(values):<3d}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=None, help="default: all registered")
    parser.add_argument("--models", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.25, 0.5])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--image-size", type=int, default=224, help="resnet18 input size")
    parser.add_argument(
        "--rank-multiple",
        nargs="+",
        type=int,
        default=[1],
        help="also time each layer with its channel ranks rounded down to these multiples "
        "(rows 'method/N'; space.rank_multiple in a study)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--target", type=float, default=0.6, help="flag rows below this")
    parser.add_argument(
        "--max-macs", type=float, default=4.0, help="time layers up to this many dense MACs"
    )
    parser.add_argument(
        "--quick", action="store_true", help="ratio 0.25, batch 1 and 8, 112px, 5 rounds"
    )
    args = parser.parse_args(argv)
    valid = ad.methods()
    args.methods = args.methods or valid
    unknown = sorted(set(args.methods) - set(valid))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid: {', '.join(valid)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda given but no CUDA device is available")
    if min(args.rank_multiple) < 1:
        parser.error(f"--rank-multiple must be >= 1, got {min(args.rank_multiple)}")
    if args.quick:
        args.ratios, args.batch, args.image_size = [0.25], [1, 8], 112
        args.warmup, args.repeats = 1, 5
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for model in args.models:
        for name, conv, shape in conv_inputs(model, args.image_size):
            rows += bench_layer(model, name, conv, shape, args)
    print(
        f"device={args.device} threads={args.threads} warmup={args.warmup} "
        f"repeats={args.repeats} resnet18 image={args.image_size}px, resnet20 32px"
    )
    print_rows(rows, args.target)
    print_summary(rows, args.target)


if __name__ == "__main__":
    main()
