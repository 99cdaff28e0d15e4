"""Search overhead: the share of trial time not spent fine-tuning or evaluating.

Runs the trials of a study (default: the shipped digits study) with the real objective in
a throwaway SQLite storage (the study's own database and tables are not touched; its
cached baseline is reused or trained once) and splits the wall time of the trial loop into
the phases each trial records, the rest of the objective (storage writes of attributes and
constraints, loaders), and what happens outside it (Optuna's ask / tell, callbacks):

    python bench/search_overhead.py                     # 24 trials of studies/digits
    python bench/search_overhead.py --trials 40 --set proxy.steps=150

Overhead = wall time - (distillation steps + evaluations), as a share of the wall time of
the whole trial loop (over-budget trials, which are never trained, included). BatchNorm
recalibration is reported separately and counted as overhead.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import optuna

from autodecomp.config import load_config
from autodecomp.search.baseline import load_baseline
from autodecomp.search.objective import CATCH, Objective
from autodecomp.search.study import open_study, prepare, study_callbacks

# Phases that are the proxy's real work: fine-tune steps (the floor check runs inside
# them) and the evaluations. Everything else is overhead.
_WORK = ("distill", "pre_eval", "eval")
_ORDER = (
    "plan", "decompose", "count", "latency", "proxy", "record", "bn_recal", "pre_eval", "distill",
    "eval",
)  # fmt: skip


def _run(study_yaml: str, trials: int | None, overrides: list[str]):
    tmp = Path(tempfile.mkdtemp(prefix="autodecomp-bench-"))
    sets = [*overrides, f"storage=sqlite:///{tmp / 'bench.db'}", f"name=bench-{time.time_ns()}"]
    if trials is not None:
        sets.append(f"trials={trials}")
    cfg = load_config(study_yaml, sets)
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    prepared = prepare(cfg)
    baseline = load_baseline(cfg, prepared.model, prepared.splits)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    created = time.perf_counter()
    study = open_study(cfg, prepared, baseline)  # builds the allocation ladder, if configured
    print(f"study created in {time.perf_counter() - created:.2f} s (once per study)")
    objective = Objective(cfg, prepared.space, baseline, prepared.splits)
    start = time.perf_counter()
    study.optimize(
        objective, n_trials=cfg.trials, catch=CATCH, callbacks=study_callbacks(study, cfg)
    )
    return cfg, study, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="studies/digits/study.yaml")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    cfg, study, wall = _run(args.study, args.trials, args.overrides)
    phases: dict[str, float] = defaultdict(float)
    trained = over = 0
    for trial in study.trials:
        seconds = dict(trial.user_attrs.get("seconds", {}))
        seconds["distill"] = seconds.get("distill", 0.0)  # floor_eval is inside distill
        seconds.pop("floor_eval", None)
        for key, value in seconds.items():
            phases[key] += value
        over += bool(trial.user_attrs.get("over_budget"))
        trained += "distill" in trial.user_attrs.get("seconds", {})
    inside = phases.pop("total")
    phases["other in objective"] = inside - sum(phases.values())
    phases["outside objective"] = wall - inside
    n = len(study.trials)
    work = sum(phases[k] for k in _WORK)

    print(
        f"study {args.study}: {n} trials ({trained} trained, {over} over budget), "
        f"proxy {cfg.proxy.steps} steps x batch {cfg.proxy.batch_size}, sampler "
        f"{cfg.sampler.name}, threads {cfg.threads or 'default'}"
    )
    print(f"{'phase':<20}{'s/trial':>10}{'total s':>10}{'share':>9}")
    for key in [*_ORDER, "other in objective", "outside objective"]:
        value = phases.get(key, 0.0)
        print(f"{key:<20}{value / n:>10.3f}{value:>10.2f}{value / wall:>9.1%}")
    print(f"{'wall (trial loop)':<20}{wall / n:>10.3f}{wall:>10.2f}{1:>9.1%}")
    overhead = wall - work
    print(
        f"overhead (all but fine-tune steps and evaluation): {overhead / n:.3f} s/trial, "
        f"{overhead / wall:.1%} of trial time (target < 3%); without BN recalibration: "
        f"{(overhead - phases.get('bn_recal', 0.0)) / wall:.1%}"
    )


if __name__ == "__main__":
    main()
