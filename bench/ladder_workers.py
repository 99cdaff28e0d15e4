"""Ladder build time with 1 and with N worker processes, side by side.

For each process count, through the public CLI: ``autodecomp create`` (which scores
nothing) on a fresh journal storage with a cold factor cache, then N ``autodecomp worker``
processes; once the study holds its ladder, the workers are stopped. The build time is the
study's own record (``ladder_build``: from the first unit claimed to the ladder stored),
beside the wall time from the workers' start. The runs alternate (1, N, 1, N, ...) so that
load from other programs falls on both.

    python bench/ladder_workers.py STUDY.yaml --processes 2 --repeats 1 [--set key=value ...]

The study's ``threads`` should be 1 (one core per worker); ``--set`` overrides go to
``create`` (e.g. ``--set baseline.epochs=2``). The baseline is trained (or found) once
before the timed runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna

from autodecomp.search.ladder_units import ladder_build
from autodecomp.search.storage import open_storage_readonly

_POLL_S = 0.5


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "autodecomp", "--quiet", *argv]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def build(study: Path, workdir: Path, processes: int, sets: list[str], tag: str) -> dict:
    """Create a study on a fresh journal and build its ladder with ``processes`` workers."""
    name = f"ladder-{tag}"
    shutil.rmtree(study.parent / "cache" / "factors", ignore_errors=True)  # a cold start
    url = f"journal:///{workdir / (name + '.journal')}"
    overrides = [x for s in [*sets, f"name={name}"] for x in ("--set", s)]
    subprocess.run(_cli("create", str(study), "--storage", url, *overrides), check=True, env=_env())
    start = time.time()
    logs = [(workdir / f"{name}-w{i}.log").open("w") for i in range(processes)]
    workers = [
        subprocess.Popen(
            _cli("worker", "--study", name, "--storage", url, "--index", str(i)),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
        for i, log in enumerate(logs)
    ]
    record = None
    try:
        while record is None:
            time.sleep(_POLL_S)
            if any(w.poll() not in (None, 0) for w in workers):
                raise RuntimeError(f"a worker failed: see {workdir}/{name}-w*.log")
            storage = open_storage_readonly(url)
            record = ladder_build(optuna.load_study(study_name=name, storage=storage))
        wall = time.time() - start
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait()
        for log in logs:
            log.close()
    return {**record, "wall_from_workers_start": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="a study.yaml (threads: 1)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ladder_workers"))
    parser.add_argument("--set", action="append", default=[], dest="sets")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    rows = []
    print(f"load average before: {os.getloadavg()}", flush=True)
    for repeat in range(args.repeats):
        for processes in (1, args.processes):
            tag = f"p{processes}-r{repeat}"
            rec = build(args.study, args.workdir, processes, args.sets, tag)
            rows.append((processes, rec))
            print(f"{tag}: {rec}", flush=True)
    print(f"load average after: {os.getloadavg()}")
    print("| processes | build s (record) | wall s | units | unit s summed |")
    print("|---|---|---|---|---|")
    for processes, rec in rows:
        print(
            f"| {processes} | {rec['seconds']:.1f} | {rec['wall_from_workers_start']:.1f} | "
            f"{rec['units']} | {rec['unit_seconds']:.1f} |"
        )
    for repeat in range(args.repeats):
        one, many = rows[2 * repeat][1], rows[2 * repeat + 1][1]
        print(f"speed-up, repeat {repeat}: {one['seconds'] / many['seconds']:.2f}x")


if __name__ == "__main__":
    main()
