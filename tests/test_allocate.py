"""The zero-training initial design: the (MACs, summed error) front and the enqueued plans."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import random
import shutil
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import FixedTrial
from tiny_study import logged, make_study, tiny_config

from autodecomp.cli import main
from autodecomp.compress.surgery import apply_plan
from autodecomp.config import ProxyConfig, load_config
from autodecomp.measure.cost import count_macs, count_params
from autodecomp.measure.plan_cost import PlanCost
from autodecomp.search.allocate import (
    Ladder,
    Option,
    Rung,
    _uniform_error,
    allocation_ladder,
    dense_option,
    error_front,
    layer_options,
    minimax_plans,
)
from autodecomp.search.baseline import load_baseline
from autodecomp.search.objective import CATCH, Objective
from autodecomp.search.proxies import Calibration, calibration_batch
from autodecomp.search.space import SearchSpace, suggest_plan, uniform_params
from autodecomp.search.study import prepare

STUDY = tiny_config(
    space={"methods": ["tucker", "tt"]},
    proxy={"steps": 3, "batch_size": 32, "bn_batches": 1, "calibration_size": 32},
    budgets={"max_macs": 0.7},
    trials=4,
    initial_design={"plans": 3, "grid": 5},
)


def _options(rng: random.Random, count: int) -> list[Option]:
    return [Option({}, rng.randrange(1, 50), 0, round(rng.random(), 3)) for _ in range(count)]


def _brute_front(layers: list[list[Option]]) -> list[tuple[int, float]]:
    points = sorted(
        (sum(o.macs for o in combo), sum(o.error for o in combo))
        for combo in itertools.product(*layers)
    )
    front: list[tuple[int, float]] = []
    for macs, error in points:
        if not front or error < front[-1][1] - 1e-12:
            front.append((macs, error))
    return front


def test_error_front_is_the_exact_pareto_front():
    rng = random.Random(0)
    layers = [_options(rng, n) for n in (4, 6, 5)]
    front = error_front({f"l{i}": opts for i, opts in enumerate(layers)})
    expected = _brute_front(layers)
    assert [(m, round(e, 9)) for m, e, _ in front] == [(m, round(e, 9)) for m, e in expected]
    for macs, error, picks in front:  # each point's choice adds up to its totals
        assert sum(layers[i][p].macs for i, p in enumerate(picks)) == macs
        assert sum(layers[i][p].error for i, p in enumerate(picks)) == pytest.approx(error)


def test_error_front_thinning_keeps_both_ends():
    rng = random.Random(1)
    layers = {f"l{i}": _options(rng, 12) for i in range(4)}
    full = error_front(layers)
    thin = error_front(layers, keep_at_most=5)
    assert len(full) > 5 and len(thin) == 5
    assert thin[0][:2] == full[0][:2] and thin[-1][:2] == full[-1][:2]


def test_minimax_plans_give_the_least_worst_error_at_their_macs():
    rng = random.Random(2)
    layers = [_options(rng, n) for n in (4, 6, 5)]
    plans = minimax_plans({f"l{i}": opts for i, opts in enumerate(layers)})
    combos = list(itertools.product(*layers))
    assert [m for m, _, _ in plans] == sorted({m for m, _, _ in plans})  # distinct, cheapest first
    for macs, worst, picks in plans:
        chosen = [layers[i][p] for i, p in enumerate(picks)]
        assert sum(o.macs for o in chosen) == macs and max(o.error for o in chosen) == worst
        # no plan of at most these MACs has a smaller worst error (brute force)
        assert worst == min(
            max(o.error for o in c) for c in combos if sum(o.macs for o in c) <= macs
        )
    # the cheapest plan is the cheapest option everywhere, the dearest the least-error one
    assert plans[0][0] == sum(min(o.macs for o in opts) for opts in layers)
    assert plans[-1][1] == max(min(o.error for o in opts) for opts in layers)


def test_proxy_warmup_defaults_to_a_tenth_of_the_steps():
    assert ProxyConfig(steps=80).warmup == 8
    assert ProxyConfig(steps=9).warmup == 0
    assert ProxyConfig(steps=80, warmup_steps=0).warmup == 0
    assert ProxyConfig(steps=10, warmup_steps=50).warmup == 10


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory.mktemp("alloc"), STUDY).parent


def test_allocation_ladder_fits_the_budget_cheapest_first(template):
    cfg = load_config(template / "study.yaml")
    prepared = prepare(cfg)
    baseline = load_baseline(cfg, prepared.model, prepared.splits)
    rungs = allocation_ladder(cfg, prepared.space, baseline, prepared.splits, 5)
    assert rungs == allocation_ladder(cfg, prepared.space, baseline, prepared.splits, 5)
    assert len(rungs) >= 5
    shape = baseline.input_shape
    ratios = [rung.macs for rung in rungs]
    assert {rung.track for rung in rungs} == {"front"}  # no uniform tracks by default
    assert ratios == sorted(ratios) and len(set(ratios)) == len(ratios)
    assert ratios[-1] <= 0.7
    for ratio, params, _ in rungs:  # the stored ratio is the plan's fvcore count
        model = apply_plan(baseline.model, suggest_plan(FixedTrial(params), prepared.space))
        assert count_macs(model, shape) == pytest.approx(ratio * baseline.macs, abs=0.5)
        assert count_params(model) < baseline.params
    # the first rung is the cheapest option on every layer: nothing in the space is cheaper
    cheapest = {}
    for layer in prepared.space.layers:
        for method in layer.choices:
            plan = {layer.name: {"method": method, "ratio": layer.ratio.lo}}
            if method == "keep":
                plan = {layer.name: {"method": "keep"}}
            cost = count_macs(apply_plan(baseline.model, plan), shape)
            cheapest[layer.name] = min(cheapest.get(layer.name, cost), cost)
    floor = baseline.macs - sum(baseline.macs - c for c in cheapest.values())
    assert ratios[0] * baseline.macs == pytest.approx(floor, abs=0.5)


@pytest.mark.parametrize("score", ["layer", "network"])
def test_layer_options_score_layer_or_network_errors(template, score):
    cfg = load_config(template / "study.yaml")
    prepared = prepare(cfg)
    baseline = load_baseline(cfg, prepared.model, prepared.splits)
    model, space = baseline.model, prepared.space
    cost = PlanCost(model, baseline.input_shape, space.names)
    inputs = calibration_batch(prepared.splits.train, 32, cfg.seed)
    calibration = Calibration(model, inputs, "cpu")
    dense = {layer.name: dense_option(model, cost, layer) for layer in space.layers}
    options = layer_options(model, space, cost, calibration, 3, dense, score)
    checked = 0
    for layer in space.layers:
        assert options[layer.name][0] == dense[layer.name]  # keep first, error 0
        for option in options[layer.name][1:]:
            plan = suggest_plan(FixedTrial(option.params), SearchSpace((layer,)))
            compressed = apply_plan(model, plan)
            if score == "network":
                error = calibration.output_errors(compressed)["output_error"]
            else:
                error = calibration.layer_output_errors(compressed, [layer.name])[layer.name]
            assert option.error == pytest.approx(error, rel=1e-6)
            assert option.macs == count_macs(compressed, baseline.input_shape) - (
                baseline.macs - dense[layer.name].macs
            )
            checked += 1
    assert checked >= 6


def _rungs(*ratios: float) -> list[tuple[float, dict]]:
    return [(r, {"x": r}) for r in ratios]


def _done(rung: int | None, macs: float, accuracy: float, total: int = 7):
    attrs = {"macs_ratio": macs, "over_budget": False}
    if rung is not None:
        attrs["warm_start"] = f"allocation {rung + 1}/{total}"
    return optuna.trial.create_trial(values=[accuracy, macs], user_attrs=attrs)


def test_ladder_fills_the_largest_gap_of_the_staircase():
    ladder = Ladder(_rungs(0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.6), 5, 0, 0.97)
    assert ladder.next_rung([]) == 0  # the cheapest first
    # below the baseline's accuracy: the gap above reaches the dearest rung -> its middle
    trials = [_done(0, 0.1, 0.80)]
    assert ladder.next_rung(trials) == 4  # 0.3 is nearest to (0.1 + 0.6) / 2
    # [0.1, 0.3] rises 0.8 -> 0.96 (area 0.032); above 0.3 only to 0.97 (0.003)
    trials.append(_done(4, 0.3, 0.96))
    assert ladder.next_rung(trials) == 2  # 0.2: the middle of [0.1, 0.3]
    # a point that does not raise the staircase closes its gap; a sampler's trial counts too
    trials += [_done(2, 0.2, 0.79), _done(None, 0.25, 0.965)]
    # gaps: [0.1, 0.2] 0; [0.2, 0.25] 0.05 * 0.165 but no rung inside; [0.25, 0.3] 0;
    # above 0.3: 0.3 * (0.97 - 0.965) -> the rung nearest 0.45
    assert ladder.next_rung(trials) == 5
    trials.append(_done(5, 0.4, 0.975))
    # above the baseline's accuracy the plateau is closed; [0.1, 0.2] is free but flat
    assert ladder.next_rung(trials) is None
    # the plan count bounds the rungs tried
    assert Ladder(ladder.rungs, 2, 0, 0.97).next_rung(trials[:2]) is None
    assert Ladder(ladder.rungs, 3, 0, 0.97).next_rung(trials[:2]) == 2


def test_ladder_callback_keeps_one_rung_waiting():
    study = optuna.create_study(directions=["maximize", "minimize"])
    ladder = Ladder(_rungs(0.1, 0.3, 0.6), 3, 0, 0.97)
    ladder.store(study)
    assert [t.state.name for t in study.trials] == ["WAITING"]
    ladder(study, study.trials[0])  # one is waiting: nothing more
    assert len(study.trials) == 1
    assert Ladder.from_study(study, 0).rungs == ladder.rungs


def test_search_enqueues_the_design_once_and_resumes_older_studies(template, tmp_path, capsys):
    folder = tmp_path / "tiny"
    shutil.copytree(template, folder)
    study_yaml = folder / "study.yaml"
    assert main(["search", str(study_yaml), "--trials", "4"]) == 0
    out = capsys.readouterr().out
    assert "allocation ladder: " in out and "up to 3 trials climb it" in out
    storage = f"sqlite:///{folder / 'study.db'}"
    study = optuna.load_study(study_name="tiny", storage=storage)
    labels = [t.user_attrs.get("warm_start", "") for t in study.trials]
    assert labels[0].startswith("allocation 1/")  # the cheapest rung first
    assert [label.startswith("allocation ") for label in labels] == [True] * 3 + [False]
    assert len(set(labels[:3])) == 3
    tracks = {rung[2] for rung in study.user_attrs["allocation_ladder"]["rungs"]}
    assert all(label.split()[2] in tracks for label in labels[:3])  # each names its track
    # the design is part of the config: changing it on resume is refused
    assert main(["search", str(study_yaml), "--set", "initial_design.grid=6"]) == 2
    assert "initial_design.grid=5, now 6" in capsys.readouterr().err
    # a study stored by a version without `initial_design` / `proxy.warmup_steps` resumes
    # under a config that leaves them at their defaults
    config = json.loads(json.dumps(study.user_attrs["config"]))
    del config["initial_design"]
    del config["proxy"]["warmup_steps"]
    study.set_user_attr("config", config)
    assert main(["search", str(study_yaml), "--trials", "5", "--set", "initial_design=2"]) == 2
    assert main(["search", str(study_yaml), "--trials", "5", "--set", "initial_design={}"]) == 0
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert len(study.trials) == 5
    assert sum("warm_start" in t.user_attrs for t in study.trials) == 3


def _track(track: str, *ratios: float) -> list[Rung]:
    return [Rung(r, {"x": r, "track": track}, track) for r in ratios]


def test_ladder_probes_each_track_then_fills_gaps_from_every_track():
    rungs = _track("front", 0.1, 0.18, 0.4) + _track("pdp", 0.12, 0.2, 0.3, 0.45)
    rungs += _track("cp", 0.11, 0.21, 0.35)
    ladder = Ladder(rungs, 8, 0, 0.97)
    assert Ladder.probe_level(rungs) == pytest.approx(0.1**0.75 * 0.4**0.25)  # 0.1414
    assert ladder.next_rung([]) == 0  # the cheapest first
    trials = [_done(0, 0.1, 0.80, len(rungs))]
    # one probe per track, in track order, each the rung nearest 0.1414 in log-MACs
    for rung, macs, accuracy in [(1, 0.18, 0.90), (3, 0.12, 0.95), (7, 0.11, 0.93)]:
        assert ladder.next_rung(trials) == rung
        trials.append(_done(rung, macs, accuracy, len(rungs)))
    # the gap above 0.18 (rise 0.02 to the baseline over 0.27) is the largest and reaches the
    # dearest rung 0.45: nearest its middle 0.315 is pdp's 0.3
    assert ladder.next_rung(trials) == 5
    trials.append(_done(5, 0.3, 0.975, len(rungs)))
    # [0.18, 0.3] rises 0.025 (area 0.003): nearest 0.24 is cp's 0.21, whatever the track
    assert ladder.next_rung(trials) == 8
    trials.append(_done(8, 0.21, 0.96, len(rungs)))
    # [0.21, 0.3] (0.00135) and [0.1, 0.11] (0.0013) have no untried rung inside; then
    # [0.18, 0.21] (0.0003): pdp's 0.2
    assert ladder.next_rung(trials) == 4
    # a one-track ladder has no probes; stored rungs keep their tracks, old ones are "front"
    assert Ladder(_rungs(0.1, 0.3, 0.6), 3, 0, 0.97)._probes() == []
    study = optuna.create_study(directions=["maximize", "minimize"])
    ladder.store(study)
    assert Ladder.from_study(study, 0).rungs == rungs
    study.set_user_attr(Ladder.ATTR, {"rungs": [[0.1, {}]], "plans": 1, "baseline_accuracy": 1})
    assert Ladder.from_study(study, 0).rungs == [Rung(0.1, {}, "front")]


def test_uniform_error_interpolates_summed_errors_in_log_macs():
    def opts(method: str, *points: tuple[float, int, float]) -> list[Option]:
        return [
            Option({f"l/{method}/ratio": r, "l/method": method}, macs, 0, err, r)
            for r, macs, err in points
        ]

    dense = {name: Option({"l/method": "keep"}, 100, 0, 0.0) for name in ("a", "b")}
    layer = opts("m", (0.1, 10, 0.5), (0.5, 50, 0.1)) + opts("n", (0.1, 20, 0.3), (0.5, 60, 0.2))
    options = {name: [dense[name], *layer] for name in ("a", "b")}
    # m: (MACs 0.1 of the dense, summed error 1.0), (0.5, 0.2); n: (0.2, 0.6), (0.6, 0.4)
    assert _uniform_error(options, dense, "m", 0.1) == pytest.approx(1.0)
    assert _uniform_error(options, dense, "n", 0.1) == pytest.approx(0.6)  # clamped
    t = math.log(3) / math.log(5)
    assert _uniform_error(options, dense, "m", 0.3) == pytest.approx(1.0 - 0.8 * t)
    t = math.log(1.5) / math.log(3)
    assert _uniform_error(options, dense, "n", 0.3) == pytest.approx(0.6 - 0.2 * t)


def test_allocation_ladder_adds_uniform_tracks(template):
    cfg = load_config(template / "study.yaml", ["initial_design.tracks=2"])
    prepared = prepare(cfg)
    baseline = load_baseline(cfg, prepared.model, prepared.splits)
    with logged() as lines:
        rungs = allocation_ladder(cfg, prepared.space, baseline, prepared.splits, 5)
    tracks = list(dict.fromkeys(rung.track for rung in rungs))
    assert tracks[0] == "front" and sorted(tracks[1:]) == ["tt", "tucker"]
    assert f"uniform tracks {', '.join(tracks[1:])}" in lines[0]
    for track in tracks[1:]:
        uniform = [rung for rung in rungs if rung.track == track]
        assert [r.macs for r in uniform] == sorted({r.macs for r in uniform})
        for ratio, params, _ in uniform:  # every layer on the track's method, fvcore's MACs
            plan = suggest_plan(FixedTrial(params), prepared.space)
            assert {entry["method"] for entry in plan.values()} == {track}
            model = apply_plan(baseline.model, plan)
            assert count_macs(model, baseline.input_shape) == pytest.approx(
                ratio * baseline.macs, abs=0.5
            )
            assert ratio <= 0.7


def test_allocation_ladder_adds_the_balanced_track(template):
    cfg = load_config(template / "study.yaml", ["initial_design.balanced=true"])
    prepared = prepare(cfg)
    baseline = load_baseline(cfg, prepared.model, prepared.splits)
    rungs = allocation_ladder(cfg, prepared.space, baseline, prepared.splits, 5)
    balanced = [rung for rung in rungs if rung.track == "balanced"]
    front = [rung for rung in rungs if rung.track == "front"]
    assert list(dict.fromkeys(rung.track for rung in rungs)) == ["front", "balanced"]
    assert front == allocation_ladder(
        load_config(template / "study.yaml"), prepared.space, baseline, prepared.splits, 5
    )
    assert balanced and [r.macs for r in balanced] == sorted({r.macs for r in balanced})
    for ratio, params, _ in balanced:  # within the budget, fvcore's MACs
        model = apply_plan(baseline.model, suggest_plan(FixedTrial(params), prepared.space))
        assert count_macs(model, baseline.input_shape) == pytest.approx(
            ratio * baseline.macs, abs=0.5
        )
        assert ratio <= 0.7
    ladder = Ladder(rungs, plans=3, accuracy_index=0, baseline_accuracy=1.0)
    assert {rungs[i].track for i in ladder._probes()} == {"front", "balanced"}


def test_a_non_finite_kernel_fails_its_options_and_trials_not_the_study(template):
    """A NaN in conv3: the ladder leaves out conv3's options (keeps it dense) instead of
    crashing, and a trial whose plan decomposes conv3 FAILS with the reason; the next runs."""
    cfg = load_config(template / "study.yaml", ["proxy.calibration_size=0"])
    prepared = prepare(cfg)
    baseline = load_baseline(cfg, prepared.model, prepared.splits)
    broken = copy.deepcopy(baseline.model)
    with torch.no_grad():
        broken.conv3.weight[0, 0, 0, 0] = math.nan
    baseline = dataclasses.replace(baseline, model=broken)
    with logged() as lines:
        rungs = allocation_ladder(cfg, prepared.space, baseline, prepared.splits, 3)
    assert rungs and all(rung.params["conv3/method"] == "keep" for rung in rungs)
    assert any("conv2/method" in r.params and r.params["conv2/method"] != "keep" for r in rungs)
    left_out = next(line for line in lines if "left out" in line)
    assert "layer 'conv3': tucker cannot" in left_out or "layer 'conv3': tt cannot" in left_out
    assert "non-finite (NaN or inf) entries: 1 NaN, 0 Inf" in left_out

    study = optuna.create_study(directions=cfg.directions)
    study.enqueue_trial(uniform_params(prepared.space, "tucker", 0.3))
    study.enqueue_trial(uniform_params(prepared.space, "keep"))
    objective = Objective(cfg, prepared.space, baseline, prepared.splits)
    study.optimize(objective, n_trials=2, catch=CATCH)
    failed, other = study.trials
    assert failed.state == optuna.trial.TrialState.FAIL
    assert failed.user_attrs["fail_reason"].startswith(
        "DecompositionError: layer 'conv3': tucker cannot decompose a kernel with non-finite"
    )
    assert "non-finite" not in str(other.user_attrs.get("fail_reason"))
