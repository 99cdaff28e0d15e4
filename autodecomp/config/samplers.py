"""The Optuna samplers a study can name (``sampler.name``), each registered once.

The config checks names against :data:`SAMPLERS`; :func:`autodecomp.search.study.make_sampler`
builds the registered class. Adding a sampler is one ``SAMPLERS.add`` line.
"""

from __future__ import annotations

import optuna

from ..core.errors import ConfigError
from ..core.registry import Registry

__all__ = ["SAMPLERS"]

SAMPLERS: Registry[type[optuna.samplers.BaseSampler]] = Registry("sampler", ConfigError)
SAMPLERS.add("tpe", optuna.samplers.TPESampler)
SAMPLERS.add("nsga2", optuna.samplers.NSGAIISampler)
SAMPLERS.add("random", optuna.samplers.RandomSampler)
SAMPLERS.add("gp", optuna.samplers.GPSampler)
