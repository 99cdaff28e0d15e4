"""Data-aware vs weight-space initialisation: per-layer output error and network accuracy.

For a study's trained baseline (reused from the study cache, else trained once by its
recipe), every registered method is applied uniformly to all conv layers at one parameter
ratio, twice: factors fitted to the kernel (``init: weight``) and to the layer's output on
calibration images from the training split (``init: data``). Reported per method:

- ``out_err``: relative output error ``||conv_hat(x) - conv(x)|| / ||conv(x)||`` per layer
  on the validation images (held out from calibration), on the dense model's activations,
  from the exact formula ``tr(E Σ E^T)``; mean over layers;
- ``pre``: test accuracy after BatchNorm recalibration (the search's pre-fine-tune score);
- ``ft``: test accuracy after the same distillation fine-tune (the study's proxy settings,
  same seeds and batches for both inits), mean over ``--seeds`` fine-tunes;
- ``loss``: the distillation loss at the end of the fine-tune (mean of its last 10% steps);
- ``init_s``: seconds to build the compressed model (calibration statistics excluded).

    python bench/data_aware.py studies/digits/study.yaml --ratio 0.25 --seeds 3
    python bench/data_aware.py studies/resnet20_digits/study.yaml --ratio 0.25 --warmup-steps 20
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time

import torch

import autodecomp as ad
from autodecomp.compress.calibration import collect_input_stats
from autodecomp.config import load_config
from autodecomp.decompositions import ConvSpec, get_method
from autodecomp.factorize.input_stats import InputStats
from autodecomp.search.study import prepare_baseline
from autodecomp.workload import train
from autodecomp.workload.data import make_loader

INITS = ("weight", "data")


def _relative_output_error(model, base, name: str, stats: InputStats) -> float:
    dense = base.get_submodule(name).weight.detach().double()
    approx = model.get_submodule(name).dense_weight().detach().double()
    return (stats.output_error(approx - dense) / stats.output_error(dense)) ** 0.5


def run_method(method: str, ctx: dict, args: argparse.Namespace) -> dict | None:
    base, cfg = ctx["baseline"].model, ctx["cfg"]
    layers = [
        n
        for n in ctx["layers"]
        if get_method(method).unsupported_reason(ConvSpec.from_conv(base.get_submodule(n))) is None
    ]
    if not layers:
        return None
    row: dict = {"method": method, "layers": len(layers), "names": layers}
    p, device = cfg.proxy, cfg.device
    for init in INITS:
        extra = (
            {"damping": args.damping, "refine_steps": args.refine_steps} if init == "data" else {}
        )
        plan = {n: {"method": method, "ratio": args.ratio, "init": init, **extra} for n in layers}
        start = time.perf_counter()
        model = ad.apply_plan(base, plan, calibration=ctx["calibration"])
        row[f"init_s_{init}"] = time.perf_counter() - start
        errors = [_relative_output_error(model, base, n, ctx["held_out"][n]) for n in layers]
        row[f"out_err_{init}"] = statistics.mean(errors)
        row[f"per_layer_{init}"] = errors
        train.set_seed(cfg.seed)
        if p.bn_batches > 0:
            loader = make_loader(ctx["splits"].train, batch_size=p.batch_size, shuffle=True, seed=1)
            train.recalibrate_bn(model, loader, batches=p.bn_batches, device=device)
        row[f"pre_{init}"] = train.evaluate(model, ctx["test"], device=device)
        accuracies, losses = [], []
        for seed in range(args.seeds):
            student = copy.deepcopy(model)
            train.set_seed(cfg.seed + seed)
            loader = make_loader(
                ctx["splits"].train, batch_size=p.batch_size, shuffle=True, seed=2 + seed
            )
            result = train.distill(
                student,
                base,
                loader,
                steps=args.steps,
                lr=p.lr,
                temperature=p.temperature,
                alpha=p.alpha,
                weight_decay=p.weight_decay,
                device=device,
                warmup_steps=p.warmup if args.warmup_steps is None else args.warmup_steps,
            )
            losses.append(result["final_loss"])
            accuracies.append(train.evaluate(student, ctx["test"], device=device))
        row[f"ft_{init}"] = statistics.mean(accuracies)
        row[f"loss_{init}"] = statistics.mean(losses)
    return row


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the package's progress lines
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="study.yaml whose baseline, data and proxy are used")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--steps", type=int, default=None, help="distillation steps (proxy's)")
    parser.add_argument("--seeds", type=int, default=1, help="fine-tunes averaged per model")
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="distillation LR warm-up (the proxy's)"
    )
    parser.add_argument("--calib-batches", type=int, default=4, help="of --calib-batch images")
    parser.add_argument("--calib-batch", type=int, default=64)
    parser.add_argument("--damping", type=float, default=ad.decompositions.base.DATA_DAMPING)
    parser.add_argument("--refine-steps", type=int, default=ad.decompositions.base.REFINE_STEPS)
    parser.add_argument("--per-layer", action="store_true", help="print every layer's errors")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.study)
    args.steps = cfg.proxy.steps if args.steps is None else args.steps
    prepared, baseline = prepare_baseline(cfg)
    splits, model = prepared.splits, baseline.model
    layers = ad.conv_layers(model)
    start = time.perf_counter()
    calib = make_loader(splits.train, batch_size=args.calib_batch, shuffle=True, seed=0)
    calibration = collect_input_stats(model, layers, calib, max_batches=args.calib_batches)
    calib_s = time.perf_counter() - start
    val = make_loader(splits.val, batch_size=256, shuffle=False)
    ctx = {
        "cfg": cfg,
        "baseline": baseline,
        "splits": splits,
        "layers": layers,
        "calibration": calibration,
        "held_out": collect_input_stats(model, layers, val),
        "test": make_loader(splits.test, batch_size=256, shuffle=False),
    }
    dense_test = train.evaluate(model, ctx["test"], device=cfg.device)
    print(
        f"study={cfg.name} model={cfg.model.name} convs={len(layers)} ratio={args.ratio} "
        f"calibration={calibration[layers[0]].samples} images ({calib_s:.1f} s) "
        f"damping={args.damping:g} refine_steps={args.refine_steps} distill_steps={args.steps} "
        f"warmup_steps={cfg.proxy.warmup if args.warmup_steps is None else args.warmup_steps} "
        f"seeds={args.seeds} "
        f"dense test accuracy={dense_test:.4f}"
    )
    rows = []
    for method in args.methods or ad.methods():
        row = run_method(method, ctx, args)
        if row is None:
            continue
        rows.append(row)
        if args.per_layer:
            pairs = zip(row["names"], row["per_layer_weight"], row["per_layer_data"], strict=True)
            for name, w, d in pairs:
                print(f"  {method:<7} {name:<22} out_err weight {w:.4f} data {d:.4f}")
        print(f"done {method}", flush=True)
    header = ["method", "layers"] + [
        f"{k}_{i}" for k in ("out_err", "pre", "ft", "loss", "init_s") for i in INITS
    ]
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [f"{row[h]:.4f}" if isinstance(row[h], float) else str(row[h]) for h in header]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
