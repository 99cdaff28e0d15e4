"""How precise must a CP / PDP fit be for the search? Error against solver time along ALS.

For a few layers of a ResNet-20 trained on the digits (``bench/trained.py``), each method at
``--ratio``: the CP-ALS trajectory (``cp_als``, no rescue, tolerance off, ``--cap`` sweeps)
and, for each stopping tolerance ``tol`` of ``cp_als``'s rule (stop once a sweep lowers the
relative error by less than ``tol`` times itself), the sweep it stops at, the time, the
kernel's relative error and the layer output's relative error (on the layer's inputs for
the validation images). tensorly's ``parafac`` at its defaults is the reference line.

``--proxy`` adds the accuracy after the proxy fine-tune (the resnet20 study's settings,
100 distillation steps) of the whole network with every 3x3 conv of stages 2-3 replaced at
``--ratio``, for each tolerance::

    python bench/solver_precision.py --markdown
    python bench/solver_precision.py --proxy --methods cp --markdown
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tensorly as tl
import torch
import torch.nn.functional as F
from tensorly.decomposition import parafac
from trained import digits, trained_model

import autodecomp as ad
from autodecomp.decompositions import ConvSpec, get_method
from autodecomp.factorize.cp_als import cp_als, cp_to_tensor
from autodecomp.workload.data import make_loader
from autodecomp.workload.proxy import proxy_finetune

warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
LAYERS = ["layer1.1.conv1", "layer2.1.conv2", "layer3.1.conv1", "layer3.2.conv2"]
TOLS = [3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5, 1e-6]


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", nargs="+", default=LAYERS)
    parser.add_argument("--methods", nargs="+", default=["cp", "pdp"], choices=["cp", "pdp"])
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--cap", type=int, default=500)
    parser.add_argument("--tols", nargs="+", type=float, default=TOLS)
    parser.add_argument("--proxy", action="store_true", help="add the proxy accuracy table")
    parser.add_argument("--markdown", action="store_true")
    return parser.parse_args()


def layer_inputs(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Each layer's input on the validation images."""
    val = digits().val
    images = torch.stack([val[i][0] for i in range(len(val))])
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [
        modules[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0]))
        for n in names
    ]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return seen


def kernel_tensor(method: str, weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach().to(torch.float64)
    return w if method == "cp" else w.reshape(w.shape[0], w.shape[1], -1)


def errors(conv, x, tensor, weights, factors) -> tuple[float, float]:
    recon = cp_to_tensor(weights, factors)
    kernel = float((recon - tensor).norm() / tensor.norm())
    w = recon.reshape(conv.weight.shape).to(x.dtype)
    with torch.no_grad():
        ref = conv(x)
    out = F.conv2d(x, w, conv.bias, conv.stride, conv.padding, conv.dilation)
    return kernel, float((out - ref).norm() / ref.norm())


def table(columns: list[str], rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    widths = [max(len(r[i]) for r in [columns, *rows]) for i in range(len(columns))]
    for r in [columns, *rows]:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def _trajectory(tensor: torch.Tensor, rank: int, cap: int) -> list[tuple[float, float]]:
    """(seconds, relative error) after each of ``cap`` sweeps (tolerance off, no rescue)."""
    trace: list[tuple[float, float]] = []
    start = time.perf_counter()

    def record(_sweep: int, error: float) -> None:
        trace.append((time.perf_counter() - start, error))

    cp_als(tensor, rank, max_iter=cap, tol=0.0, rescue=False, callback=record)
    return trace


def trajectories(args, model) -> None:
    inputs = layer_inputs(model, args.layers)
    modules = dict(model.named_modules())
    rows = []
    for name in args.layers:
        conv = modules[name]
        x = inputs[name]
        for method in args.methods:
            spec = ConvSpec.from_conv(conv)
            rank = get_method(method).rank_for_ratio(spec, args.ratio)
            tensor = kernel_tensor(method, conv.weight)
            with tl.backend_context("pytorch"):
                start = time.perf_counter()
                w, f = parafac(tensor / tensor.norm(), rank, init="svd")
                seconds = time.perf_counter() - start
            k, o = errors(conv, x, tensor, w * tensor.norm(), f)
            label = f"{name} {method} r{rank}"
            rows.append([label, "parafac defaults", "-", f"{seconds:.3f}", f"{k:.4f}", f"{o:.4f}"])
            trace = _trajectory(tensor, rank, args.cap)
            for tol in args.tols:
                stop = next(
                    (s for s in range(1, len(trace)) if trace[s - 1][1] - trace[s][1]
                     < tol * trace[s - 1][1]), len(trace) - 1)  # fmt: skip
                w, f, _ = cp_als(tensor, rank, max_iter=stop + 1, tol=0.0, rescue=False)
                k, o = errors(conv, x, tensor, w, f)
                cells = [label, f"tol {tol:g}", str(stop + 1), f"{trace[stop][0]:.3f}"]
                rows.append([*cells, f"{k:.4f}", f"{o:.4f}"])
    columns = ["layer, method, rank", "stop rule", "sweeps", "time [s]", "kernel err", "output err"]
    table(columns, rows, args.markdown)


def proxy_rows(args, model) -> None:
    class P:  # the resnet20_digits study's proxy settings
        steps, lr, batch_size, temperature, alpha = 100, 1e-3, 128, 4.0, 0.9
        weight_decay, bn_batches, warmup = 5e-4, 8, 0

    splits = digits()
    val = make_loader(splits.val, batch_size=256, shuffle=False)
    names = [n for n in ad.conv_layers(model) if n.startswith(("layer2", "layer3"))]
    names = [n for n in names if dict(model.named_modules())[n].kernel_size == (3, 3)]
    rows = []
    for method in args.methods:
        runs = [(tol, 0) for tol in args.tols] + [(0.0, 0), (0.0, 1)]
        for tol, number in runs:
            opts = {"tol": tol} if tol else {"tol": 0.0, "max_iter": args.cap}
            plan = {n: {"method": method, "ratio": args.ratio, **opts} for n in names}
            start = time.perf_counter()
            compressed = ad.apply_plan(model, plan)
            seconds = time.perf_counter() - start
            result = proxy_finetune(compressed, model, splits.train, val, P, seed=0, number=number)
            label = f"tol {tol:g}" if tol else f"{args.cap} sweeps"
            label += ", fine-tune seed +1" if number else ""
            rows.append([method, label, f"{seconds:.2f}", f"{result.pre_accuracy:.4f}",
                         f"{result.accuracy:.4f}"])  # fmt: skip
            print(" ".join(rows[-1]), file=sys.stderr, flush=True)  # progress
    columns = ["method", "stop rule", "fit time [s]", "acc. before", "acc. after proxy"]
    print(f"\n{len(names)} convs of stages 2-3 at ratio {args.ratio}, 100 proxy steps")
    table(columns, rows, args.markdown)


if __name__ == "__main__":
    torch.set_num_threads(1)
    ARGS = _args()
    net = trained_model("resnet20")
    trajectories(ARGS, net)
    if ARGS.proxy:
        proxy_rows(ARGS, net)
