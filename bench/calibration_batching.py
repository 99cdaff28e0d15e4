"""Ladder scoring units against the calibration images one forward holds.

``Calibration.network_errors`` scores every layer of a unit by a forward of the baseline
with only that layer replaced; it batches ``images_per_forward`` images (the calibration
batch once per layer) into one forward. This times the ladder units of one method (every
grid ratio) through ``unit_options`` at each size, in turns, on the bench study of
``bench/scale.py`` (its baseline trained into ``--workdir`` if missing)::

    python bench/calibration_batching.py                      # resnet20, tucker, 2 threads
    python bench/calibration_batching.py --model resnet18 --sizes 64 512
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import study_yaml

from autodecomp.config.load import load_config
from autodecomp.search.options import grid_ratios, scoring_context, unit_options
from autodecomp.search.study import prepare_baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--method", default="tucker")
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 128, 256, 512, 1152])
    parser.add_argument("--repeats", type=int, default=2, help="turns over the sizes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10, help="baseline training epochs")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/autodecomp-scale"))
    args = parser.parse_args()
    args.steps, args.device = 100, "cpu"  # what study_yaml reads besides the above
    torch.set_num_threads(args.threads)
    cfg = load_config(study_yaml(args.model, (args.workdir / args.model).resolve(), args))
    prepared, baseline = prepare_baseline(cfg, may_train=True)
    context = scoring_context(cfg, prepared.space, baseline, prepared.splits)
    ratios = grid_ratios(prepared.space, cfg.initial_design.grid)
    units = range(len(ratios))
    for index in units:  # fill the factor cache: only the scoring is timed
        unit_options(context, args.method, ratios, index)
    seconds: dict[int, list[float]] = {size: [] for size in args.sizes}
    for _ in range(args.repeats):
        for size in args.sizes:
            context.calibration.images_per_forward = size
            start = time.perf_counter()
            for index in units:
                unit_options(context, args.method, ratios, index)
            seconds[size].append(time.perf_counter() - start)
    print(
        f"{args.model}, {args.method} units at {len(ratios)} grid ratios, "
        f"calibration batch {len(context.calibration.inputs)}, {args.threads} threads"
    )
    print("| images per forward | seconds (each turn) | best |")
    print("|---|---|---|")
    for size, times in seconds.items():
        print(f"| {size} | {' / '.join(f'{t:.2f}' for t in times)} | {min(times):.2f} |")


if __name__ == "__main__":
    main()
