"""Warm starts: a trial-like sequence of CP / PDP / TR fits (many ranks per layer) warm vs cold.

For each layer of the trained models (``bench/trained.py``) and each method, ``--ranks``
ratios drawn log-uniformly from [``--low``, ``--high``] (seeded, as a search samples them)
are decomposed in turn through ``ad.decompose_conv`` (CP / PDP at search precision), one
fresh factor cache per sequence, interleaved, the fastest of ``--repeats``: ``warm=True``
(each rank warm-started from its anchor rank's fit, anchors fitted cold when first needed;
the default of CP and PDP, an option of TR) and ``warm=False`` (every rank cold). Prints the
total time of each sequence and the ratio of the kernel errors warm / cold (geometric mean
and worst)::

    python bench/cp_warm.py --markdown
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from solver_precision import table
from trained import trained_model

import autodecomp as ad
from autodecomp.factorize.cache import FactorCache

LAYERS = [
    "resnet20:layer2.1.conv2",
    "resnet20:layer3.1.conv1",
    "resnet18:layer2.1.conv1",
    "resnet18:layer3.0.conv2",
]


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", nargs="+", default=LAYERS, help="model:layer")
    parser.add_argument("--methods", nargs="+", default=["cp", "pdp", "tr"])
    parser.add_argument("--ranks", type=int, default=30, help="ratios per layer")
    parser.add_argument("--low", type=float, default=0.05)
    parser.add_argument("--high", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each")
    parser.add_argument("--markdown", action="store_true")
    return parser.parse_args()


def sequence(conv, method: str, ratios: list[float], warm: bool) -> tuple[float, list[float]]:
    cache = FactorCache()
    errors = []
    start = time.perf_counter()
    for ratio in ratios:
        layer = ad.decompose_conv(conv, method, ratio=ratio, warm=warm, cache=cache)
        with torch.no_grad():
            errors.append(float((layer.dense_weight() - conv.weight).norm() / conv.weight.norm()))
    return time.perf_counter() - start, errors


def main() -> None:
    args = _args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    models = {}
    columns = ["layer", "method", "ranks", "cold [s]", "warm [s]", "speed-up"]
    columns += ["err warm/cold (geo. mean)", "worst"]
    rows, speedups, ratios_all = [], [], []
    for item in args.layers:
        model_name, name = item.split(":")
        if model_name not in models:
            models[model_name] = dict(trained_model(model_name).named_modules())
        conv = models[model_name][name]
        for method in args.methods:
            log_lo, log_hi = math.log(args.low), math.log(args.high)
            ratios = [math.exp(rng.uniform(log_lo, log_hi)) for _ in range(args.ranks)]
            sequence(conv, method, ratios[:1], warm=False)  # warm-up: first calls, allocator
            warm_s = cold_s = math.inf
            for _ in range(args.repeats):  # interleaved; the fastest of each
                seconds, warm_err = sequence(conv, method, ratios, warm=True)
                warm_s = min(warm_s, seconds)
                seconds, cold_err = sequence(conv, method, ratios, warm=False)
                cold_s = min(cold_s, seconds)
            quotients = [w / c for w, c in zip(warm_err, cold_err, strict=True)]
            geo = math.exp(sum(map(math.log, quotients)) / len(quotients))
            speedups.append(cold_s / warm_s)
            ratios_all += quotients
            speed = f"{cold_s / warm_s:.2f}x"
            rows.append([item, method, str(len(ratios)), f"{cold_s:.2f}", f"{warm_s:.2f}",
                         speed, f"{geo:.4f}", f"{max(quotients):.4f}"])  # fmt: skip
    geo_speed = math.exp(sum(map(math.log, speedups)) / len(speedups))
    geo_err = math.exp(sum(map(math.log, ratios_all)) / len(ratios_all))
    rows.append(["geometric mean", "", "", "", "", f"{geo_speed:.2f}x", f"{geo_err:.4f}",
                 f"{max(ratios_all):.4f}"])  # fmt: skip
    table(columns, rows, args.markdown)


if __name__ == "__main__":
    main()
