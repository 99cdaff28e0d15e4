"""Scale: ladder build time with 1 and N processes, per-trial overhead, peak memory.

For each model (CIFAR-style ``resnet20``, torchvision ``resnet18`` / ``resnet50``) on the
digits upsampled to 32x32 with 3 channels, the all-method space
(``search_spaces/resnet_all_methods.yaml``) and ``initial_design: {plans: 12, grid: 5,
tracks: 2}``, through the public CLI only:

- reference: 100 proxy distillation steps (SGD) at batch 128, in this process;
- ladder: ``autodecomp create`` then P ``autodecomp worker`` processes on a journal
  storage, cold factor cache; the build time is from the start of ``create`` to the start
  of the study's first trial (whichever process builds the ladder, ``create`` or the
  workers), the workers stopped then; peak RSS per process (``os.wait4``);
- overhead: ``autodecomp search`` of a study without a ladder (sampled plans, so every
  trial fits new factors) at ``--steps`` proxy steps; overhead = trial time minus the
  proxy fine-tune (BN recalibration, distillation) and the evaluations, as a share of a
  trained trial (``seconds`` user attrs).

    python bench/scale.py                                   # resnet20, 1 and 2 processes
    python bench/scale.py --models resnet20,resnet18 --markdown
    python bench/scale.py --models resnet50 --processes 1 --no-overhead
    python bench/scale.py --models resnet18 --processes 0 --trials 6   # the overhead alone
    python bench/scale.py --threads 1       # one core per worker, as on a cluster node each

The baseline is trained once per model (``--epochs``, cached under ``--workdir``). Targets
on 2 CPU cores (issue [J]): ResNet-20 ladder <= 2x the reference; ResNet-18 ladder <= 240 s
in one process; per-trial overhead <= 10 % of a ResNet-18 trial at 100 proxy steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = [ROOT]  # the source tree the CLI processes run (--source)
TARGETS = {"resnet20": "ladder <= 2x ref", "resnet18": "ladder <= 240 s (1 proc)"}
_POLL_S = 0.5


def study_yaml(model: str, folder: Path, args: argparse.Namespace) -> Path:
    """Write the bench study of ``model`` into ``folder`` and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model": {"name": model},
        "data": {"name": "digits", "image_size": 32, "channels": 3},
        "baseline": {"epochs": args.epochs, "lr": 0.1, "batch_size": 128},
        "space": str(SOURCE[0] / "search_spaces" / "resnet_all_methods.yaml"),
        "proxy": {
            "steps": args.steps,
            "lr": 0.001,
            "batch_size": 128,
            "temperature": 4.0,
            "alpha": 0.9,
            "bn_batches": 8,
            "accuracy_floor": 0.3,
            "floor_step": 25,
            "floor_batches": 2,
            "calibration_size": 64,
        },
        "objectives": ["accuracy", "macs", "params"],
        "budgets": {"max_macs": 0.5, "max_params": 0.5},
        "sampler": {"name": "tpe", "options": {"multivariate": True, "group": True}},
        "seed": 0,
        "trials": 100,
        "device": args.device,
        "threads": args.threads,
        "initial_design": {"plans": 12, "grid": 5, "tracks": 2},
    }
    path = folder / "study.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def _cli(command: str, *argv: str) -> list[str]:
    return [sys.executable, "-m", "autodecomp", command, "--quiet", *argv]


@dataclass
class Proc:
    """A child process whose peak RSS is read when it is reaped."""

    popen: subprocess.Popen
    log: Path
    peak_mb: float = 0.0
    cpu_s: float = 0.0  # user + system seconds, all threads
    code: int | None = None

    def reap(self, block: bool = True) -> bool:
        if self.code is not None:
            return True
        pid, status, usage = os.wait4(self.popen.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return False
        self.code = os.waitstatus_to_exitcode(status)
        self.popen.returncode = self.code
        self.peak_mb = usage.ru_maxrss / 1024  # KiB on Linux
        self.cpu_s = usage.ru_utime + usage.ru_stime
        return True

    def stop(self) -> None:
        if self.code is None:
            self.popen.terminate()
            self.reap()


def _start(argv: list[str], log: Path) -> Proc:
    handle = log.open("w")
    env = {**os.environ, "PYTHONPATH": str(SOURCE[0])}
    popen = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, cwd=SOURCE[0], env=env)
    return Proc(popen, log)


def _check(proc: Proc, what: str) -> None:
    if proc.code not in (0, None, -15):
        tail = proc.log.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"{what} failed (exit {proc.code}), {proc.log}:\n" + "\n".join(tail))


def _create(study: Path, url: str, log: Path, *settings: str) -> Proc:
    """``autodecomp create`` of ``study`` in ``url`` with ``--set`` ``settings``, run to the end."""
    sets = [arg for setting in settings for arg in ("--set", setting)]
    proc = _start(_cli("create", str(study), "--storage", url, *sets), log)
    proc.reap()
    _check(proc, "create")
    return proc


