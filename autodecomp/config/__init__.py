"""Study and search-space configuration: YAML -> frozen, validated dataclasses.

Everything a study needs is read and checked here once; later code trusts these objects.
Paths inside ``study.yaml`` are relative to the study folder. Every problem raises
:class:`ConfigError` with a one-line message naming the bad value and the valid choices.

Modules, each with one job: :mod:`.checks` (validators, settings declared with their
check), :mod:`.schema` (the dataclasses), :mod:`.samplers` (the sampler registry),
:mod:`.raw` (YAML files, ``--set`` overrides), :mod:`.space` (search spaces),
:mod:`.load` (``study.yaml``), :mod:`.stored` (the config stored on a study).
"""

from __future__ import annotations

from ..core.errors import ConfigError
from ..measure.objectives import OBJECTIVES
from .checks import DEVICE_AUTO
from .load import load_config
from .raw import apply_overrides
from .samplers import SAMPLERS
from .schema import (
    BaselineConfig,
    Budgets,
    DataConfig,
    InitialDesign,
    LatencyConfig,
    LayerRule,
    ModelConfig,
    ProxyConfig,
    RatioRange,
    SamplerConfig,
    SpaceConfig,
    StudyConfig,
    WarmStart,
)
from .space import load_space, parse_space
from .stored import config_from_dict

__all__ = [
    "DEVICE_AUTO",
    "OBJECTIVES",
    "SAMPLERS",
    "BaselineConfig",
    "Budgets",
    "ConfigError",
    "DataConfig",
    "InitialDesign",
    "LatencyConfig",
    "LayerRule",
    "ModelConfig",
    "ProxyConfig",
    "RatioRange",
    "SamplerConfig",
    "SpaceConfig",
    "StudyConfig",
    "WarmStart",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "load_space",
    "parse_space",
]
