"""Kronecker methods (GKPD, SeKron) against the other decompositions at one parameter ratio.

For every conv of torchvision's resnet18 (num_classes=10, seeded random init, CIFAR 32x32
input), decompose with each method at the same parameter ratio and measure the relative
kernel error, the relative output error on seeded random-normal activations of the layer's
input shape, the cold-cache init time, the MACs / params of the layer relative to the dense
conv, and the CPU latency of the layer vs the dense conv (median of repeats):

    python bench/kronecker.py --ratio 0.2 --batch 32 --repeats 7 --threads 1

Methods default to gkpd, sekron, tucker and whichever of cp, tt, tr are registered. With
``--train-epochs N`` the network is first trained on the shipped 8x8 digits (upsampled to
32x32 RGB) and the activations are the real inputs of each conv on a test batch.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
import torchvision
from torch import nn

import autodecomp as ad
from autodecomp.decompositions import ConvSpec, get_method
from autodecomp.factorize import default_cache

BASELINES = ("tucker", "cp", "tt", "tr")


def _conv_inputs(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every conv when ``model`` runs on ``images``."""
    inputs: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, args, output) -> None:
            inputs[name] = args[0].detach()

        return hook

    hooks = [
        module.register_forward_hook(record(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d)
    ]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return inputs


def _trained(model: nn.Module, epochs: int, batch: int, seed: int) -> torch.Tensor:
    """Train ``model`` on digits; return a test batch of images."""
    from autodecomp.workload.data import load_data, make_loader
    from autodecomp.workload.train import evaluate, train_baseline

    data = load_data("digits", image_size=32, channels=3, seed=seed)
    loader = make_loader(data.train, batch_size=128, shuffle=True, seed=seed)
    train_baseline(model, loader, epochs=epochs, lr=0.05)
    test = make_loader(data.test, batch_size=batch, shuffle=False)
    print(f"digits test accuracy: {evaluate(model.eval(), test)}")
    return next(iter(test))[0]


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def bench_layer(conv: nn.Conv2d, method: str, ratio: float, x: torch.Tensor, repeats: int):
    spec = ConvSpec.from_conv(conv)
    if get_method(method).unsupported_reason(spec) is not None:
        return None
    default_cache.clear()
    start = time.perf_counter()
    layer = ad.decompose_conv(conv, method, ratio=ratio).eval()
    init_s = time.perf_counter() - start
    h, w = x.shape[-2:]
    with torch.no_grad():
        dense_out = conv(x)
        return {
            "kernel_err": _rel(layer.dense_weight(), conv.weight),
            "output_err": _rel(layer(x), dense_out),
            "init_s": init_s,
            "params": layer.params() / spec.dense_params(),
            "macs": layer.macs(h, w) / spec.dense_macs(h, w),
            "ms": _median_ms(lambda: layer(x), repeats),
            "rank": layer.rank,
        }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the package's progress lines
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-epochs", type=int, default=0, help="train on digits first")
    parser.add_argument("--per-layer", action="store_true", help="print every layer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods or [m for m in ("gkpd", "sekron", *BASELINES) if m in ad.methods()]
    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18(num_classes=10)
    if args.train_epochs > 0:
        inputs = _conv_inputs(model, _trained(model, args.train_epochs, args.batch, args.seed))
        weights = f"trained {args.train_epochs} epochs on digits, real activations"
    else:
        shapes = {
            k: v.shape[1:] for k, v in _conv_inputs(model.eval(), torch.zeros(1, 3, 32, 32)).items()
        }
        gen = torch.Generator().manual_seed(args.seed)
        inputs = {k: torch.randn(args.batch, *v, generator=gen) for k, v in shapes.items()}
        weights = "random init, random-normal activations"
    model.eval()
    print(
        f"resnet18 ({weights}, seed {args.seed}), CIFAR 32x32, ratio={args.ratio}, "
        f"batch={args.batch}, threads={args.threads}, repeats={args.repeats}"
    )
    rows: dict[str, list[dict]] = {m: [] for m in methods}
    for name in ad.conv_layers(model):
        conv = model.get_submodule(name)
        x = inputs[name]
        with torch.no_grad():
            dense = _median_ms(lambda conv=conv, x=x: conv(x), args.repeats)
        for method in methods:
            row = bench_layer(conv, method, args.ratio, x, args.repeats)
            if row is None:
                continue
            row.update(layer=name, dense_ms=dense)
            rows[method].append(row)
            if args.per_layer:
                print(
                    f"{name:<22} {method:<7} kern {row['kernel_err']:.4f} out "
                    f"{row['output_err']:.4f} params {row['params']:.3f} macs {row['macs']:6.2f} "
                    f"init {row['init_s']:6.2f}s {row['ms']:8.2f}ms (dense {dense:7.2f}ms) "
                    f"{row['rank']}",
                    flush=True,
                )
    header = (
        "| method | layers | kernel err | output err | params/dense | MACs/dense | init s "
        "| latency ms | dense ms | latency/dense |"
    )
    print("\n" + header)
    print("|" + "---|" * (header.count("|") - 1))
    for method in methods:
        r = rows[method]
        if not r:
            continue
        ms, dms = sum(x["ms"] for x in r), sum(x["dense_ms"] for x in r)
        print(
            f"| {method} | {len(r)} | {statistics.mean(x['kernel_err'] for x in r):.4f} "
            f"| {statistics.mean(x['output_err'] for x in r):.4f} "
            f"| {statistics.mean(x['params'] for x in r):.3f} "
            f"| {statistics.mean(x['macs'] for x in r):.2f} | {sum(x['init_s'] for x in r):.1f} "
            f"| {ms:.1f} | {dms:.1f} | {ms / dms:.2f} |"
        )
    print(
        "\nerrors, params/dense and MACs/dense are means over the layers a method supports; "
        "init s, latency ms and dense ms are sums over them (latency: median of repeats, "
        "on a batch of each conv's inputs)."
    )


if __name__ == "__main__":
    main()