def train_baseline(study: Path, folder: Path) -> None:
    """Train (or find) the cached baseline with a throwaway study that has no ladder."""
    url = f"sqlite:///{folder / 'baseline.db'}"
    _create(
        study,
        url,
        folder / "baseline.log",
        f"name=baseline-{time.time_ns()}",
        "initial_design.plans=0",
    )


@dataclass
class Seconds:
    """Wall and CPU (user + system, every thread) seconds of one measurement."""

    wall: float
    cpu: float


def reference_seconds(model_name: str, steps: int, threads: int, device: str) -> Seconds:
    """``steps`` proxy distillation steps (SGD) at batch 128 on random 3x32x32 data."""
    import torch

    from autodecomp import get_model
    from autodecomp.workload.train import distill

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    teacher = get_model(model_name, num_classes=10, in_channels=3)
    batch = (torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,)))

    def run(n: int) -> None:
        distill(copy.deepcopy(teacher), teacher, [batch], steps=n, lr=1e-3, device=device)

    run(3)  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    run(steps)
    return Seconds(time.perf_counter() - wall, time.process_time() - cpu)


def _load(url: str, name: str):
    """The study ``name`` in the storage at ``url`` (journal URLs need autodecomp's opener)."""
    import optuna

    from autodecomp.search.storage import open_storage_readonly

    return optuna.load_study(study_name=name, storage=open_storage_readonly(url))


def _first_trial_start(url: str, name: str) -> float | None:
    """Epoch seconds at which the study's first trial started, if any has."""
    try:
        study = _load(url, name)
    except KeyError:
        return None
    starts = [
        t.datetime_start.timestamp()
        for t in study.get_trials(deepcopy=False)
        if t.datetime_start is not None
    ]
    return min(starts) if starts else None


@dataclass
class Ladder:
    seconds: Seconds  # until the first trial starts; CPU of every process until then
    create_s: float
    peak_mb: float
    processes: int
    stored: dict = field(default_factory=dict)


