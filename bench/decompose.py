"""Decomposition benchmark: init time, kernel error per ratio, warm-cache rank change.

For every registered method and every conv of a model (CIFAR input size), decompose at
several parameter ratios and print one table per method and a summary:

    python bench/decompose.py --model resnet18 --ratios 0.1 0.25 0.5
    python bench/decompose.py --model resnet20 --train-steps 300   # digits-trained weights

Timings are wall-clock on this machine; compare methods within one run only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import autodecomp as ad
from autodecomp.decompositions import ConvSpec, get_method
from autodecomp.factorize import default_cache


def _model(name: str, train_steps: int, seed: int) -> torch.nn.Module:
    from autodecomp.workload.models import get_model

    torch.manual_seed(seed)
    model = get_model(name, num_classes=10)
    if train_steps > 0:
        from autodecomp.workload.data import load_data, make_loader
        from autodecomp.workload.train import train_baseline

        data = load_data("digits", image_size=32, channels=3, seed=seed)
        loader = make_loader(data.train, batch_size=128, shuffle=True, seed=seed)
        epochs = max(1, round(train_steps / len(loader)))
        train_baseline(model, loader, epochs=epochs, lr=0.1)
    return model.eval()


def _rel_error(layer: ad.DecomposedConv, weight: torch.Tensor) -> float:
    with torch.no_grad():
        return float((layer.dense_weight() - weight).norm() / weight.norm())


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_method(model, method: str, ratios: list[float], max_params: int | None) -> list[dict]:
    rows = []
    for name in ad.conv_layers(model):
        conv = model.get_submodule(name)
        spec = ConvSpec.from_conv(conv)
        if get_method(method).unsupported_reason(spec) is not None:
            continue
        if max_params is not None and spec.dense_params() > max_params:
            continue
        default_cache.clear()
        row = {"layer": name, "shape": "x".join(map(str, spec.weight_shape))}
        for i, ratio in enumerate(ratios):
            layer, seconds = _timed(lambda c=conv, r=ratio: ad.decompose_conv(c, method, ratio=r))
            row[f"err@{ratio}"] = _rel_error(layer, conv.weight)
            if i == 0:
                row["init_s"] = seconds
            else:
                row.setdefault("warm_ms", []).append(seconds * 1e3)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.1, 0.25, 0.5])
    parser.add_argument("--train-steps", type=int, default=0, help="digits training steps first")
    parser.add_argument("--max-params", type=int, default=None, help="skip larger layers")
    parser.add_argument("--per-layer", action="store_true", help="print every layer")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = _model(args.model, args.train_steps, args.seed)
    print(
        f"model={args.model} train_steps={args.train_steps} threads={args.threads} "
        f"convs={len(ad.conv_layers(model))}"
    )
    summary = []
    for method in args.methods or ad.methods():
        rows = bench_method(model, method, args.ratios, args.max_params)
        if not rows:
            continue
        if args.per_layer:
            print(f"\n## {method}")
            for r in rows:
                errs = "  ".join(f"{r[f'err@{q}']:.4f}" for q in args.ratios)
                warm = statistics.median(r["warm_ms"]) if r.get("warm_ms") else float("nan")
                print(
                    f"{r['layer']:<24} {r['shape']:<16} init {r['init_s']:7.3f}s  {errs}  "
                    f"warm {warm:7.2f}ms"
                )
        warm_all = [w for r in rows for w in r.get("warm_ms", [])]
        summary.append(
            {
                "method": method,
                "layers": len(rows),
                "init_s_total": sum(r["init_s"] for r in rows),
                "init_s_max": max(r["init_s"] for r in rows),
                **{f"err@{q}": statistics.mean(r[f"err@{q}"] for r in rows) for q in args.ratios},
                "warm_ms_median": statistics.median(warm_all) if warm_all else float("nan"),
                "warm_ms_max": max(warm_all) if warm_all else float("nan"),
            }
        )
    header = ["method", "layers", "init_s_total", "init_s_max"]
    header += [f"err@{q}" for q in args.ratios] + ["warm_ms_median", "warm_ms_max"]
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in summary:
        cells = [f"{row[h]:.4f}" if isinstance(row[h], float) else str(row[h]) for h in header]
        print("| " + " | ".join(cells) + " |")
    print(
        "\nerr@q: mean relative kernel error ||W_hat - W|| / ||W|| over layers "
        "at parameter ratio q;"
    )
    print("warm_ms: time to re-decompose a layer at another ratio with the factor cache warm.")


if __name__ == "__main__":
    main()
