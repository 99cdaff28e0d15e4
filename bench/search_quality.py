"""Search quality: what a user gets at a budget, search vs the best uniform sweep, equal wall-clock.

Per seed, two arms get the same seconds (``--seconds`` of this process's CPU time, which
equals the wall-clock of a one-thread run on an idle machine and does not depend on what
else runs on a shared one; everything inside counts: building the objective and the
allocation ladder, factorisations, over-budget draws; a trial that has started finishes):

- **search**: the study as ``autodecomp search`` runs it with ``initial_design.uniform_at``
  set to the budgets (``--no-uniform-arms``: empty): every method's largest uniform plan
  under each budget first (:func:`~autodecomp.search.uniform_arms.budget_arms`, never
  pruned), then the allocation ladder (``initial_design``), then the sampler and its pruner
  (``sampler.pruner``);
- **uniform**: the uniform sweep a user would run: round by round, for each budget and
  method, the next-dearest uniform plan under the budget, as many as fit in the seconds.

Then, per budget (``--budgets``, fractions of the dense MACs), each arm's best trial under
the budget by its own validation accuracy is exported with ``autodecomp export``'s fine-tune
(:func:`~autodecomp.ship.export.export_trial`, ``--finetune-epochs``) and evaluated on the
test split. With ``--shortlist K`` the search arm exports as ``autodecomp export --best
--shortlist K`` does: its K most accurate trials under the budget are each fine-tuned and the
one most accurate on validation afterwards is kept; those fine-tunes count against its
seconds, and the sweep then runs for as many seconds as the search spent in all (the column
``no shortlist``: what the search's first pick alone scores, exported after the fact, not
timed). Hypervolume (validation accuracy vs MACs) stays as a secondary figure.

A seed is the study's seed: data split, baseline (trained once per seed and cached in the
study's ``cache/``), trial seeds and sampler seed. Seeds are drawn fresh unless given with
``--seed-list`` and are printed so a run can be repeated. Prints a row per seed and budget,
then per budget: the share of seeds where the search's test accuracy is >= the uniform
sweep's (an arm without a completed trial under the budget loses to one with a model; a
seed where neither has one is left out), the mean margin, and each arm's wall-clock
(``--markdown``: the table for the docs):

    python bench/search_quality.py --seeds 10 --seconds 60 --set sampler.pruner=successive_halving
    python bench/search_quality.py --seeds 4 --jobs 2 --seconds 60   # two seeds at a time
    python bench/search_quality.py --seed-list 11 12 --budgets 0.1 0.2 --seconds 40
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing
import random
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch
from optuna.trial import FrozenTrial, TrialState

from autodecomp.config import StudyConfig, load_config
from autodecomp.config.samplers import make_pruner
from autodecomp.results.front import hypervolume
from autodecomp.search.allocate import Ladder, allocation_ladder
from autodecomp.search.baseline import Baseline, load_baseline
from autodecomp.search.objective import CATCH, Objective
from autodecomp.search.options import offered_methods
from autodecomp.search.study import Prepared, make_sampler, prepare
from autodecomp.search.uniform_arms import budget_arms, uniform_arms, uniform_tracks
from autodecomp.ship.export import export_trial


def _seeded(cfg: StudyConfig, seed: int, folder: Path, arm: str) -> StudyConfig:
    """The study config of one arm and seed: its own study in ``folder``'s SQLite file."""
    sampler = dataclasses.replace(cfg.sampler, seed=seed)
    if arm == "uniform":
        sampler = dataclasses.replace(sampler, pruner="none")
    return dataclasses.replace(
        cfg,
        seed=seed,
        sampler=sampler,
        name=f"{arm}-{seed}",
        storage=f"sqlite:///{folder / 'quality.db'}",
    )


def _study(cfg: StudyConfig, baseline: Baseline) -> optuna.Study:
    study = optuna.create_study(
        study_name=cfg.name,
        storage=cfg.storage,
        directions=cfg.directions,
        sampler=make_sampler(cfg.sampler),
        pruner=make_pruner(cfg.sampler, cfg.proxy.steps),
    )
    study.set_user_attr("config", cfg.to_dict())
    study.set_user_attr("baseline", baseline.info())
    study.set_user_attr("limits", cfg.budgets.limits(baseline.macs, baseline.params))
    return study


