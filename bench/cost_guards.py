"""Cost guards: MACs of TT / GKPD / SeKron layers relative to the dense conv, and the factor
cache on a whole-network rebuild.

For every conv of ResNet-20 (seeded random init, 32x32 input) and each method, build the
layer at each ``--ratios`` value with ``ad.decompose_conv`` and print the decomposed layers'
MACs over the dense layers' MACs (all layers, and the worst one) and the same for the
uniform plan the search space offers at that ratio (``max_layer_macs`` 1.0: ratios capped
at each layer's MAC ceiling); then build every layer of the network twice at
``--rebuild-ratio`` on the default cache (cleared first) and print the time and the cache
misses of each build (GKPD and SeKron also with the weight's structure choice, below).
With ``--weights`` (a ResNet-20 state dict, e.g. the one ``bench/trained.py`` caches) it
also compares, for GKPD and SeKron, the relative kernel error (all layers) and the MACs
of the ratio's weight-free structure with those of the structure the weight picks within
the same parameters (``{..., "max_params": N}``):

    python bench/cost_guards.py --ratios 0.5 0.25 0.245 0.215 0.1 --threads 1 \
        --weights bench/results/trained/resnet20-digits32.pt
"""

from __future__ import annotations

import argparse
import math
import time

import optuna
import torch

import autodecomp as ad
from autodecomp.compress.surgery import skeleton
from autodecomp.config import parse_space
from autodecomp.factorize import default_cache
from autodecomp.measure.plan_cost import PlanCost
from autodecomp.search.space import resolve_space, suggest_plan, uniform_params

METHODS = ("tt", "gkpd", "sekron")


SHAPE = (3, 32, 32)


def _layers(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Conv2d, int, int]]:
    """Each decomposable conv with the height and width of its input."""
    cost = PlanCost(model, SHAPE, ad.conv_layers(model))
    return {name: (model.get_submodule(name), *cost.shapes[name][1:]) for name in cost.shapes}


def _space_ratios(model: torch.nn.Module, method: str, ratio: float) -> tuple[float, float]:
    """(MACs ratio, worst layer's MACs ratio) of the space's uniform ``method`` plan."""
    space = resolve_space(model, parse_space({"methods": [method], "ratio": [0.01, 1.0]}), SHAPE)
    plan = suggest_plan(optuna.trial.FixedTrial(uniform_params(space, method, ratio)), space)
    plan = {name: entry for name, entry in plan.items() if entry["method"] != "keep"}
    cost = PlanCost(model, SHAPE, list(plan))
    _, _, records = cost(skeleton(model, plan), plan)
    dense = {name: cost.dense_macs(name) for name in plan}
    total = sum(r["macs"] for r in records.values()) / sum(dense.values())
    return total, max(records[n]["macs"] / dense[n] for n in plan)


def _mac_ratios(layers, method: str, ratio: float) -> tuple[float, float, float]:
    """(network MACs ratio, worst layer's MACs ratio, network params ratio) over the layers
    that support ``method``."""
    dense = decomposed = dense_p = params = 0
    worst = 0.0
    for conv, h, w in layers.values():
        try:
            layer = ad.decompose_conv(conv, method, ratio=ratio)
        except ValueError:
            continue
        d = layer.spec.dense_macs(h, w)
        m = layer.macs(h, w)
        dense += d
        decomposed += m
        worst = max(worst, m / d)
        dense_p += conv.weight.numel()
        params += layer.params()
    return decomposed / dense, worst, params / dense_p


def _structure_choice(layers, method: str, ratio: float) -> tuple[float, float, float, float]:
    """(kernel error, MACs ratio) of the weight-free rank, then of the weight's choice."""
    cls = ad.get_method(method)
    errors, macs, total, dense = [0.0, 0.0], [0, 0], 0.0, 0
    for conv, h, w in layers.values():
        spec = ad.ConvSpec.from_conv(conv)
        if cls.unsupported_reason(spec) is not None:
            continue
        rank = cls.rank_for_ratio(spec, ratio)
        chosen = {**rank, "max_params": math.floor(ratio * spec.dense_params())}
        weight = conv.weight.detach()
        for i, layer in enumerate((cls.resolve_rank(spec, rank=rank), chosen)):
            fitted = ad.decompose_conv(conv, method, rank=layer)
            errors[i] += float((fitted.dense_weight().detach() - weight).norm() ** 2)
            macs[i] += fitted.macs(h, w)
        total += float(weight.norm() ** 2)
        dense += spec.dense_macs(h, w)
    return (*(math.sqrt(e / total) for e in errors), *(m / dense for m in macs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.245, 0.215])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--rebuild-ratio", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weights", help="a ResNet-20 state dict to load (trained kernels)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ad.get_model("resnet20").eval()
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    layers = _layers(model)
    print(
        "| method | ratio | MACs / dense | worst layer | params / dense "
        "| space: MACs / dense | space: worst layer |"
    )
    print("|---|---|---|---|---|---|---|")
    for method in args.methods:
        for ratio in args.ratios:
            macs, worst, params = _mac_ratios(layers, method, ratio)
            capped, capped_worst = _space_ratios(model, method, ratio)
            print(
                f"| {method} | {ratio:g} | {macs:.3f} | {worst:.3f} | {params:.3f} "
                f"| {capped:.3f} | {capped_worst:.3f} |"
            )
    if args.weights:
        print()
        print(
            "| method | ratio | error: ratio's structure | error: weight's choice "
            "| MACs / dense: ratio's | MACs / dense: weight's |"
        )
        print("|---|---|---|---|---|---|")
        for method in [m for m in args.methods if m in ("gkpd", "sekron")]:
            for ratio in args.ratios:
                row = _structure_choice(layers, method, ratio)
                print(f"| {method} | {ratio:g} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    print()
    print("| method | build | seconds | cache misses |")
    print("|---|---|---|---|")
    ratio = args.rebuild_ratio
    builds = [(m, False) for m in args.methods] + [
        (m, True) for m in args.methods if m in ("gkpd", "sekron")
    ]
    for method, weight_choice in builds:
        default_cache.clear()
        label = f"{method} (max_params)" if weight_choice else method
        for build in ("first", "second"):
            misses = default_cache.misses
            start = time.perf_counter()
            for conv, _, _ in layers.values():
                try:
                    _rebuild(conv, method, ratio, weight_choice)
                except ValueError:
                    continue
            seconds = time.perf_counter() - start
            print(f"| {label} | {build} | {seconds:.2f} | {default_cache.misses - misses} |")


def _rebuild(conv: torch.nn.Conv2d, method: str, ratio: float, weight_choice: bool) -> None:
    """``conv`` decomposed at ``ratio``; ``weight_choice``: the weight picks the structure."""
    if not weight_choice:
        ad.decompose_conv(conv, method, ratio=ratio)
        return
    spec = ad.ConvSpec.from_conv(conv)
    rank = ad.get_method(method).rank_for_ratio(spec, ratio)
    budget = math.floor(ratio * spec.dense_params())
    ad.decompose_conv(conv, method, rank={**rank, "max_params": budget})


if __name__ == "__main__":
    main()
