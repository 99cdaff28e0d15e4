"""CP solver benchmark: autodecomp's torch CP-ALS against tensorly's parafac on both backends.

For a few conv-layer shapes (CP rank from ``--ratio`` as the search picks it, or ``--rank``)
it runs:

* tensorly ``parafac`` on the numpy backend and on the pytorch backend (plain ALS, as
  ``solver="tensorly"`` runs it),
* autodecomp ``cp_als`` as plain ALS (no line search, no rescue: the same algorithm),
* autodecomp ``cp_als`` with its defaults (Bro's line search; the rescue of small problems),

each for at most ``--cap`` sweeps with the tolerance switched off, and records the relative
error after every sweep (tensorly's ``callback``, cp_als's ``callback``). Two comparisons
are read off those trajectories:

* **equal sweeps**: time and error after ``--sweeps`` sweeps;
* **equal error**: sweeps and time each solver needs to reach the worst error any solver
  has after ``--sweeps`` sweeps (all reach it), and the best one ("-": not within
  ``--cap`` sweeps). ALS is deterministic, so a run's first sweeps are the same whatever
  its cap.

Each solver starts from its own SVD initialisation: where the rank exceeds a mode's size
(the kh and kw modes) the extra columns are random, drawn differently by each.

The kernels are "trained-like": a seeded low-rank signal with decaying weights plus 10 %
noise (no trained weights can be downloaded here). Every solver gets the same thread count
(``--threads``, default 1). Defaults take about a minute on one core::

    python bench/cp_solver.py
    python bench/cp_solver.py --layers 64x64x3x3 128x128x3x3 --ratio 0.25 --sweeps 50 --cap 100
    python bench/cp_solver.py --layers 256x256x3x3 --rank 64 --sweeps 100 --cap 100
    python bench/cp_solver.py --markdown      # the tables of docs/tensorly.md
    python bench/cp_solver.py --methods --layers 32x32x3x3 64x64x3x3 --markdown

``--trained`` is the speed target of the search-precision solvers: on layers of a ResNet-20
and a torchvision ResNet-18 trained on the digits at 32x32 (``bench/trained.py``, cached
under ``bench/results/trained``), cold ``ad.decompose_conv(conv, "cp" | "pdp",
ratio=--ratio)`` at its defaults (a fresh factor cache each time) against tensorly's
``parafac`` at its defaults (pytorch backend, ``init="svd"``, ``n_iter_max=100``,
``tol=1e-8``) on the same kernel at the same rank, float64, interleaved, the fastest of
``--repeats``: time, relative kernel error, and their geometric means over the layers::

    python bench/cp_solver.py --trained --markdown

``--methods`` is the cross-check of every method: each layer (the same kernel in float32)
is decomposed at ``--ratio`` by ``solver="autodecomp"`` and ``solver="tensorly"`` with the
methods' default options and a fresh factor cache, and the kernel error and time printed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

TRAINED_LAYERS = [
    "resnet20:layer1.1.conv1",
    "resnet20:layer2.1.conv2",
    "resnet20:layer3.1.conv1",
    "resnet18:layer1.1.conv1",
    "resnet18:layer2.0.conv1",
    "resnet18:layer2.1.conv1",
]


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layers",
        nargs="+",
        default=["32x32x3x3", "64x64x3x3", "128x64x3x3", "128x128x3x3"],
        help="kernel shapes FxCxkhxkw",
    )
    parser.add_argument("--ratio", type=float, default=0.25, help="CP rank from this ratio")
    parser.add_argument("--rank", type=int, default=None, help="CP rank (instead of --ratio)")
    parser.add_argument("--sweeps", type=int, default=25, help="the equal-sweeps point")
    parser.add_argument("--cap", type=int, default=100, help="sweeps run by every solver")
    parser.add_argument("--seed", type=int, default=0, help="kernel seed")
    parser.add_argument("--threads", type=int, default=1, help="BLAS / torch threads for all")
    parser.add_argument(
        "--backends", nargs="+", default=["numpy", "pytorch"], choices=["numpy", "pytorch"]
    )
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    parser.add_argument(
        "--methods",
        action="store_true",
        help="instead: decompose the layers with every method by both solvers "
        "(ad.decompose_conv(..., solver=...)) and compare error and time",
    )
    parser.add_argument(
        "--trained",
        action="store_true",
        help="instead: cold ad.decompose_conv cp / pdp against tensorly parafac's defaults on "
        "trained ResNet-20 / ResNet-18 layers (see --trained-layers)",
    )
    parser.add_argument(
        "--trained-layers",
        nargs="+",
        default=TRAINED_LAYERS,
        help="model:layer of the trained models (bench/trained.py)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="--trained: interleaved runs")
    args = parser.parse_args()
    if args.sweeps > args.cap:
        parser.error("--sweeps must be <= --cap")
    return args


ARGS = _args()
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(ARGS.threads)  # before numpy / torch load their BLAS

import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import tensorly as tl  # noqa: E402
import torch  # noqa: E402
from tensorly.decomposition import parafac  # noqa: E402
from torch import nn  # noqa: E402

import autodecomp as ad  # noqa: E402
from autodecomp.decompositions import SOLVERS, ConvSpec, get_method  # noqa: E402
from autodecomp.factorize.cache import FactorCache  # noqa: E402
from autodecomp.factorize.cp_als import cp_als, cp_to_tensor  # noqa: E402

# tensorly's SVD init warns for every mode smaller than the rank (it pads with random columns)
warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")

Trajectory = list[tuple[float, float]]  # (seconds since start, relative error) per sweep


def trained_like(shape: tuple[int, ...], rank: int, seed: int) -> torch.Tensor:
    """A seeded rank-(4 x rank) signal with exponentially decaying weights plus 10 % noise."""
    gen = torch.Generator().manual_seed(seed)
    terms = 4 * rank
    factors = [torch.randn(s, terms, generator=gen, dtype=torch.float64) for s in shape]
    weights = torch.exp(-torch.arange(terms, dtype=torch.float64) / (terms / 8))
    signal = cp_to_tensor(weights, factors)
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    return signal / signal.norm() + 0.1 * noise / noise.norm()


def run_tensorly(kernel: torch.Tensor, rank: int, backend: str) -> Trajectory:
    trajectory: Trajectory = []
    with tl.backend_context(backend):
        tensor = tl.tensor(kernel.numpy()) if backend == "numpy" else kernel.clone()
        start = time.perf_counter()

        def record(_cp, error) -> None:
            trajectory.append((time.perf_counter() - start, float(error)))

        # return_errors: without it (or tol > 0) tensorly computes no error for the callback
        options = {"n_iter_max": ARGS.cap, "init": "svd", "tol": 0, "return_errors": True}
        options["random_state"] = ARGS.seed
        parafac(tensor, rank, callback=record, **options)
    return trajectory[1:]  # the first call reports the initialisation


def run_ours(kernel: torch.Tensor, rank: int, plain: bool) -> Trajectory:
    trajectory: Trajectory = []
    start = time.perf_counter()

    def record(_sweep: int, error: float) -> None:
        trajectory.append((time.perf_counter() - start, error))

    extras = {"linesearch": False, "rescue": False} if plain else {}
    cp_als(kernel, rank, max_iter=ARGS.cap, tol=0.0, callback=record, **extras)
    return trajectory


def first_reaching(trajectory: Trajectory, target: float) -> tuple[int, float] | None:
    for sweep, (seconds, error) in enumerate(trajectory, start=1):
        if error <= target * (1 + 1e-12):
            return sweep, seconds
    return None


def compare_methods() -> None:
    """Every method with a tensorly solver, by both solvers, on the layers at ``--ratio``."""
    print(f"every method by both solvers at ratio {ARGS.ratio}, {ARGS.threads} thread(s)")
    columns = ["layer", "method", "rank", "solver", "rel. kernel error", "time [s]"]
    table = []
    for layer in ARGS.layers:
        shape = tuple(int(n) for n in layer.split("x"))
        conv = nn.Conv2d(shape[1], shape[0], shape[2:], padding="same")
        spec = ConvSpec.from_conv(conv)
        rank = get_method("cp").rank_for_ratio(spec, ARGS.ratio)
        with torch.no_grad():
            conv.weight.copy_(trained_like(shape, rank, ARGS.seed))
        for method in ad.methods():
            cls = get_method(method)
            if cls.tensorly_solver is None or cls.unsupported_reason(spec) is not None:
                continue
            for solver in SOLVERS:
                start = time.perf_counter()
                layer_ = ad.decompose_conv(
                    conv, method, ratio=ARGS.ratio, solver=solver, cache=FactorCache()
                )
                seconds = time.perf_counter() - start
                with torch.no_grad():
                    diff = layer_.dense_weight() - conv.weight
                    err = float(diff.norm() / conv.weight.norm())
                name = solver if solver == "autodecomp" else f"tensorly {cls.tensorly_solver}"
                rank_ = json.dumps(layer_.rank, separators=(",", ":"))
                table.append([layer, method, rank_, name, f"{err:.5f}", f"{seconds:.3f}"])
    print_table(columns, table)


def _parafac_defaults(tensor: torch.Tensor, rank: int) -> float:
    """tensorly's parafac at its defaults (pytorch backend); returns the relative error."""
    with tl.backend_context("pytorch"):
        weights, factors = parafac(tensor, rank, init="svd")
    return float((cp_to_tensor(weights, factors) - tensor).norm() / tensor.norm())