def _run_arm(
    cfg: StudyConfig,
    prepared: Prepared,
    baseline: Baseline,
    budgets: list[float],
    seconds: float,
    *,
    sweep: bool,
) -> tuple[optuna.Study, float]:
    """Run one arm for ``seconds`` of CPU time (the clock starts before the objective is
    built); returns the study and the CPU seconds spent. ``sweep``: every uniform plan under
    the budgets, round by round, and nothing else; otherwise the study's search (its
    ``initial_design.uniform_at`` arms first, then the allocation ladder and the sampler)."""
    start = time.process_time()
    objective = Objective(cfg, prepared.space, baseline, prepared.splits)
    study = _study(cfg, baseline)
    if sweep:
        methods = offered_methods(prepared.space)
        candidates = uniform_tracks(
            baseline.model, prepared.space, objective.cost, methods, objective.limits
        )
        arms = uniform_arms(candidates, budgets, rounds=None)
    else:
        arms = budget_arms(
            baseline.model, prepared.space, objective.cost, cfg.initial_design.uniform_at,
            objective.limits,
        )  # fmt: skip
    for label, params in arms:
        study.enqueue_trial(params, user_attrs={"warm_start": label})
    callbacks = []
    if not sweep and cfg.initial_design.plans > 0:
        rungs = allocation_ladder(
            cfg, prepared.space, baseline, prepared.splits, cfg.initial_design.grid
        )
        accuracy = cfg.objectives.index("accuracy")
        climb = Ladder(rungs, cfg.initial_design.plans, accuracy, baseline.accuracy)
        climb.store(study)
        callbacks.append(climb)

    def stop(study: optuna.Study, _trial: FrozenTrial) -> None:
        if time.process_time() - start >= seconds:
            study.stop()

    trials = len(arms) if sweep else None  # the uniform sweep ends with its plans
    if time.process_time() - start < seconds:
        study.optimize(objective, trials, catch=CATCH, callbacks=[*callbacks, stop])
    return study, time.process_time() - start


def _ranked_under(study: optuna.Study, cfg: StudyConfig, budget: float) -> list[FrozenTrial]:
    """Completed trials within ``budget`` x the dense MACs, most accurate (validation) first."""
    accuracy = cfg.objectives.index("accuracy")
    within = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not t.user_attrs.get("over_budget") and t.user_attrs["macs_ratio"] <= budget
    ]
    return sorted(within, key=lambda t: (-t.values[accuracy], t.user_attrs["macs"], t.number))


@dataclasses.dataclass(frozen=True)
class Pick:
    """One arm's model at one budget: the exported trial and its test accuracy."""

    trial: FrozenTrial | None
    test: float
    shortlist: tuple[int, ...] = ()
    candidates: str = ""  # each candidate's validation accuracy after the fine-tune / in the search


def _exported(
    cfg: StudyConfig, ranked: list[FrozenTrial], folder: Path, epochs: int, shortlist: int
) -> Pick:
    """``autodecomp export --best [--shortlist K]`` of the ``ranked`` trials: the first, or
    the most accurate on validation after the fine-tune of the first ``shortlist``."""
    if not ranked:
        return Pick(None, float("nan"))
    numbers = [t.number for t in ranked[:shortlist]]
    path = folder / f"{cfg.name}-{numbers[0]}.pt"
    if path.exists():
        path.unlink()
    out = export_trial(cfg, numbers, path, finetune_epochs=epochs)
    kept = next(t for t in ranked if t.number == out.meta["source"]["trial"])
    listed = tuple(numbers) if len(numbers) > 1 else ()
    candidates = " ".join(
        f"#{c['trial']}:{c['val_accuracy']:.4f}/{c['search_val_accuracy']:.4f}"
        for c in out.meta["source"].get("shortlist", [])
    )
    return Pick(kept, float(out.meta["metrics"]["test_accuracy"]), listed, candidates)


def _counts(study: optuna.Study) -> dict[str, int]:
    states = pd.Series([t.state.name for t in study.trials]).value_counts()
    rung = sum(t.user_attrs.get("pruned_at") == "rung" for t in study.trials)
    return {"trials": int(states.get("COMPLETE", 0) + states.get("PRUNED", 0)), "rung_pruned": rung}


