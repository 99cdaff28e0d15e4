"""Storage overhead per trial with 1-16 concurrent worker processes: SQLite, journal, PostgreSQL.

Each worker process runs the loop of ``autodecomp worker``
(:func:`autodecomp.search.worker.run_trials`:
start lock, stale-trial check, count, ask, heartbeat thread, tell) on a trivial trial that
makes the storage calls of a real one and no computation: 4 parameters (random sampler, so
sampling costs nothing), 9 user attributes (plan, layers, costs, seconds, worker) and two
objective values. All workers wait at a barrier, then run until the study has
``workers x trials-per-worker`` COMPLETE trials; the wall time from the barrier to the last
exit gives trials per second, and ``ms/trial`` is the mean time one worker spends per trial.
``failures`` counts storage errors raised in the workers (e.g. SQLite's "database is
locked"; a worker retries after one) and FAIL trials; ``total ok`` checks that the study
ended with exactly the total.

    python bench/storage_scaling.py                       # 1 4 8 16 workers, all storages
    python bench/storage_scaling.py --workers 1 4 --storages journal postgres

PostgreSQL runs in a throwaway local server (tests/pgserver.py; Debian's ``postgresql``
package), with fsync on.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from autodecomp.search.storage import Heartbeat, open_storage, trial_start_lock
from autodecomp.search.worker import run_trials

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pgserver import PostgresServer, find_bindir

_LAYERS = ("conv2", "conv3", "conv4", "fc")
_MAX_ERRORS = 200  # a worker gives up after this many storage errors


def _trivial(trial: optuna.Trial) -> tuple[float, float]:
    plan = {
        name: {"method": "tucker", "ratio": trial.suggest_float(f"{name}/tucker/ratio", 0.1, 0.9)}
        for name in _LAYERS
    }
    macs = sum(entry["ratio"] for entry in plan.values())
    layers = {n: {**e, "rank": [3, 3], "rel_error": 0.1, "macs": 1000} for n, e in plan.items()}
    for key, value in {
        "plan": plan,
        "macs": macs,
        "params": macs,
        "macs_ratio": macs / 4,
        "params_ratio": macs / 4,
        "over_budget": False,
        "layers": layers,
        "seconds": {"plan": 0.0, "distill": 0.0},
    }.items():
        trial.set_user_attr(key, value)
    return 1.0 - macs / 4, macs


def _worker(url: str, total: int, index: int, barrier, results) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(url, Heartbeat(interval=60))
    study = optuna.load_study(study_name="bench", storage=storage)
    study.sampler = optuna.samplers.RandomSampler(seed=index)
    errors: list[str] = []
    ran = 0
    barrier.wait()
    while len(errors) < _MAX_ERRORS:
        try:
            ran += run_trials(
                study,
                _trivial,
                total,
                lambda: trial_start_lock(url, storage, "bench"),
                attrs={"worker": {"index": index}},
                poll_s=0.005,
            )
            break
        except Exception as err:  # counted: this is what the bench measures
            errors.append(f"{type(err).__name__}: {str(err).splitlines()[0][:80]}")
    results.put((index, ran, errors))


def _measure(url: str, workers: int, per_worker: int) -> dict:
    total = workers * per_worker
    optuna.create_study(
        study_name="bench", storage=open_storage(url), directions=["maximize", "minimize"]
    )
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(workers + 1), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(url, total, i, barrier, results)) for i in range(workers)
    ]
    for proc in procs:
        proc.start()
    barrier.wait()
    start = time.perf_counter()
    outcomes = [results.get() for _ in procs]
    wall = time.perf_counter() - start
    for proc in procs:
        proc.join()
    study = optuna.load_study(study_name="bench", storage=open_storage(url))
    states = [t.state for t in study.get_trials(deepcopy=False)]
    complete = states.count(TrialState.COMPLETE)
    errors = [e for _, _, errs in outcomes for e in errs]
    return {
        "trials": complete,
        "trials/s": complete / wall,
        "ms/trial": 1000 * wall * workers / max(complete, 1),
        "failures": len(errors) + states.count(TrialState.FAIL),
        "total ok": complete == total and len(states) == total,
        "example": errors[0] if errors else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument(
        "--storages", nargs="+", default=["sqlite", "journal", "postgres"],
        choices=["sqlite", "journal", "postgres"],
    )  # fmt: skip
    parser.add_argument("--trials-per-worker", type=int, default=10)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    server = None
    if "postgres" in args.storages:
        bindir = find_bindir()
        if bindir is None:
            sys.exit("PostgreSQL server binaries not found: apt-get install postgresql")
        server = PostgresServer(bindir, durable=True).start()
    print(f"{'storage':9s} {'workers':>7s} {'trials':>6s} {'trials/s':>9s} {'ms/trial':>9s} "
          f"{'failures':>8s}  total ok  example failure")  # fmt: skip
    try:
        for kind in args.storages:
            for workers in args.workers:
                with tempfile.TemporaryDirectory(prefix="autodecomp-storage-") as tmp:
                    url = {
                        "sqlite": lambda: f"sqlite:///{tmp}/bench.db",
                        "journal": lambda: f"journal:///{tmp}/bench.journal",
                        "postgres": lambda: server.create_database(),
                    }[kind]()
                    row = _measure(url, workers, args.trials_per_worker)
                print(
                    f"{kind:9s} {workers:7d} {row['trials']:6d} {row['trials/s']:9.1f} "
                    f"{row['ms/trial']:9.1f} {row['failures']:8d}  {row['total ok']!s:8s}  "
                    f"{row['example']}",
                    flush=True,
                )
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
