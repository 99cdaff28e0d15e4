"""One trial: plan -> compressed model -> cost and budget constraints -> proxy accuracy.

Per trial: draw a plan (:mod:`autodecomp.space`), apply it to the baseline, count MACs
(fvcore, layer by layer with a cache: :class:`PlanCost`) and parameters, and set one
constraint per budget (``value / limit - 1``, <= 0 is feasible) before anything else can
end the trial. A candidate over budget is not trained: it returns
accuracy 0.0 with ``over_budget=True`` (the constraints already exclude it from the Pareto
front, and a zero keeps the samplers away from it). Otherwise: recalibrate BatchNorm
statistics, measure the pre-fine-tune accuracy, distil from the baseline for the configured
steps (pruned with :class:`optuna.TrialPruned` when the accuracy at ``floor_step`` is below
``accuracy_floor``), and evaluate on the validation split.

User attributes per trial: ``plan``, ``macs``, ``params``, ``macs_ratio`` and
``params_ratio`` (compressed / baseline), ``over_budget``, ``pre_ft_accuracy``, ``layers``
(per layer: method, rank, ratio, rel_error = ||W_approx - W|| / ||W||, macs, params),
``seconds`` (per phase), and ``pruned`` / ``fail_reason`` when the trial ends early.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna
import torch
from torch import nn
from torch.utils.data import Subset

from . import train
from .baseline import Baseline
from .config import StudyConfig
from .cost import count_macs, count_params
from .data import DataSplits, make_loader
from .decompositions import (
    DecomposedConv,
    DecompositionError,
    UnsupportedLayerError,
)
from .space import SearchSpace, suggest_plan
from .surgery import apply_plan

__all__ = ["CATCH", "Objective", "PlanCost"]

# Exceptions that fail a single trial (recorded in ``fail_reason``) without stopping the study:
# a failed factorisation, a layer a method cannot take, a non-finite distillation loss.
CATCH = (DecompositionError, UnsupportedLayerError, FloatingPointError)


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


def _rank_json(rank: Any) -> Any:
    return list(rank) if isinstance(rank, tuple) else rank


def _input_shapes(
    model: nn.Module, input_shape: tuple[int, ...], names: list[str]
) -> dict[str, tuple[int, ...]]:
    """``(C, H, W)`` of the input each named module sees, from one forward pass."""
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            shapes.setdefault(name, tuple(args[0].shape[1:]))

        return record

    hooks = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    param = next(model.parameters())
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros((1, *input_shape), dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for handle in hooks:
            handle.remove()
    return shapes


class PlanCost:
    """MACs and parameters of a compressed model, counted by fvcore one layer at a time.

    The total is the baseline's fvcore count with each planned layer's dense count swapped
    for the count of its replacement, taken on that layer's input shape and cached by
    (layer, method, rank): a layer's structure is a function of its spec and its final rank
    (``DecomposedConv.__init__(spec, rank)``), so the sum equals ``count_macs`` of the whole
    compressed model while tracing only layers not seen before.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], layers: list[str]):
        self.macs = count_macs(model, input_shape)
        self.shapes = _input_shapes(model, input_shape, layers)
        self._dense = {n: count_macs(model.get_submodule(n), self.shapes[n]) for n in layers}
        self._cache: dict[tuple[str, str, str], int] = {}

    def _layer_macs(self, name: str, module: nn.Module) -> int:
        if not isinstance(module, DecomposedConv):
            return self._dense[name]
        key = (name, module.name, json.dumps(_rank_json(module.rank), sort_keys=True))
        if key not in self._cache:
            self._cache[key] = count_macs(module, self.shapes[name])
        return self._cache[key]

    def __call__(
        self, compressed: nn.Module, plan: dict[str, Any]
    ) -> tuple[int, int, dict[str, dict[str, Any]]]:
        """``(macs, params, per-layer records)`` of ``compressed = apply_plan(model, plan)``."""
        macs, layers = self.macs, {}
        for name, entry in plan.items():
            module = compressed.get_submodule(name)
            layer_macs = self._layer_macs(name, module)
            macs += layer_macs - self._dense[name]
            layers[name] = {
                "method": entry["method"],
                "rank": _rank_json(module.rank) if isinstance(module, DecomposedConv) else None,
                "ratio": entry.get("ratio"),
                "rel_error": 0.0,
                "macs": layer_macs,
                "params": count_params(module),
            }
        return macs, count_params(compressed), layers