def _one_seed(
    cfgs: dict[str, StudyConfig], seed: int, args: argparse.Namespace, folder: Path
) -> list[dict[str, Any]]:
    configs = {arm: _seeded(cfg, seed, folder, arm) for arm, cfg in cfgs.items()}
    prepared = {arm: prepare(cfg) for arm, cfg in configs.items()}
    baseline = load_baseline(
        configs["uniform"], prepared["uniform"].model, prepared["uniform"].splits
    )
    runs = {
        "search": _run_arm(
            configs["search"], prepared["search"], baseline, args.budgets, args.seconds,
            sweep=False,
        ),
    }  # fmt: skip
    picks: dict[str, dict[float, Pick]] = {"search": {}, "uniform": {}}
    start = time.process_time()
    searched = {b: _ranked_under(runs["search"][0], configs["search"], b) for b in args.budgets}
    for budget in args.budgets:  # the search's shortlist fine-tunes count against its seconds
        picks["search"][budget] = _exported(
            configs["search"], searched[budget], folder, args.finetune_epochs, args.shortlist
        )
    shortlisting = time.process_time() - start if args.shortlist > 1 else 0.0
    search, spent = runs["search"]
    runs["search"] = search, spent + shortlisting
    runs["uniform"] = _run_arm(
        configs["uniform"], prepared["uniform"], baseline, args.budgets,
        args.seconds + shortlisting, sweep=True,
    )  # fmt: skip
    for budget in args.budgets:
        ranked = _ranked_under(runs["uniform"][0], configs["uniform"], budget)
        picks["uniform"][budget] = _exported(
            configs["uniform"], ranked, folder, args.finetune_epochs, 1
        )
    cfg = configs["search"]
    accuracy = cfg.objectives.index("accuracy")
    info = {arm: {**_counts(s), "hv": hypervolume(s), "s": sec} for arm, (s, sec) in runs.items()}
    lines = [  # printed together at the end: seeds run side by side with --jobs
        f"seed {seed}: baseline val accuracy {baseline.accuracy:.4f}; "
        + "; ".join(
            f"{arm} {i['trials']} trials ({i['rung_pruned']} pruned at a rung), "
            f"HV {i['hv']:.4f}, {i['s']:.0f} s"
            for arm, i in info.items()
        )
        + (f" (shortlists {shortlisting:.0f} s)" if shortlisting else "")
    ]
    rows: list[dict[str, Any]] = []
    for budget in args.budgets:
        row: dict[str, Any] = {"seed": seed, "budget": budget}
        for arm in runs:
            pick = picks[arm][budget]
            best = pick.trial
            row[f"{arm}_test"] = pick.test
            row[f"{arm}_val"] = float("nan") if best is None else best.values[accuracy]
            row[f"{arm}_macs"] = float("nan") if best is None else best.user_attrs["macs_ratio"]
            row[f"{arm}_pick"] = "-" if best is None else _label(best)
            row[f"{arm}_shortlist"] = " ".join(f"#{n}" for n in pick.shortlist)
            row[f"{arm}_candidates"] = pick.candidates
            row[f"{arm}_s"] = info[arm]["s"]
            row[f"{arm}_trials"] = info[arm]["trials"]
            row[f"{arm}_hv"] = info[arm]["hv"]
        row["margin"] = row["search_test"] - row["uniform_test"]
        if args.shortlist > 1:  # the same search's pick without the shortlist (not timed)
            kept, first = picks["search"][budget], searched[budget][:1]
            row["top1_test"] = (
                kept.test
                if not first or (kept.trial is not None and kept.trial.number == first[0].number)
                else _exported(configs["search"], first, folder, args.finetune_epochs, 1).test
            )
        rows.append(row)
        listed = f" of {row['search_shortlist']}" if row["search_shortlist"] else ""
        lines.append(
            f"  budget {budget:.0%}: search test {row['search_test']:.4f} (val "
            f"{row['search_val']:.4f}, MACs {row['search_macs']:.3f}, {row['search_pick']}"
            f"{listed}) | uniform test {row['uniform_test']:.4f} (val {row['uniform_val']:.4f}, "
            f"MACs {row['uniform_macs']:.3f}, {row['uniform_pick']}) | margin "
            f"{row['margin']:+.4f}"
            + (
                f" | search without the shortlist {row['top1_test']:.4f}"
                if "top1_test" in row
                else ""
            )
        )
    print("\n".join(lines), flush=True)
    return rows


