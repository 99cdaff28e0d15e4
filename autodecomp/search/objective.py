"""One trial: plan -> compressed model -> cost and budget constraints -> proxy accuracy.

Per trial: draw a plan (:mod:`autodecomp.search.space`), count its MACs and parameters
from its structure (:class:`PlanCost` on :func:`~autodecomp.compress.surgery.skeleton`:
nothing is fitted), apply it to the baseline, measure latency when the study uses it
(:mod:`autodecomp.measure.latency`), and set one constraint per budget (``value / limit -
1``, <= 0 is feasible) before anything else can end the trial. A candidate over budget is
not trained, and its factors are not even fitted unless latency is measured: it returns
accuracy 0.0 with ``over_budget=True`` (the constraints already exclude it from the Pareto
front, and a zero keeps the samplers away from it) and ``rel_error`` None per layer.
Otherwise the fidelities rise step by step, and a hopeless candidate is dropped with
:class:`optuna.TrialPruned` as early as possible:

1. zero-training scores on the calibration batch (:mod:`autodecomp.search.proxies`); pruned
   (``pruned_at="output_error"``) when the whole-network output error exceeds
   ``proxy.max_output_error``;
2. BatchNorm recalibration and the pre-fine-tune accuracy;
3. distillation from the baseline; at ``floor_step`` the accuracy on ``floor_batches``
   validation batches is recorded, and the trial is pruned (``pruned_at="floor"``) when
   it is below ``accuracy_floor``;
4. with ``sampler.pruner``, at each of its rung steps the validation accuracy is recorded
   (``rung_accuracy``) and the pruner may stop the trial (``pruned_at="rung"``) when it
   trails the candidates of its MAC band (:mod:`autodecomp.search.fidelity`); enqueued
   trials (warm starts, allocation-ladder rungs, uniform arms) are measured but never
   stopped there;
5. the validation accuracy after the full ``steps``: the search's accuracy objective.

User attributes per trial: ``plan``, ``macs``, ``params``, ``macs_ratio`` and
``params_ratio`` (compressed / baseline), ``latency_ms`` (``{"cpu": ms[, "cuda": ms]}``,
when measured), ``over_budget``, ``layers`` (per layer or pruned shift block: method, rank
(a block's: its direction-group sizes), ratio, prune, rel_error = ||W_approx - W|| / ||W||,
output_error, macs, params), ``kernel_error`` and
``layer_output_error`` (means over the searched layers, kept ones counting 0),
``output_error`` and ``output_kl``, ``pre_ft_accuracy``, ``floor_accuracy``,
``rung_accuracy``, ``seconds``
(per phase), and ``pruned`` / ``pruned_at`` / ``fail_reason`` when the trial ends early.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna
from torch import nn
from torch.utils.data import Subset

from ..compress.calibration import collect_input_stats
from ..compress.surgery import apply_plan, skeleton
from ..config import StudyConfig
from ..config.samplers import make_pruner, rung_steps
from ..core.optuna_compat import set_constraints
from ..decompositions import DecompositionError, UnsupportedLayerError
from ..factorize.input_stats import InputStats
from ..measure.latency import LatencyMeter, structure_key
from ..measure.plan_cost import PlanCost
from ..workload import train
from ..workload.data import DataSplits, make_loader
from ..workload.proxy import proxy_finetune
from .baseline import Baseline
from .fidelity import rung_pruned
from .proxies import Calibration, calibration_batch, kernel_errors, mean_error
from .space import SearchSpace, data_init_supported, suggest_plan

__all__ = ["CATCH", "DATA_INIT_IMAGES", "Objective", "data_init_stats"]

# Exceptions that fail a single trial (recorded in ``fail_reason``) without stopping the study:
# a failed factorisation, a layer a method cannot take, a non-finite distillation loss.
CATCH = (DecompositionError, UnsupportedLayerError, FloatingPointError)


DATA_INIT_IMAGES = 256  # training images whose patch statistics fit ``init: data`` layers


def data_init_stats(
    cfg: StudyConfig, model: nn.Module, splits: DataSplits, names: list[str]
) -> dict[str, InputStats]:
    """Input statistics of the named convs for ``init: data`` plans: ``DATA_INIT_IMAGES``
    training images drawn with seed ``cfg.seed + 1`` (the search and an export replay
    use the same ones, so they build the same layers)."""
    inputs = calibration_batch(splits.train, DATA_INIT_IMAGES, cfg.seed + 1)
    batches = inputs.split(cfg.proxy.eval_batch_size)
    return collect_input_stats(model, names, batches, device=cfg.device)


class _Clock:
    """Accumulates wall-clock seconds per named phase."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - start

    def record(self) -> dict[str, float]:
        out = {k: round(v, 4) for k, v in self.phases.items()}
        out["total"] = round(time.perf_counter() - self.start, 4)
        return out


