"""Proxy fidelity: how well each cheap score ranks candidates like a longer fine-tune does.

Runs ``--trials`` trials of a study (default: the shipped digits study; random sampler for
a spread of candidates) in memory with its own proxy, every pruning gate off (the accuracy
at ``floor_step`` is still recorded), then fine-tunes a sample of the trained plans again
for ``--long-steps`` distillation steps and prints Kendall's tau-b between each cheap proxy
and that longer fine-tune's accuracy (errors negated: +1 = same order):

    python bench/proxy_correlation.py                          # digits, 40 trials, 16 sampled
    python bench/proxy_correlation.py --trials 60 --sample 24 --long-steps 800

Also printed: how many sampled candidates the study's gates (``accuracy_floor`` at
``floor_step``, and ``--max-output-error`` when given) would have dropped, how much
fine-tune time that would save, and the rank (by the long fine-tune) of the best dropped one.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import optuna
import pandas as pd
import torch

from autodecomp.config import StudyConfig, load_config
from autodecomp.results.proxy_stats import PROXIES, kendall_frame, proxy_frame
from autodecomp.search.baseline import load_baseline
from autodecomp.search.objective import CATCH, Objective
from autodecomp.search.study import make_sampler, prepare


def _study(cfg: StudyConfig, baseline, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """An in-memory study carrying the attributes the report functions read."""
    study = optuna.create_study(directions=cfg.directions, sampler=sampler)
    study.set_user_attr("config", cfg.to_dict())
    study.set_user_attr("baseline", baseline.info())
    study.set_user_attr("limits", cfg.budgets.limits(baseline.macs, baseline.params))
    return study


def _gates(
    joined: pd.DataFrame, cfg: StudyConfig, max_output_error: float | None, seconds: float
) -> list[str]:
    """What the gates would have dropped among the sampled candidates, and the time saved.

    ``seconds`` is the mean time of a trained trial; a candidate dropped at ``floor_step``
    saves the rest of its fine-tune, one dropped by the output error all of it.
    """
    p, lines = cfg.proxy, []
    rank = joined["long_accuracy"].rank(ascending=False, method="min")
    gates = []
    if p.accuracy_floor > 0:
        gates.append((f"accuracy_floor {p.accuracy_floor} at step {p.floor_step}",
                      joined["floor_accuracy"] < p.accuracy_floor,
                      1 - p.floor_step / p.steps))  # fmt: skip
    if max_output_error is not None:
        gates.append((f"output error > {max_output_error}",
                      joined["output_error"] > max_output_error, 1.0))  # fmt: skip
    for name, dropped, share in gates:
        count = int(dropped.sum())
        text = f"gate {name}: drops {count}/{len(joined)} sampled candidates"
        if count:
            text += (
                f", saving about {count * share * seconds:.1f} s of "
                f"{len(joined) * seconds:.1f} s; the best dropped one is "
                f"#{int(rank[dropped].min())} of {len(joined)} by the long fine-tune"
            )
        lines.append(text)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="studies/digits/study.yaml")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--sample", type=int, default=16, help="trained trials fine-tuned again")
    parser.add_argument("--long-steps", type=int, default=600)
    parser.add_argument("--sampler", default="random")
    parser.add_argument("--max-output-error", type=float, default=None, help="gate to evaluate")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    cfg = load_config(args.study, args.overrides)
    gated = cfg.proxy
    short = dataclasses.replace(
        cfg,
        proxy=dataclasses.replace(gated, accuracy_floor=0.0, max_output_error=None),
        sampler=dataclasses.replace(cfg.sampler, name=args.sampler, options={}),
    )
    long = dataclasses.replace(short, proxy=dataclasses.replace(short.proxy, steps=args.long_steps))
    prepared = prepare(short)
    baseline = load_baseline(short, prepared.model, prepared.splits)

    start = time.perf_counter()
    study = _study(short, baseline, make_sampler(short.sampler))
    study.optimize(
        Objective(short, prepared.space, baseline, prepared.splits), args.trials, catch=CATCH
    )
    short_seconds = time.perf_counter() - start
    frame = proxy_frame(study).dropna(subset=["accuracy"])
    picks = np.linspace(0, len(frame) - 1, min(args.sample, len(frame))).round().astype(int)
    sampled = frame.iloc[sorted(set(picks))]

    start = time.perf_counter()
    again = _study(long, baseline, optuna.samplers.RandomSampler(seed=0))
    trials = {t.number: t for t in study.trials}
    for number in sampled["number"]:
        again.enqueue_trial(trials[int(number)].params)
    again.optimize(
        Objective(long, prepared.space, baseline, prepared.splits), len(sampled), catch=CATCH
    )
    long_seconds = time.perf_counter() - start
    long_accuracy = [t.values[long.objectives.index("accuracy")] for t in again.trials]
    joined = sampled.assign(long_accuracy=long_accuracy, short_finetune=sampled["accuracy"])

    table = kendall_frame(joined, target="long_accuracy", proxies=[*PROXIES, "short_finetune"])
    table.loc[table.proxy == "short_finetune", "label"] = f"short fine-tune ({short.proxy.steps})"
    trained = frame["seconds"].mean()
    print(
        f"study {args.study}: {len(study.trials)} trials ({args.sampler}), {len(frame)} trained "
        f"with {short.proxy.steps} steps ({short_seconds:.0f} s, {trained:.2f} s per trained "
        f"trial); {len(sampled)} sampled and fine-tuned for {args.long_steps} steps "
        f"({long_seconds:.0f} s); long-fine-tune accuracy {min(long_accuracy):.4f}.."
        f"{max(long_accuracy):.4f}, baseline {baseline.accuracy:.4f}"
    )
    print(f"{'proxy':<40}{'n':>4}{'tau':>8}{'p':>10}")
    for _, row in table.iterrows():
        print(f"{row['label']:<40}{row['n']:>4}{row['tau']:>+8.3f}{row['p_value']:>10.3g}")
    cfg_gates = dataclasses.replace(short, proxy=gated)
    for line in _gates(joined, cfg_gates, args.max_output_error, trained):
        print(line)


if __name__ == "__main__":
    main()