def _seed_rows(
    cfgs: dict[str, StudyConfig], seed: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """:func:`_one_seed` with one torch thread, in a temporary folder of its own."""
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        return _one_seed(cfgs, seed, args, Path(tmp))


def _label(trial: FrozenTrial) -> str:
    """``#N`` and where the trial came from (a uniform arm, a ladder rung, the sampler)."""
    source = str(trial.user_attrs.get("warm_start", "sampled"))
    return f"#{trial.number} {source}"


def _share_at_least(searched: pd.Series, swept: pd.Series, margin: pd.Series) -> str:
    """Share of seeds where the search has a model and the sweep none, or a margin >= 0."""
    return f"{(searched & (~swept | (margin >= 0))).mean():.0%}"


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per budget: seeds (where either arm has a model under it), share of seeds search >=
    uniform on test accuracy (an arm without a model under the budget loses to one with a
    model: a user gets nothing there), mean margin where both have one, mean test
    accuracies, mean wall-clock of each arm, mean hypervolumes; with a shortlist, the share
    and margin the search's first pick alone would have had."""
    rows = []
    measured = frame.dropna(subset=["search_test", "uniform_test"], how="all")
    for budget, part in measured.groupby("budget"):
        searched, swept = part.search_test.notna(), part.uniform_test.notna()
        rows.append({
            "budget": f"{budget:.0%}",
            "seeds": len(part),
            "search >= uniform": _share_at_least(searched, swept, part.margin),
            "mean margin": f"{part.margin.mean():+.4f}",
            "no model (search/uniform)": f"{(~searched).sum()}/{(~swept).sum()}",
            "search test": f"{part.search_test.mean():.4f}",
            "uniform test": f"{part.uniform_test.mean():.4f}",
            "search s": f"{part.search_s.mean():.0f}",
            "uniform s": f"{part.uniform_s.mean():.0f}",
            "search HV": f"{part.search_hv.mean():.4f}",
            "uniform HV": f"{part.uniform_hv.mean():.4f}",
        })  # fmt: skip
        if "top1_test" in part:  # the search's own pick without the shortlist
            top1 = part.top1_test - part.uniform_test
            rows[-1] |= {"no shortlist >= uniform": _share_at_least(searched, swept, top1),
                         "no shortlist margin": f"{top1.mean():+.4f}"}  # fmt: skip
    return pd.DataFrame(rows)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="studies/digits/study.yaml")
    parser.add_argument("--seeds", type=int, default=3, help="fresh seeds to draw")
    parser.add_argument("--seed-list", type=int, nargs="*", help="these seeds instead")
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.05, 0.1, 0.2, 0.4])
    parser.add_argument("--seconds", type=float, default=60.0, help="CPU seconds of each arm")
    parser.add_argument("--finetune-epochs", type=int, default=2, help="as autodecomp export's")
    parser.add_argument(
        "--shortlist",
        type=int,
        default=1,
        help="the search arm exports as `autodecomp export --best --shortlist K` does; the "
        "shortlist's fine-tunes count against its seconds (the sweep gets as many more)",
    )
    parser.add_argument(
        "--no-uniform-arms",
        dest="uniform_arms",
        action="store_false",
        help="the search does not start with each method's best uniform plan per budget",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--search-set",
        dest="search_overrides",
        action="append",
        default=[],
        help="KEY=VALUE for the search arm only (e.g. sampler.pruner=..., space.init=data)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="seeds run side by side in this many processes (each one thread; CPU seconds "
        "are per process, so a seed's arms get the same seconds either way)",
    )
    parser.add_argument("--csv", help="also write the per-seed rows here")
    parser.add_argument("--markdown", action="store_true", help="print the summary as markdown")
    args = parser.parse_args()
    seeds = args.seed_list or [
        random.SystemRandom().randrange(1000, 10**6) for _ in range(args.seeds)
    ]
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    arms = f"initial_design.uniform_at={list(args.budgets) if args.uniform_arms else []}"
    cfgs = {
        "search": load_config(args.study, [*args.overrides, arms, *args.search_overrides]),
        "uniform": load_config(args.study, args.overrides),
    }
    cfg = cfgs["search"]
    given = [f"--set {o}" for o in args.overrides]
    given += [f"--search-set {o}" for o in args.search_overrides]
    print(
        f"study {args.study} {' '.join(given)}: seeds "
        f"{' '.join(map(str, seeds))} (repeat with --seed-list); budgets {args.budgets}; "
        f"{args.seconds:.0f} s per arm; sampler {cfg.sampler.name}, pruner "
        f"{cfg.sampler.pruner}; proxy {cfg.proxy.steps} steps; export fine-tune "
        f"{args.finetune_epochs} epochs; search shortlist {args.shortlist}",
        flush=True,
    )
    rows = []
    if args.jobs > 1:  # seeds side by side, one process (one torch thread) each
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
            for part in pool.map(_seed_rows, repeat(cfgs), seeds, repeat(args)):
                rows += part
    else:
        for seed in seeds:
            rows += _seed_rows(cfgs, seed, args)
    frame = pd.DataFrame(rows)
    if args.csv:
        frame.to_csv(args.csv, index=False)
    table = summary(frame)
    print()
    print(
        table.to_markdown(index=False, disable_numparse=True)
        if args.markdown
        else table.to_string(index=False)
    )


if __name__ == "__main__":
    main()