def _ours_cold(conv: nn.Conv2d, method: str) -> tuple[float, int]:
    """Cold ``ad.decompose_conv`` at its defaults; returns the relative kernel error, rank."""
    layer = ad.decompose_conv(conv, method, ratio=ARGS.ratio, cache=FactorCache())
    with torch.no_grad():
        weight = conv.weight.double()
        err = (layer.dense_weight().double() - weight).norm() / weight.norm()
    return float(err), layer.rank


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def compare_trained() -> None:
    """Cold cp / pdp by ``decompose_conv`` against parafac's defaults on trained layers."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from trained import trained_model

    models: dict[str, dict[str, nn.Module]] = {}
    columns = ["layer", "shape", "method", "rank", "parafac [s]", "ours [s]", "speed-up"]
    columns += ["parafac err", "ours err", "err ours/parafac"]
    table, speedups, quotients = [], {}, {}
    for item in ARGS.trained_layers:
        model_name, name = item.split(":")
        if model_name not in models:
            models[model_name] = dict(trained_model(model_name).named_modules())
        conv = models[model_name][name]
        for method in ("cp", "pdp"):
            weight = conv.weight.detach().double()
            tensor = weight if method == "cp" else weight.reshape(*weight.shape[:2], -1)
            _ours_cold(conv, method)  # warm-up (first calls of the code path)
            theirs = ours = math.inf
            for _ in range(ARGS.repeats):  # interleaved, the fastest of each
                seconds, (err, rank) = _timed(_ours_cold, conv, method)
                ours = min(ours, seconds)
                seconds, their_err = _timed(_parafac_defaults, tensor, rank)
                theirs = min(theirs, seconds)
            speedups.setdefault(method, []).append(theirs / ours)
            quotients.setdefault(method, []).append(err / their_err)
            shape = "x".join(map(str, weight.shape))
            table.append([item, shape, method, str(rank), f"{theirs:.3f}", f"{ours:.3f}",
                          f"{theirs / ours:.2f}x", f"{their_err:.4f}", f"{err:.4f}",
                          f"{err / their_err:.4f}"])  # fmt: skip
            print(" ".join(table[-1]), file=sys.stderr, flush=True)  # progress
    for method in speedups:
        speed = math.exp(sum(map(math.log, speedups[method])) / len(speedups[method]))
        quot = math.exp(sum(map(math.log, quotients[method])) / len(quotients[method]))
        table.append(["geometric mean", "", method, "", "", "", f"{speed:.2f}x", "", "",
                      f"{quot:.4f}"])  # fmt: skip
    print(f"cold decompose_conv (defaults) vs tensorly parafac (defaults), ratio {ARGS.ratio}, "
          f"{ARGS.threads} thread(s), fastest of {ARGS.repeats} interleaved runs")  # fmt: skip
    print_table(columns, table)


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    if ARGS.trained:
        compare_trained()
        return
    if ARGS.methods:
        compare_methods()
        return
    print(
        f"CP solvers, {ARGS.threads} thread(s), rank from ratio {ARGS.ratio}: equal sweeps at "
        f"{ARGS.sweeps}; equal error = the worst / best error after {ARGS.sweeps} sweeps, "
        f"reached within {ARGS.cap}"
    )
    rows = []
    for layer in ARGS.layers:
        shape = tuple(int(n) for n in layer.split("x"))
        spec = ConvSpec(shape[1], shape[0], (shape[2], shape[3]))
        rank = ARGS.rank or get_method("cp").rank_for_ratio(spec, ARGS.ratio)
        kernel = trained_like(shape, rank, ARGS.seed)
        runs: dict[str, Trajectory] = {}
        for backend in ARGS.backends:
            runs[f"tensorly parafac ({backend})"] = run_tensorly(kernel, rank, backend)
        runs["autodecomp cp_als, plain ALS"] = run_ours(kernel, rank, plain=True)
        runs["autodecomp cp_als (default)"] = run_ours(kernel, rank, plain=False)
        at_n = {name: t[min(ARGS.sweeps, len(t)) - 1] for name, t in runs.items()}
        worst = max(error for _, error in at_n.values())
        best = min(error for _, error in at_n.values())
        for name, trajectory in runs.items():
            seconds, error = at_n[name]
            reached = [first_reaching(trajectory, target) for target in (worst, best)]
            rows.append(
                (layer, rank, name, seconds, error, trajectory[-1][1], worst, best, reached)
            )
    show(rows)


def show(rows) -> None:
    n, cap = ARGS.sweeps, ARGS.cap
    columns = ["layer", "rank", "solver", f"time @{n} sweeps [s]", f"rel. error @{n}"]
    columns += [f"rel. error @{cap}", f"worst / best error @{n}"]
    columns += ["to worst: sweeps, s", "to best: sweeps, s"]
    table = []
    for layer, rank, name, seconds, error, last, worst, best, reached in rows:
        cells = [layer, str(rank), name, f"{seconds:.3f}", f"{error:.5f}", f"{last:.5f}"]
        cells.append(f"{worst:.5f} / {best:.5f}")
        cells += ["-" if r is None else f"{r[0]}, {r[1]:.3f}" for r in reached]
        table.append(cells)
    print_table(columns, table)


def _cell(text: str, width: int) -> str:
    """Numbers right-aligned, text left-aligned."""
    try:
        float(text.split(",")[0])
    except ValueError:
        return text.ljust(width)
    return text.rjust(width)


def print_table(columns: list[str], table: list[list[str]]) -> None:
    if ARGS.markdown:
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for row in table:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(r[i]) for r in [columns, *table]) for i in range(len(columns))]
    for k, row in enumerate([columns, *table]):
        print("  ".join(_cell(c, w) for c, w in zip(row, widths, strict=True)))
        if k == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))


if __name__ == "__main__":
    main()
