"""The Optuna samplers and pruners a study can name (``sampler.name``, ``sampler.pruner``).

The config checks names against :data:`SAMPLERS` / :data:`PRUNERS`;
:func:`autodecomp.search.study.make_sampler` builds the registered sampler class and
:func:`make_pruner` the pruner. Adding either is one ``add`` line.
"""

from __future__ import annotations

from typing import Protocol

import optuna

from ..core.errors import ConfigError
from ..core.registry import Registry

__all__ = ["PRUNERS", "SAMPLERS", "PrunerSettings", "make_pruner", "rung_steps"]

SAMPLERS: Registry[type[optuna.samplers.BaseSampler]] = Registry("sampler", ConfigError)
SAMPLERS.add("tpe", optuna.samplers.TPESampler)
SAMPLERS.add("nsga2", optuna.samplers.NSGAIISampler)
SAMPLERS.add("random", optuna.samplers.RandomSampler)
SAMPLERS.add("gp", optuna.samplers.GPSampler)

# Multi-fidelity pruners on the proxy fine-tune's intermediate accuracies ("none": no pruner).
PRUNERS: Registry[type[optuna.pruners.BasePruner]] = Registry("pruner", ConfigError)
PRUNERS.add("none", optuna.pruners.NopPruner)
PRUNERS.add("successive_halving", optuna.pruners.SuccessiveHalvingPruner)


class PrunerSettings(Protocol):
    """The pruner fields of the ``sampler`` section (``SamplerConfig``)."""

    @property
    def pruner(self) -> str: ...
    @property
    def pruner_min_steps(self) -> int | None: ...
    @property
    def pruner_reduction(self) -> int: ...


def _first_rung(cfg: PrunerSettings, steps: int) -> int:
    """The first rung's step: ``pruner_min_steps``, by default ``steps`` / reduction**2."""
    if cfg.pruner_min_steps is not None:
        return cfg.pruner_min_steps
    return max(1, steps // cfg.pruner_reduction**2)


def rung_steps(cfg: PrunerSettings, steps: int) -> list[int]:
    """The distillation steps at which the pruner decides: ``min * reduction**k`` below
    ``steps`` (none without a pruner)."""
    if cfg.pruner == "none":
        return []
    out, step = [], _first_rung(cfg, steps)
    while step < steps:
        out.append(step)
        step *= cfg.pruner_reduction
    return out


def make_pruner(cfg: PrunerSettings, steps: int) -> optuna.pruners.BasePruner:
    """The study's pruner (``sampler.pruner``) over a proxy fine-tune of ``steps`` steps.

    ``successive_halving``: Optuna's :class:`~optuna.pruners.SuccessiveHalvingPruner` with
    rungs at :func:`rung_steps` (``min_resource`` = the first, ``reduction_factor`` =
    ``pruner_reduction``): at each rung a candidate continues only when its accuracy is in
    the top 1/reduction of the candidates of its MAC band that reached the rung.
    """
    if cfg.pruner == "none":
        return PRUNERS.get("none")()
    if not rung_steps(cfg, steps):
        raise ConfigError(
            f"sampler.pruner_min_steps={cfg.pruner_min_steps} leaves no pruning rung below "
            f"proxy.steps={steps}; choose a value below {steps}"
        )
    return PRUNERS.get(cfg.pruner)(
        min_resource=_first_rung(cfg, steps), reduction_factor=cfg.pruner_reduction
    )
