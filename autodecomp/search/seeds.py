"""Every seed of a study, derived from its ``seed`` (and the sampler's), in one place.

- data splits: ``seed`` (and ``seed + 1`` for the digits validation split);
- the model's initial weights and the baseline's training: ``seed`` (global generators
  seeded just before the model is built and again before training);
- the calibration batch of the zero-training scores: ``seed``; the images of ``init: data``
  layers: ``seed + 1``;
- trial ``n``: the global generators are seeded ``seed + n`` when it starts; the proxy's BN
  recalibration loader ``seed + n``, its distillation loader ``seed + n + 1``;
- the sampler: re-seeded before every trial from ``(sampler.seed, n)``
  (:func:`seed_each_trial`), so trial ``n``'s draw depends only on the finished trials, not
  on the process that asks: a resumed study draws what an uninterrupted one would have
  (TPE, random, NSGA-II; GP also starts each model fit from its previous one in the same
  process, so a resumed GP study may draw differently).
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import optuna
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial

from ..config import StudyConfig

__all__ = ["seed_each_trial", "study_seeds", "trial_seed"]


def trial_seed(seed: int, number: int) -> int:
    """The sampler's seed for trial ``number`` of a sampler seeded ``seed`` (32 bits)."""
    return int(np.random.SeedSequence([seed % 2**32, number]).generate_state(1)[0])


def _random_states(sampler: Any, seen: set[int]) -> list[np.random.RandomState]:
    """The sampler's NumPy random states, those of the samplers and strategies it holds too
    (Optuna keeps each in a lazily created holder with an ``rng`` property)."""
    out: list[np.random.RandomState] = []
    for value in vars(sampler).values():
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, np.random.RandomState):
            out.append(value)
        elif isinstance(getattr(type(value), "rng", None), property):
            out.append(value.rng)
        elif hasattr(value, "__dict__") and type(value).__module__.startswith("optuna.samplers"):
            out += _random_states(value, seen)
    return out


def seed_each_trial(sampler: BaseSampler, seed: int) -> BaseSampler:
    """Make ``sampler`` re-seed its random states with :func:`trial_seed` before each trial.

    The sampler keeps its class (its ``before_trial`` is wrapped on the instance); returns it.
    """
    before = type(sampler).before_trial

    def before_trial(self: BaseSampler, study: optuna.Study, trial: FrozenTrial) -> None:
        for state in _random_states(self, set()):
            state.seed(trial_seed(seed, trial.number))
        before(self, study, trial)

    sampler.before_trial = types.MethodType(before_trial, sampler)  # type: ignore[method-assign]
    return sampler


def study_seeds(cfg: StudyConfig) -> dict[str, Any]:
    """The seeds a study uses (stored on it with its environment)."""
    return {
        "seed": cfg.seed,
        "sampler": cfg.sampler.seed,
        "data": cfg.seed,
        "model_init": cfg.seed,
        "baseline_training": cfg.seed,
        "calibration": cfg.seed,
        "data_init": cfg.seed + 1,
        "trial": "seed + trial number",
        "proxy_loaders": "seed + trial number (BN), seed + trial number + 1 (distillation)",
        "sampler_per_trial": "SeedSequence([sampler seed, trial number])",
    }