class Objective:
    """The callable handed to ``study.optimize``; returns values in ``cfg.objectives`` order."""

    def __init__(
        self, cfg: StudyConfig, space: SearchSpace, baseline: Baseline, splits: DataSplits
    ) -> None:
        self.cfg, self.space, self.baseline, self.splits = cfg, space, baseline, splits
        self.cost = PlanCost(baseline.model, baseline.input_shape, space.names)
        self.limits = cfg.budgets.limits(baseline.macs, baseline.params)
        p = cfg.proxy
        self.val_loader = make_loader(splits.val, batch_size=p.eval_batch_size, shuffle=False)
        floor_n = min(len(splits.val), p.floor_batches * p.eval_batch_size)
        self.floor_loader = make_loader(
            Subset(splits.val, range(floor_n)), batch_size=p.eval_batch_size, shuffle=False
        )
        self.calibration = None
        if p.calibration_size > 0:
            inputs = calibration_batch(splits.train, p.calibration_size, cfg.seed)
            self.calibration = Calibration(baseline.model, inputs, cfg.device)
        self.pruner = make_pruner(cfg.sampler, p.steps)
        self.rungs = rung_steps(cfg.sampler, p.steps)
        self.latency = None
        if cfg.measures_latency:
            self.latency = LatencyMeter(cfg.latency, baseline.input_shape, cfg.device)
        self._latency_study: str | None = None  # the study whose stored latencies are cached
        self.input_stats: dict[str, InputStats] | None = None
        if space.init == "data":
            names = [layer.name for layer in space.layers if data_init_supported(layer)]
            self.input_stats = data_init_stats(cfg, baseline.model, splits, names)

    def _values(self, accuracy: float, cost: dict[str, float]) -> tuple[float, ...]:
        named = {"accuracy": float(accuracy), **{k: float(v) for k, v in cost.items()}}
        return tuple(named[o] for o in self.cfg.objectives)

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        clock = _Clock()
        try:
            return self._run(trial, clock)
        except CATCH as err:
            trial.set_user_attr("fail_reason", f"{type(err).__name__}: {err}")
            raise
        finally:
            trial.set_user_attr("seconds", clock.record())

    def _measure_latency(
        self, trial: optuna.Trial, model: nn.Module, layers: dict[str, dict[str, Any]]
    ) -> dict[str, float]:
        """Latency of ``model`` (cached per structure); the baseline's is put on the study."""
        meter = self.latency
        assert meter is not None
        study = getattr(trial, "study", None)
        if study is not None and self._latency_study != study.study_name:
            self._latency_study = study.study_name
            for past in study.get_trials(deepcopy=False):
                attrs = past.user_attrs
                if attrs.get("latency_ms") and attrs.get("layers"):
                    meter.remember(structure_key(attrs["layers"]), attrs["latency_ms"])
            stored = study.user_attrs.get("baseline_latency_ms")
            if stored:
                meter.remember("baseline", stored)
            else:
                study.set_user_attr("baseline_latency_ms", meter(self.baseline.model, "baseline"))
        return meter(model, structure_key(layers))

    def _run(self, trial: optuna.Trial, clock: _Clock) -> tuple[float, ...]:
        base = self.baseline
        train.set_seed(self.cfg.seed + trial.number)  # the trial depends on its number only
        with clock("plan"):
            plan = suggest_plan(trial, self.space)
        trial.set_user_attr("plan", plan)
        with clock("count"):  # from the plan's structure alone: nothing is fitted yet
            macs, params, layers = self.cost(skeleton(base.model, plan), plan)
        cost: dict[str, float] = {"macs": macs, "params": params}
        model, latency, scores = None, None, {}
        if self.latency is not None or not self._over(cost):  # latency needs the factors
            with clock("decompose"):
                model = apply_plan(base.model, plan, calibration=self.input_stats)
        if self.latency is not None:
            with clock("latency"):
                latency = self._measure_latency(trial, model, layers)
            cost["latency"] = self.latency.value(latency)
        set_constraints(trial, {key: cost[key] / limit - 1.0 for key, limit in self.limits.items()})
        over = self._over(cost)
        if model is None:
            for record in layers.values():
                record["rel_error"] = None  # not fitted
        else:  # an over-budget candidate's factors are fitted for latency only
            with clock("proxy"):
                scores = self._scores(model, layers, trained=not over)
        with clock("record"):
            trial.set_user_attr("macs", macs)
            trial.set_user_attr("params", params)
            trial.set_user_attr("macs_ratio", macs / base.macs)
            trial.set_user_attr("params_ratio", params / base.params)
            if latency is not None:
                trial.set_user_attr("latency_ms", latency)
            trial.set_user_attr("over_budget", over)
            trial.set_user_attr("layers", layers)
            for key, value in scores.items():
                trial.set_user_attr(key, value)
        if over:
            return self._values(0.0, cost)
        limit = self.cfg.proxy.max_output_error
        if limit is not None and scores["output_error"] > limit:
            self._prune(
                trial, "output_error", f"output error {scores['output_error']:.3f} > {limit}"
            )
        return self._values(self._finetune(trial, model, clock), cost)

    def _over(self, cost: dict[str, float]) -> bool:
        """Whether a measured cost exceeds its budget (costs not measured yet do not)."""
        return any(cost[key] > limit for key, limit in self.limits.items() if key in cost)

    def _scores(
        self, model: nn.Module, layers: dict[str, dict[str, Any]], *, trained: bool
    ) -> dict[str, float]:
        """Zero-training scores; per-layer errors go into ``layers``.

        Kernel errors always; the calibration-batch output errors only for a candidate that
        will be trained (an over-budget one never is).
        """
        kernel = kernel_errors(self.baseline.model, model, layers)
        for name, record in layers.items():
            record["rel_error"] = kernel.get(name, 0.0)
        scores = {"kernel_error": mean_error(kernel, layers)}
        if self.calibration is None or not trained:
            return scores
        outputs = self.calibration.layer_output_errors(model, layers)
        for name, record in layers.items():
            record["output_error"] = outputs.get(name, 0.0)
        scores["layer_output_error"] = mean_error(outputs, layers)
        scores.update(self.calibration.output_errors(model))
        return scores

    def _finetune(self, trial: optuna.Trial, model: nn.Module, clock: _Clock) -> float:
        """The proxy fine-tune (:func:`~autodecomp.workload.proxy.proxy_finetune`), timed by
        ``clock``, with the floor callback; records ``pre_ft_accuracy``."""
        result = proxy_finetune(
            model,
            self.baseline.model,
            self.splits.train,
            self.val_loader,
            self.cfg.proxy,
            seed=self.cfg.seed,
            number=trial.number,
            device=self.cfg.device,
            num_workers=self.cfg.data.num_workers,
            callback=self._callback(trial, model, clock),
            phase=clock,
            on_pre_eval=lambda accuracy: trial.set_user_attr("pre_ft_accuracy", accuracy),
        )
        return result.accuracy

    @staticmethod
    def _prune(trial: optuna.Trial, stage: str, reason: str) -> None:
        trial.set_user_attr("pruned", reason)
        trial.set_user_attr("pruned_at", stage)
        raise optuna.TrialPruned(reason)

    def _callback(self, trial: optuna.Trial, model: nn.Module, clock: _Clock):
        """At ``floor_step`` (when >= 1) record the accuracy, pruning below
        ``accuracy_floor``; at each pruner rung record it and ask the pruner."""
        p, checked = self.cfg.proxy, []
        rungs = set(self.rungs)
        enqueued = "warm_start" in trial.user_attrs  # warm starts, ladder rungs, uniform arms

        def callback(step: int, loss: float) -> None:
            if step in rungs:
                with clock("rung_eval"):
                    accuracy = train.evaluate(model, self.val_loader, device=self.cfg.device)
                if rung_pruned(self.pruner, trial, step, accuracy) and not enqueued:
                    reason = (
                        f"accuracy {accuracy:.3f} at step {step} trails its MAC band "
                        f"({self.cfg.sampler.pruner})"
                    )
                    self._prune(trial, "rung", reason)
            if p.floor_step < 1 or checked or step < p.floor_step:
                return
            checked.append(step)
            with clock("floor_eval"):
                accuracy = train.evaluate(model, self.floor_loader, device=self.cfg.device)
            trial.set_user_attr("floor_accuracy", accuracy)
            if accuracy < p.accuracy_floor:
                reason = f"accuracy {accuracy:.3f} < floor {p.accuracy_floor} at step {step}"
                self._prune(trial, "floor", reason)

        return callback
