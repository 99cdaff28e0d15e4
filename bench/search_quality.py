"""Search quality: hypervolume of the per-layer search vs random search and uniform sweeps.

At an equal number of trials and the same fine-tune budget (one :class:`Objective`, so the
same distillation steps, gates and cost counting for every arm), compares the hypervolume
(:func:`autodecomp.results.report.hypervolume`: normalised ``1 - accuracy`` and cost over the
baseline, reference accuracy 0 at the baseline's cost) reached by:

- the search with each of ``--samplers`` (Optuna TPE with the study's options, NSGA-II
  with ``--population``, random search) over the study's search space;
- one uniform sweep per method of the space: every searched layer that method (layers that
  do not offer it stay dense), ratios on a grid. The grid is the way users compress with
  TensorLy-Torch or MUSCO today, made as strong as possible: candidate ratios over the
  space's ratio range that fit the budgets, one plan per distinct set of ranks, ``--trials``
  of them spread evenly by MACs (fewer when fewer distinct plans fit).

Budget accounting: every arm runs until ``--trials`` candidates within the budgets have
been fine-tuned (or stopped by a pruning gate): an over-budget candidate is never trained
and costs milliseconds, so this is an equal fine-tune budget. The search arms draw over-
budget candidates too (at most ``--cap`` x ``--trials`` trials in all); "HV@N trials" is
their hypervolume after the first ``--trials`` trials of any kind (equal trial count).

Every arm runs once per seed (sampler seed and fine-tune seed vary together; the baseline
and data split stay fixed) in memory; warm starts only with ``--warm-start``. Prints one
row per arm (mean, standard deviation, range and per-seed values of the hypervolume) and
the search arms' margin over the best uniform sweep under both accountings:

    python bench/search_quality.py                            # digits, 20 trials, 3 seeds
    python bench/search_quality.py --trials 24 --seeds 3 --set proxy.steps=80
    python bench/search_quality.py --study studies/resnet20_digits/study.yaml --trials 16 \\
        --seeds 2 --samplers tpe random --uniform tucker tt
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import torch

from autodecomp.config import SamplerConfig, StudyConfig, load_config
from autodecomp.results.report import hypervolume, hypervolume_frame
from autodecomp.search.allocate import Ladder, allocation_ladder, uniform_plans
from autodecomp.search.baseline import Baseline, load_baseline
from autodecomp.search.objective import CATCH, Objective
from autodecomp.search.space import KEEP, SearchSpace
from autodecomp.search.study import make_sampler, prepare, shared_factor_cache


def _study(cfg: StudyConfig, baseline: Baseline, sampler: optuna.samplers.BaseSampler):
    """An in-memory study carrying the attributes :func:`hypervolume` reads."""
    study = optuna.create_study(directions=cfg.directions, sampler=sampler)
    study.set_user_attr("config", cfg.to_dict())
    study.set_user_attr("baseline", baseline.info())
    study.set_user_attr("limits", cfg.budgets.limits(baseline.macs, baseline.params))
    return study


def uniform_grid(
    space: SearchSpace, method: str, objective: Objective, count: int
) -> list[dict[str, Any]]:
    """Up to ``count`` fixed trial parameters of distinct, within-budget uniform plans
    (:func:`~autodecomp.search.allocate.uniform_plans`), spread evenly by MACs."""
    model = objective.baseline.model
    plans = [
        rung.params
        for rung in uniform_plans(model, space, objective.cost, method, objective.limits)
    ]
    if len(plans) <= count:
        return plans
    return [
        plans[i] for i in sorted(set(np.linspace(0, len(plans) - 1, count).round().astype(int)))
    ]


def _sampler(cfg: StudyConfig, name: str, seed: int, population: int):
    options: dict[str, Any] = {}
    if name == cfg.sampler.name:
        options = dict(cfg.sampler.options)
    if name == "nsga2":
        options["population_size"] = population
    return make_sampler(SamplerConfig(name, cfg.sampler.seed + seed, options))


def _within_budget(study: optuna.Study) -> int:
    """Finished trials that were within budget: each cost a fine-tune (or reached a gate)."""
    return sum(t.user_attrs.get("over_budget") is False for t in study.trials)


def _run_arm(
    cfg: StudyConfig,
    baseline: Baseline,
    objective: Objective,
    sampler: optuna.samplers.BaseSampler,
    trials: int,
    cap: int,
    enqueued: Sequence[dict[str, Any]] = (),
    ladder: Ladder | None = None,
) -> dict[str, Any]:
    """Run until ``trials`` candidates were within budget (at most ``cap`` trials in all;
    the ``enqueued`` ones first, then the sampler's).

    Over-budget candidates cost no fine-tune (milliseconds each), so they do not count
    against the arm's budget; ``hv_first`` is the hypervolume after the first ``trials``
    trials of any kind instead.
    """
    study = _study(cfg, baseline, sampler)
    for params in enqueued:
        study.enqueue_trial(params)
    callbacks = []
    if ladder is not None:
        ladder.store(study)
        callbacks.append(ladder)

    def stop(study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
        if _within_budget(study) >= trials:
            study.stop()

    start = time.perf_counter()
    study.optimize(objective, cap, catch=CATCH, callbacks=[*callbacks, stop])
    seconds = time.perf_counter() - start
    history = hypervolume_frame(study)
    counts = pd.Series([t.state.name for t in study.trials]).value_counts()
    trained = sum("distill" in (t.user_attrs.get("seconds") or {}) for t in study.trials)
    accuracy = cfg.objectives.index("accuracy")
    front = sorted(
        (t.user_attrs["macs_ratio"], t.values[accuracy])
        for t in study.best_trials
        if not t.user_attrs.get("over_budget")
    )
    return {
        "front": " ".join(f"{m:.3f}:{a:.3f}" for m, a in front),
        "tried": _tried(study, accuracy, ladder),
        "hypervolume": hypervolume(study),
        "hv_first": float(history.hypervolume.iloc[min(trials, len(history)) - 1]),
        "trials": len(study.trials),
        "within_budget": _within_budget(study),
        "trained": trained,
        "pruned": int(counts.get("PRUNED", 0)),
        "failed": int(counts.get("FAIL", 0)),
        "seconds": seconds,
    }


def _tried(study: optuna.Study, accuracy: int, ladder: Ladder | None) -> str:
    """Every fine-tuned trial in order as ``MACs ratio:accuracy``, a ladder rung's track
    after it in brackets (``[front]``, ``[pdp]``, ...)."""
    points = []
    for trial in study.trials:
        if trial.state != optuna.trial.TrialState.COMPLETE or trial.user_attrs.get("over_budget"):
            continue
        rung = Ladder.rung_of(trial) if ladder is not None else None
        track = f"[{ladder.rungs[rung].track}]" if rung is not None else ""
        points.append(f"{trial.user_attrs['macs_ratio']:.3f}:{trial.values[accuracy]:.3f}{track}")
    return " ".join(points)


def _table(rows: pd.DataFrame, arms: list[str]) -> str:
    """Mean per arm of trials, within-budget candidates, fine-tuned ones, HV and seconds."""
    lines = [
        f"{'arm':<16}{'trials':>7}{'in budget':>10}{'tuned':>6}{'HV mean':>9}{'std':>8}"
        f"{'min':>8}{'max':>8}{'HV@N trials':>13}{'s/seed':>8}  HV per seed"
    ]
    for arm in arms:
        part = rows[rows.arm == arm].sort_values("seed")
        hv = part.hypervolume
        lines.append(
            f"{arm:<16}{part.trials.mean():>7.1f}{part.within_budget.mean():>10.1f}"
            f"{part.trained.mean():>6.1f}{hv.mean():>9.4f}"
            f"{hv.std(ddof=1) if len(hv) > 1 else 0.0:>8.4f}{hv.min():>8.4f}{hv.max():>8.4f}"
            f"{part.hv_first.mean():>13.4f}{part.seconds.mean():>8.0f}  "
            + " ".join(f"{v:.4f}" for v in hv)
        )
    return "\n".join(lines)


def _verdict(frame: pd.DataFrame, column: str, what: str) -> list[str]:
    """Each search arm against the best uniform sweep (by mean, and per seed) on ``column``."""
    names = list(dict.fromkeys(frame.arm))
    uniform = [a for a in names if a.startswith("uniform:")]
    if not uniform:
        return []
    means = frame.groupby("arm")[column].mean()
    best = max(uniform, key=lambda a: means[a])
    best_by_seed = frame[frame.arm.isin(uniform)].groupby("seed")[column].max()
    lines = [f"{what}: best uniform sweep {best} (mean HV {means[best]:.4f})"]
    for arm in [a for a in names if a not in uniform]:
        part = frame[frame.arm == arm].set_index("seed")[column]
        wins = int((part > best_by_seed.reindex(part.index)).sum())
        lines.append(
            f"  {arm}: {means[arm] - means[best]:+.4f} mean HV vs {best}; above every uniform "
            f"sweep of the same seed in {wins}/{len(part)} seeds"
        )
    return lines


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the package's progress lines
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="studies/digits/study.yaml")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seeds FIRST_SEED .. FIRST_SEED + SEEDS - 1"
    )
    parser.add_argument("--samplers", nargs="*", default=["tpe", "nsga2", "random"])
    parser.add_argument("--uniform", nargs="*", default=None, help="methods (default: space's)")
    parser.add_argument("--population", type=int, default=8, help="NSGA-II population size")
    parser.add_argument(
        "--cap", type=int, default=5, help="at most CAP x trials per arm, over budget included"
    )
    parser.add_argument(
        "--warm-start", action="store_true", help="search arms start with the study's warm starts"
    )
    parser.add_argument(
        "--initial-design",
        type=int,
        default=None,
        help="allocation-ladder trials the tpe / nsga2 arms start with (default: the study's "
        "initial_design.plans; random search never gets them)",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--csv", help="also write the per-seed rows here")
    parser.add_argument(
        "--factor-cache",
        metavar="DIR",
        help="keep factorisations on disk here, so a rerun skips the ALS fits (minutes on "
        "resnet20)",
    )
    parser.add_argument(
        "--fronts",
        action="store_true",
        help="print each arm's front and every fine-tuned trial in order "
        "(MACs ratio:accuracy[ladder track])",
    )
    args = parser.parse_args()
    if args.factor_cache:
        with shared_factor_cache(Path(args.factor_cache)):
            _run(args)
    else:
        _run(args)


def _run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    cfg = load_config(args.study, args.overrides)
    prepared = prepare(cfg)
    baseline = load_baseline(cfg, prepared.model, prepared.splits)
    space = prepared.space
    offered = list(dict.fromkeys(m for layer in space.layers for m in layer.choices if m != KEEP))
    methods = offered if args.uniform is None else args.uniform
    first = Objective(cfg, space, baseline, prepared.splits)
    grids = {m: uniform_grid(space, m, first, args.trials) for m in methods}
    plans = cfg.initial_design.plans if args.initial_design is None else args.initial_design
    design_start = time.perf_counter()
    searched = any(name != "random" for name in args.samplers) and plans > 0
    rungs = (
        allocation_ladder(cfg, space, baseline, prepared.splits, cfg.initial_design.grid)
        if searched
        else []
    )
    design_s = time.perf_counter() - design_start
    print(
        f"study {args.study}: {len(space.layers)} layers, methods {', '.join(offered)}; "
        f"{args.trials} trials x {args.seeds} seeds per arm; proxy {cfg.proxy.steps} steps; "
        f"budgets {cfg.budgets.limits(baseline.macs, baseline.params)}; objectives "
        f"{', '.join(cfg.objectives)}; baseline accuracy {baseline.accuracy:.4f}; "
        f"tpe / nsga2 start with {plans} of {len(rungs)} ladder allocations (score "
        f"{cfg.initial_design.score}, {design_s:.1f} s)",
        flush=True,
    )
    for method, grid in grids.items():
        if not grid:
            print(f"uniform:{method}: no uniform plan fits the budgets; arm left out")
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        seeded = dataclasses.replace(cfg, seed=cfg.seed + seed)
        objective = Objective(seeded, space, baseline, prepared.splits)
        warm = [params for _, params in prepared.warm_starts] if args.warm_start else []
        accuracy = cfg.objectives.index("accuracy")
        arms: list[tuple[str, optuna.samplers.BaseSampler, list[dict[str, Any]], int]] = [
            (
                name,
                _sampler(cfg, name, seed, args.population),
                warm,
                0 if name == "random" else plans,
            )
            for name in args.samplers
        ]
        arms += [
            (f"uniform:{m}", optuna.samplers.RandomSampler(seed=seed), grid, 0)
            for m, grid in grids.items()
            if grid
        ]
        for arm, sampler, grid, rung_count in arms:
            cap = len(grid) if arm.startswith("uniform:") else args.cap * args.trials
            ladder = Ladder(rungs, rung_count, accuracy, baseline.accuracy) if rung_count else None
            result = _run_arm(seeded, baseline, objective, sampler, args.trials, cap, grid, ladder)
            rows.append({"arm": arm, "seed": seed, **result})
            print(
                f"seed {seed} {arm:<16} HV {result['hypervolume']:.4f} "
                f"(first {args.trials} trials {result['hv_first']:.4f}; {result['trials']} "
                f"trials, {result['within_budget']} in budget, {result['trained']} fine-tuned, "
                f"{result['seconds']:.0f} s)",
                flush=True,
            )
            if args.fronts:
                print(f"    front {result['front']}", flush=True)
                print(f"    tried {result['tried']}", flush=True)
    frame = pd.DataFrame(rows)
    if args.csv:
        frame.to_csv(args.csv, index=False)
    print()
    print(_table(frame, list(dict.fromkeys(frame.arm))))
    print()
    n = args.trials
    for line in _verdict(frame, "hypervolume", f"equal fine-tunes ({n} candidates in budget)"):
        print(line)
    for line in _verdict(frame, "hv_first", f"equal trials (the first {n}, over budget included)"):
        print(line)


if __name__ == "__main__":
    main()