def build_ladder(study: Path, folder: Path, processes: int, threads: int, timeout: float) -> Ladder:
    """Create the study and start ``processes`` workers (``threads`` shared among them);
    time until the first trial starts."""
    shutil.rmtree(folder / "cache" / "factors", ignore_errors=True)  # cold factor cache
    name = f"ladder{processes}-{time.time_ns()}"
    url = f"journal:///{folder / (name + '.log')}"
    each = max(1, threads // processes)
    start = time.time()
    create = _create(study, url, folder / f"{name}-create.log", f"name={name}", f"threads={each}")
    create_s = time.time() - start
    workers = [
        _start(
            _cli("worker", "--study", name, "--storage", url, "--index", str(i)),
            folder / f"{name}-worker{i}.log",
        )
        for i in range(processes)
    ]
    first = None
    try:
        while first is None:
            if time.time() - start > timeout:
                raise SystemExit(f"no trial started within {timeout:.0f} s ({folder})")
            time.sleep(_POLL_S)
            for w in workers:
                if w.reap(block=False):
                    _check(w, "worker")
            first = _first_trial_start(url, name)
    finally:
        for w in workers:
            w.stop()
    attrs = _load(url, name).user_attrs
    stored = attrs.get("ladder_build") or {}  # the build record, where the study keeps one
    peak = max([create.peak_mb, *(w.peak_mb for w in workers)])
    cpu = create.cpu_s + sum(w.cpu_s for w in workers)
    return Ladder(Seconds(first - start, cpu), create_s, peak, processes, stored)


@dataclass
class Overhead:
    trained: int
    untrained: int
    trial_s: float  # mean wall time of a trained trial
    overhead_s: float  # its mean time outside the fine-tune and the evaluations
    peak_mb: float
    phases: dict[str, float]
    untrained_s: float  # mean wall time of a trial not trained (over budget, gated)


# The proxy fine-tune's phases (workload/proxy.py PHASES: BN recalibration, evaluation before,
# distillation, evaluation after) and the accuracy-floor evaluation: the rest is overhead.
_WORK = ("bn_recal", "pre_eval", "distill", "eval", "floor_eval")


def trial_overhead(study: Path, folder: Path, trials: int) -> Overhead:
    """Run ``trials`` sampled trials (no ladder, a cold factor cache) and split their
    recorded phase times."""
    shutil.rmtree(folder / "cache" / "factors", ignore_errors=True)
    name = f"overhead-{time.time_ns()}"
    url = f"sqlite:///{folder / (name + '.db')}"
    proc = _start(
        _cli(
            "search",
            str(study),
            "--storage",
            url,
            "--trials",
            str(trials),
            "--set",
            f"name={name}",
            "--set",
            "initial_design.plans=0",
        ),
        folder / f"{name}.log",
    )
    proc.reap()
    _check(proc, "search")
    trained, untrained, total, work, idle = 0, 0, 0.0, 0.0, 0.0
    phases: dict[str, float] = {}
    for trial in _load(url, name).trials:
        seconds = trial.user_attrs.get("seconds", {})
        if "distill" not in seconds:
            untrained += 1
            idle += seconds.get("total", 0.0)
            continue
        trained += 1
        total += seconds["total"]
        work += sum(seconds.get(k, 0.0) for k in _WORK)
        for key, value in seconds.items():
            phases[key] = phases.get(key, 0.0) + value
    n = max(trained, 1)
    return Overhead(
        trained,
        untrained,
        total / n,
        (total - work) / n,
        proc.peak_mb,
        {k: v / n for k, v in phases.items()},
        idle / max(untrained, 1),
    )


def _row(
    model: str, ref: Seconds, ladder: Ladder | None, one: Ladder | None, over: Overhead | None
) -> list[str]:
    """One table row: a ladder (if any) against the reference (and the 1-process ladder),
    and the trial overhead when given."""
    row = [
        model,
        "-" if ladder is None else str(ladder.processes),
        f"{ref.wall:.1f} / {ref.cpu:.0f}",
    ]
    if ladder is None:
        row += ["-"] * 6
    else:
        t, record = ladder.seconds, ladder.stored.get("seconds")
        row += [
            f"{t.wall:.1f} / {t.cpu:.0f}",
            f"{t.wall / ref.wall:.2f} / {t.cpu / ref.cpu:.2f}",
            f"{one.seconds.wall / t.wall:.2f}x" if one else "-",
            "-" if record is None else f"{record:.1f}",
            f"{ladder.create_s:.1f}",
            f"{ladder.peak_mb:.0f}",
        ]
    if over is None:
        return [*row, "-", "-", "-", "-", "-"]
    share = over.overhead_s / max(over.trial_s, 1e-9)
    return [
        *row,
        f"{over.trial_s:.1f}",
        f"{over.overhead_s:.1f}",
        f"{share:.1%}",
        f"{over.trained}/{over.trained + over.untrained}",
        f"{over.peak_mb:.0f}",
    ]


def _table(rows: list[list[str]], header: list[str], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [header, *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20", help="comma-separated model names")
    parser.add_argument(
        "--processes", default="1,2", help="comma-separated process counts (0: no ladder)"
    )
    parser.add_argument("--trials", type=int, default=2, help="sampled trials for the overhead")
    parser.add_argument("--steps", type=int, default=100, help="proxy steps (and reference)")
    parser.add_argument("--epochs", type=int, default=10, help="baseline training epochs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per ladder")
    parser.add_argument("--no-overhead", action="store_true", help="skip the overhead study")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/autodecomp-scale"))
    parser.add_argument(
        "--source", type=Path, default=ROOT, help="source tree the CLI runs (e.g. an old commit)"
    )
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    SOURCE[0] = args.source.resolve()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the workers on the way out
    counts = [int(p) for p in args.processes.split(",") if int(p) > 0]

    rows = []
    for model in args.models.split(","):
        folder = (args.workdir / model).resolve()
        study = study_yaml(model, folder, args)
        train_baseline(study, folder)
        ref = reference_seconds(model, args.steps, args.threads, args.device)
        ladders = {p: build_ladder(study, folder, p, args.threads, args.timeout) for p in counts}
        over = None if args.no_overhead else trial_overhead(study, folder, args.trials)
        rows += [
            _row(model, ref, ladder, ladders.get(1), over if i == 0 else None)
            for i, ladder in enumerate(ladders.values())
        ] or [_row(model, ref, None, None, over)]  # --processes 0: the overhead alone
        if over is not None:
            phases = ", ".join(f"{k} {v:.2f}" for k, v in sorted(over.phases.items()))
            print(f"{model} mean trained-trial phases (s): {phases}", file=sys.stderr)
            print(
                f"{model} {over.untrained} untrained trials, {over.untrained_s:.2f} s each",
                file=sys.stderr,
            )
    header = [
        "model",
        "procs",
        f"ref {args.steps} steps s (wall / cpu)",
        "ladder s (wall / cpu)",
        "ladder/ref (wall / cpu)",
        "speedup",
        "recorded build s",
        "create s",
        "ladder peak MB",
        "trial s",
        "overhead s",
        "overhead",
        "trained",
        "trial peak MB",
    ]
    load = os.getloadavg()[0]
    print(
        f"threads {args.threads}, device {args.device}, batch 128, load average {load:.1f} on "
        f"{os.cpu_count()} CPUs at the end; targets: {TARGETS}; overhead <= 10% (resnet18)"
    )
    print(_table(rows, header, args.markdown))


if __name__ == "__main__":
    main()