@torch.no_grad()
def _fill_errors(teacher: nn.Module, model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Set ``rel_error`` = ||dense_weight - W|| / ||W|| of every decomposed layer."""
    for name, record in layers.items():
        module = model.get_submodule(name)
        if not isinstance(module, DecomposedConv):
            continue
        dense = teacher.get_submodule(name).weight.double()
        approx = module.dense_weight().double()
        record["rel_error"] = float((approx - dense).norm() / dense.norm().clamp_min(1e-30))


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

    def _train_loader(self, seed: int):
        return make_loader(
            self.splits.train,
            batch_size=self.cfg.proxy.batch_size,
            shuffle=True,
            seed=seed,
            num_workers=self.cfg.data.num_workers,
            drop_last=len(self.splits.train) > self.cfg.proxy.batch_size,
        )

    def _values(self, accuracy: float, macs: int, params: int) -> tuple[float, ...]:
        named = {"accuracy": float(accuracy), "macs": float(macs), "params": float(params)}
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

    def _run(self, trial: optuna.Trial, clock: _Clock) -> tuple[float, ...]:
        cfg, base, device = self.cfg, self.baseline, self.cfg.device
        with clock("plan"):
            plan = suggest_plan(trial, self.space)
        trial.set_user_attr("plan", plan)
        with clock("decompose"):
            model = apply_plan(base.model, plan)
        with clock("count"):
            macs, params, layers = self.cost(model, plan)
        cost = {"macs": macs, "params": params}
        for key, limit in self.limits.items():
            trial.set_constraint(key, cost[key] / limit - 1.0)
        over = any(cost[key] > limit for key, limit in self.limits.items())
        with clock("decompose"):
            _fill_errors(base.model, model, layers)
        with clock("record"):
            trial.set_user_attr("macs", macs)
            trial.set_user_attr("params", params)
            trial.set_user_attr("macs_ratio", macs / base.macs)
            trial.set_user_attr("params_ratio", params / base.params)
            trial.set_user_attr("over_budget", over)
            trial.set_user_attr("layers", layers)
        if over:
            return self._values(0.0, macs, params)

        p = cfg.proxy
        train.set_seed(cfg.seed + trial.number)
        if p.bn_batches > 0:
            with clock("bn_recal"):
                train.recalibrate_bn(
                    model,
                    self._train_loader(cfg.seed + trial.number),
                    batches=p.bn_batches,
                    device=device,
                )
        with clock("pre_eval"):
            pre = train.evaluate(model, self.val_loader, device=device)
        trial.set_user_attr("pre_ft_accuracy", pre)
        if p.steps > 0:
            with clock("distill"):
                train.distill(
                    model,
                    base.model,
                    self._train_loader(cfg.seed + trial.number + 1),
                    steps=p.steps,
                    lr=p.lr,
                    temperature=p.temperature,
                    alpha=p.alpha,
                    weight_decay=p.weight_decay,
                    device=device,
                    callback=self._callback(trial, model, clock),
                )
            with clock("eval"):
                accuracy = train.evaluate(model, self.val_loader, device=device)
        else:
            accuracy = pre
        return self._values(accuracy, macs, params)

    def _callback(self, trial: optuna.Trial, model: nn.Module, clock: _Clock):
        p, checked = self.cfg.proxy, []

        def callback(step: int, loss: float) -> None:
            if p.accuracy_floor <= 0 or checked or step < p.floor_step:
                return
            checked.append(step)
            with clock("floor_eval"):
                accuracy = train.evaluate(model, self.floor_loader, device=self.cfg.device)
            trial.set_user_attr("floor_accuracy", accuracy)
            if accuracy < p.accuracy_floor:
                reason = f"accuracy {accuracy:.3f} < floor {p.accuracy_floor} at step {step}"
                trial.set_user_attr("pruned", reason)
                raise optuna.TrialPruned(reason)

        return callback
