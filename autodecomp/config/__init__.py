"""Study and search-space configuration: YAML -> frozen, validated dataclasses.

Everything a study needs is read and checked here once; later code trusts these objects.
Paths inside ``study.yaml`` are relative to the study folder. Every problem raises
:class:`ConfigError` with a one-line message naming the bad value and the valid choices.
"""

from __future__ import annotations

import fnmatch
import math
import os
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from ..core.errors import ConfigError
from ..decompositions import methods

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

OBJECTIVES = {
    "accuracy": "maximize",
    "macs": "minimize",
    "params": "minimize",
    "latency": "minimize",
}
SAMPLERS = ("tpe", "nsga2", "random", "gp")
DEVICE_AUTO = "auto"
_NEEDS_ROOT = ("cifar10", "cifar100", "imagefolder")
_SUFFIXES = {"k": 1e3, "m": 1e6, "g": 1e9}


# ---- search space ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RatioRange:
    """Range of a parameter ratio (fraction of the dense layer's parameters)."""

    lo: float
    hi: float
    log: bool = False
    step: float | None = None


@dataclass(frozen=True)
class LayerRule:
    """A per-layer override: settings for the target layers matching ``layers`` (globs)."""

    layers: tuple[str, ...]
    methods: tuple[str, ...] | None = None
    keep: bool | None = None
    ratio: RatioRange | None = None
    ranks: dict[str, tuple[Any, ...]] | None = None


@dataclass(frozen=True)
class SpaceConfig:
    """A search space: target layers, allowed methods, ratio / rank choices per layer.

    ``shift_prune``: range of the fraction of intermediate channels removed from each shift
    block (and from layers decomposed into shift blocks); ``None`` disables pruning.
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    keep: bool = True
    ratio: RatioRange = RatioRange(0.1, 0.8)
    ranks: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    shift_prune: RatioRange | None = None
    overrides: tuple[LayerRule, ...] = ()
    init: str = "weight"  # "data": decomposed layers fit their output on calibration images
    rank_multiple: int = 1  # ratio-chosen channel ranks >= this are rounded down to a multiple
    source: str = "<inline>"


# ---- study -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"
    root: Path | None = None
    image_size: int | None = None
    channels: int | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    num_workers: int = 0


@dataclass(frozen=True)
class BaselineConfig:
    """A checkpoint (state dict) to load, or the recipe that trains the baseline once."""

    checkpoint: Path | None = None
    epochs: int = 20
    lr: float = 0.05
    batch_size: int = 64
    weight_decay: float = 5e-4


@dataclass(frozen=True)
class ProxyConfig:
    """The per-trial accuracy proxy: BN recalibration, short distillation, evaluation.

    Zero-training scores are computed on ``calibration_size`` fixed training images (0
    turns them off); a trial whose whole-network output error exceeds ``max_output_error``
    is pruned before any training (``None``: never).
    """

    steps: int = 100
    lr: float = 0.01
    batch_size: int = 64
    temperature: float = 4.0
    alpha: float = 0.9
    weight_decay: float = 0.0
    bn_batches: int = 4
    eval_batch_size: int = 256
    accuracy_floor: float = 0.0
    floor_step: int = 0
    floor_batches: int = 2
    calibration_size: int = 64
    max_output_error: float | None = None
    warmup_steps: int | None = None  # linear LR warm-up of the distillation; None: steps // 10

    @property
    def warmup(self) -> int:
        """The distillation's warm-up steps (``warmup_steps``, by default a tenth of ``steps``)."""
        return self.steps // 10 if self.warmup_steps is None else min(self.warmup_steps, self.steps)


@dataclass(frozen=True)
class Budgets:
    """Upper limits; a value <= 1 is a fraction of the baseline, a larger one an absolute count.

    ``max_latency_ms`` is always absolute: median milliseconds per batch (see
    :class:`LatencyConfig`).
    """

    max_macs: float | None = None
    max_params: float | None = None
    max_latency_ms: float | None = None

    def limits(self, baseline_macs: int, baseline_params: int) -> dict[str, float]:
        """Absolute limits keyed by ``"macs"`` / ``"params"`` / ``"latency"`` (those set)."""
        out = {}
        for key, value, base in (
            ("macs", self.max_macs, baseline_macs),
            ("params", self.max_params, baseline_params),
        ):
            if value is not None:
                out[key] = value * base if value <= 1 else value
        if self.max_latency_ms is not None:
            out["latency"] = self.max_latency_ms
        return out


@dataclass(frozen=True)
class LatencyConfig:
    """How inference latency is measured (median over ``repeats`` after ``warmup`` runs).

    Measured when ``latency`` is an objective, ``budgets.max_latency_ms`` is set, or
    ``measure`` is true: on the CPU with ``threads`` intra-op threads, and also on the
    study's GPU when it runs on one; ``device`` picks the one the objective / budget uses.
    """

    batch_size: int = 1
    warmup: int = 5
    repeats: int = 20
    threads: int = 1
    device: str = "cpu"
    measure: bool = False


@dataclass(frozen=True)
class SamplerConfig:
    name: str = "tpe"
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WarmStart:
    """A uniform baseline enqueued on study creation: every target layer ``method`` at ``ratio``."""

    method: str
    ratio: float | None = None


@dataclass(frozen=True)
class InitialDesign:
    """Zero-training allocations enqueued on study creation (:mod:`autodecomp.search.allocate`).

    ``plans`` of them (0: none), from ``grid`` ratios per method and layer, each option
    scored by ``score``: ``network`` (the relative logit error of the baseline with only
    that layer replaced) or ``layer`` (the layer's relative output error); ``tracks``
    single-method uniform sweeps join the error front's plans, each probed once first.
    """

    plans: int = 0
    grid: int = 8
    score: str = "network"
    tracks: int = 0


@dataclass(frozen=True)
class StudyConfig:
    """A whole study, validated. ``folder`` holds the outputs (db, baseline cache, tables)."""

    name: str
    folder: Path
    model: ModelConfig
    data: DataConfig
    baseline: BaselineConfig
    space: SpaceConfig
    proxy: ProxyConfig
    budgets: Budgets
    objectives: tuple[str, ...]
    sampler: SamplerConfig
    trials: int
    storage: str
    device: str
    seed: int = 0
    threads: int | None = None
    warm_start: tuple[WarmStart, ...] = ()
    latency: LatencyConfig = LatencyConfig()
    initial_design: InitialDesign = InitialDesign()

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o] for o in self.objectives]

    @property
    def measures_latency(self) -> bool:
        """Whether trials measure latency (an objective, a budget, or asked for)."""
        return (
            "latency" in self.objectives
            or self.budgets.max_latency_ms is not None
            or self.latency.measure
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (paths relative to the study folder), stored on the study."""
        return _jsonable(asdict(self), self.folder)


def _jsonable(value: Any, folder: Path) -> Any:
    if isinstance(value, Path):
        return os.path.relpath(value, folder) if value != folder else "."
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, folder) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v, folder) for v in value]
    return value


# ---- small validators ------------------------------------------------------------------------
def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_of(value: Any, where: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``; else a one-line error naming them."""
    if value not in choices:
        raise ConfigError(f"unknown {where} {_show(value)}; valid: {', '.join(choices)}")
    return value


def _mapping(raw: Any, where: str, allowed: Iterable[str]) -> Mapping[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {_show(raw)}")
    allowed = list(allowed)
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"unknown key {where}.{key}; valid keys: {', '.join(allowed)}")
    return raw


def _int(value: Any, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where} must be an integer >= {minimum}, got {_show(value)}")
    return value


def _float(value: Any, where: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not (lo <= number <= hi):
        raise ConfigError(f"{where} must be a number in [{lo}, {hi}], got {_show(value)}")
    return number


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {_show(value)}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string, got {_show(value)}")
    return value


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{where} must be a string or a list of strings, got {_show(value)}")
    return tuple(_str(v, where) for v in value)


def _count(value: Any, where: str) -> float | None:
    """A budget: fraction (<= 1), absolute number, ``"40%"`` or ``"2.5M"``."""
    if value is None:
        return None
    number: float | None = None
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            if text.endswith("%"):
                number = float(text[:-1]) / 100
                if number > 1:
                    number = None
            elif text and text[-1] in _SUFFIXES:
                number = float(text[:-1]) * _SUFFIXES[text[-1]]
            else:
                number = float(text)
        except ValueError:
            number = None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    if number is None or not (number > 0 and math.isfinite(number)):
        raise ConfigError(
            f"{where} must be a fraction of the baseline in (0, 1], a percentage like '40%', "
            f"or an absolute count like 2.5e6 / '2.5M', got {_show(value)}"
        )
    return number


def _path(value: Any, where: str, folder: Path, *, must_exist: bool = True) -> Path:
    path = Path(os.path.expanduser(_str(value, where)))
    path = path if path.is_absolute() else (folder / path)
    path = Path(os.path.normpath(path))
    if must_exist and not path.exists():
        raise ConfigError(f"{where}: path {str(path)!r} does not exist")
    return path


# ---- search-space parsing --------------------------------------------------------------------
def _registered_methods() -> list[str]:

    return methods()


def _method_patterns(value: Any, where: str) -> tuple[str, ...]:
    """Expand method names / globs (``"*"``) into registered method names."""
    valid = _registered_methods()
    names: list[str] = []
    for pattern in _strings(value, where):
        if pattern == "keep":
            raise ConfigError(f"{where}: 'keep' is not a method; use 'keep: true' instead")
        matched = fnmatch.filter(valid, pattern)
        if not matched:
            raise ConfigError(
                f"{where}: unknown decomposition method {pattern!r}; valid methods: "
                f"{', '.join(valid)} (globs like '*' allowed)"
            )
        names += [m for m in matched if m not in names]
    return tuple(names)


def _ratio_range(value: Any, where: str, *, lo_min: float = 0.0, open_lo: bool = True):
    if isinstance(value, list | tuple):
        value = {"range": list(value)}
    raw = _mapping(value, where, ("range", "log", "step"))
    pair = raw.get("range")
    if not (isinstance(pair, list | tuple) and len(pair) == 2):
        raise ConfigError(f"{where}.range must be a pair [lo, hi], got {_show(pair)}")
    lo = _float(pair[0], f"{where}.range[0]", lo=lo_min)
    hi = _float(pair[1], f"{where}.range[1]", lo=lo_min)
    if (open_lo and lo <= lo_min) or hi < lo:
        bound = f"{lo_min} {'<' if open_lo else '<='} lo <= hi"
        raise ConfigError(f"{where}.range must satisfy {bound}, got {_show(pair)}")
    log = _bool(raw.get("log", False), f"{where}.log")
    step = raw.get("step")
    if step is not None:
        step = _float(step, f"{where}.step", lo=1e-12)
        if log:
            raise ConfigError(f"{where}: 'log' and 'step' cannot be combined")
    return RatioRange(lo, hi, log, step)


def _shift_range(value: Any, where: str) -> RatioRange:
    """Shift-layer pruning: the fraction of a shift block's intermediate channels removed."""
    pruned = _ratio_range(value, where, open_lo=False)
    if pruned.hi >= 1:
        raise ConfigError(f"{where}.range must lie in [0, 1), got {[pruned.lo, pruned.hi]}")
    if pruned.log and pruned.lo <= 0:
        raise ConfigError(f"{where}: 'log' needs range[0] > 0, got {[pruned.lo, pruned.hi]}")
    return pruned


def _rank_choices(value: Any, where: str) -> dict[str, tuple[Any, ...]]:
    raw = _mapping(value, where, _registered_methods())
    out = {}
    for method, ranks in raw.items():
        if not isinstance(ranks, list) or not ranks:
            raise ConfigError(f"{where}.{method} must be a non-empty list of ranks")
        for rank in ranks:
            flat = rank if isinstance(rank, list) else [rank]
            if not all(isinstance(r, int) and not isinstance(r, bool) for r in flat):
                raise ConfigError(f"{where}.{method}: rank {_show(rank)} is not an int or int list")
        out[method] = tuple(ranks)
    return out


_SPACE_KEYS = (
    "layers", "methods", "keep", "ratio", "ranks", "shift_prune", "overrides", "init",
    "rank_multiple",
)  # fmt: skip
_INITS = ("weight", "data")
_SCORES = ("network", "layer")
_RULE_KEYS = ("layers", "methods", "keep", "ratio", "ranks")


def parse_space(raw: Any, source: str = "<inline>") -> SpaceConfig:
    """Validate a search-space mapping (the content of a ``search_spaces/*.yaml`` file)."""
    where = "space"
    raw = _mapping(raw, where, _SPACE_KEYS)
    layers = _mapping(raw.get("layers"), f"{where}.layers", ("include", "exclude"))
    overrides = []
    raw_rules = raw.get("overrides") or []
    if not isinstance(raw_rules, list):
        raise ConfigError(f"{where}.overrides must be a list, got {_show(raw_rules)}")
    for i, rule in enumerate(raw_rules):
        at = f"{where}.overrides[{i}]"
        rule = _mapping(rule, at, _RULE_KEYS)
        if "layers" not in rule:
            raise ConfigError(f"{at} needs 'layers' (globs on conv layer names)")
        overrides.append(
            LayerRule(
                layers=_strings(rule["layers"], f"{at}.layers"),
                methods=_method_patterns(rule["methods"], f"{at}.methods")
                if "methods" in rule
                else None,
                keep=_bool(rule["keep"], f"{at}.keep") if "keep" in rule else None,
                ratio=_ratio_range(rule["ratio"], f"{at}.ratio") if "ratio" in rule else None,
                ranks=_rank_choices(rule["ranks"], f"{at}.ranks") if "ranks" in rule else None,
            )
        )
    shift = raw.get("shift_prune")
    init = raw.get("init", "weight")
    _one_of(init, f"{where}.init", _INITS)
    return SpaceConfig(
        include=_strings(layers.get("include", "*"), f"{where}.layers.include"),
        exclude=_strings(layers.get("exclude", []), f"{where}.layers.exclude"),
        methods=_method_patterns(raw.get("methods", "*"), f"{where}.methods"),
        keep=_bool(raw.get("keep", True), f"{where}.keep"),
        ratio=_ratio_range(raw.get("ratio", [0.1, 0.8]), f"{where}.ratio"),
        ranks=_rank_choices(raw.get("ranks"), f"{where}.ranks"),
        shift_prune=None if shift is None else _shift_range(shift, f"{where}.shift_prune"),
        overrides=tuple(overrides),
        init=init,
        rank_multiple=_int(raw.get("rank_multiple", 1), f"{where}.rank_multiple", minimum=1),
        source=source,
    )


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read {str(path)!r}: {err.strerror or err}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"malformed YAML in {str(path)!r}{at}: {problem}") from None


def load_space(path: str | os.PathLike[str]) -> SpaceConfig:
    """Load and validate a ``search_spaces/*.yaml`` file."""
    path = Path(path)
    try:
        return parse_space(_read_yaml(path), source=str(path))
    except ConfigError as err:
        if str(path) in str(err):
            raise
        raise ConfigError(f"{path}: {err}") from None


# ---- study parsing ---------------------------------------------------------------------------
_STUDY_KEYS = (
    "name",
    "model",
    "data",
    "baseline",
    "space",
    "proxy",
    "budgets",
    "objectives",
    "sampler",
    "seed",
    "trials",
    "storage",
    "device",
    "threads",
    "warm_start",
    "latency",
    "initial_design",
)


def _dataclass_section(cls: type, raw: Any, where: str, convert: Mapping[str, Any]) -> Any:
    """Build a flat dataclass section: unknown keys rejected, each value checked by ``convert``."""
    raw = _mapping(raw, where, [f.name for f in fields(cls)])
    return cls(**{k: convert[k](v, f"{where}.{k}") for k, v in raw.items()})


def _positive(v: Any, w: str) -> float:
    return _float(v, w, lo=1e-12)


def _model(raw: Any) -> ModelConfig:
    if isinstance(raw, str):
        raw = {"name": raw}
    raw = _mapping(raw, "model", ("name", "kwargs"))
    kwargs = raw.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"model.kwargs must be a mapping, got {_show(kwargs)}")
    return ModelConfig(_str(raw.get("name"), "model.name"), dict(kwargs))


def _data(raw: Any, folder: Path) -> DataConfig:
    if isinstance(raw, str):
        raw = {"name": raw}
    opt_int = lambda v, w: None if v is None else _int(v, w, 1)  # noqa: E731
    data = _dataclass_section(
        DataConfig,
        raw,
        "data",
        {
            "name": _str,
            "root": lambda v, w: None if v is None else _path(v, w, folder),
            "image_size": opt_int,
            "channels": opt_int,
            "val_fraction": lambda v, w: _float(v, w, 0.0, 0.9),
            "test_fraction": lambda v, w: _float(v, w, 0.0, 0.9),
            "num_workers": _int,
        },
    )
    if data.name in _NEEDS_ROOT and data.root is None:
        raise ConfigError(f"data.root is required for data {data.name!r} (a local folder)")
    return data


def _baseline(raw: Any, folder: Path) -> BaselineConfig:
    return _dataclass_section(
        BaselineConfig,
        raw,
        "baseline",
        {
            "checkpoint": lambda v, w: None if v is None else _path(v, w, folder),
            "epochs": _int,
            "lr": _positive,
            "batch_size": lambda v, w: _int(v, w, 1),
            "weight_decay": lambda v, w: _float(v, w, 0.0),
        },
    )


def _proxy(raw: Any) -> ProxyConfig:
    proxy = _dataclass_section(
        ProxyConfig,
        raw,
        "proxy",
        {
            "steps": _int,
            "lr": _positive,
            "batch_size": lambda v, w: _int(v, w, 1),
            "temperature": _positive,
            "alpha": lambda v, w: _float(v, w, 0.0, 1.0),
            "weight_decay": lambda v, w: _float(v, w, 0.0),
            "bn_batches": _int,
            "eval_batch_size": lambda v, w: _int(v, w, 1),
            "accuracy_floor": lambda v, w: _float(v, w, 0.0, 1.0),
            "floor_step": _int,
            "floor_batches": lambda v, w: _int(v, w, 1),
            "calibration_size": _int,
            "max_output_error": lambda v, w: None if v is None else _positive(v, w),
            "warmup_steps": lambda v, w: None if v is None else _int(v, w),
        },
    )
    if proxy.accuracy_floor > 0 and not (1 <= proxy.floor_step <= proxy.steps):
        raise ConfigError(
            f"proxy.floor_step must be in [1, proxy.steps={proxy.steps}] when "
            f"proxy.accuracy_floor > 0, got {proxy.floor_step}"
        )
    if proxy.max_output_error is not None and proxy.calibration_size < 1:
        raise ConfigError("proxy.max_output_error needs proxy.calibration_size >= 1, got 0")
    return proxy


def _latency(raw: Any, device: str) -> LatencyConfig:
    latency = _dataclass_section(
        LatencyConfig,
        raw,
        "latency",
        {
            "batch_size": lambda v, w: _int(v, w, 1),
            "warmup": _int,
            "repeats": lambda v, w: _int(v, w, 1),
            "threads": lambda v, w: _int(v, w, 1),
            "device": lambda v, w: _one_of(v, w, ("cpu", "cuda")),
            "measure": _bool,
        },
    )
    if latency.device == "cuda" and not device.startswith("cuda"):
        raise ConfigError(f"latency.device 'cuda' needs the study on a GPU (device: {device})")
    return latency


def _objectives(raw: Any) -> tuple[str, ...]:
    names = _strings(raw, "objectives")
    for name in names:
        if name not in OBJECTIVES:
            valid = ", ".join(OBJECTIVES)
            raise ConfigError(f"unknown objective {name!r}; valid objectives: {valid}")
    if "accuracy" not in names or len(set(names)) != len(names):
        raise ConfigError(f"objectives must include 'accuracy' once, no repeats; got {list(names)}")
    return names


def _sampler(raw: Any, seed: int) -> SamplerConfig:
    if isinstance(raw, str):
        raw = {"name": raw}
    raw = _mapping(raw, "sampler", ("name", "seed", "options"))
    name = raw.get("name", "tpe")
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    options = raw.get("options") or {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"sampler.options must be a mapping, got {_show(options)}")
    return SamplerConfig(name, _int(raw.get("seed", seed), "sampler.seed"), dict(options))


def _warm_start(raw: Any) -> tuple[WarmStart, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"warm_start must be a list of {{method, ratio}}, got {_show(raw)}")
    out = []
    valid = _registered_methods()
    for i, item in enumerate(raw):
        where = f"warm_start[{i}]"
        item = _mapping(item, where, ("method", "ratio"))
        method = _str(item.get("method"), f"{where}.method")
        if method != "keep" and method not in valid:
            raise ConfigError(
                f"{where}: unknown method {method!r}; valid: keep, {', '.join(valid)}"
            )
        if method == "keep":
            out.append(WarmStart("keep"))
        else:
            out.append(WarmStart(method, _positive(item.get("ratio"), f"{where}.ratio")))
    return tuple(out)


def _initial_design(raw: Any) -> InitialDesign:
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = {"plans": raw}
    return _dataclass_section(
        InitialDesign,
        raw,
        "initial_design",
        {
            "plans": _int,
            "grid": lambda v, w: _int(v, w, 2),
            "score": lambda v, w: _one_of(v, w, _SCORES),
            "tracks": _int,
        },
    )


def _device(raw: Any) -> str:
    import torch

    name = _str(raw, "device")
    if name == DEVICE_AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use cpu or auto")
    return name


def _storage(raw: Any, folder: Path) -> str:
    if raw is None:
        return f"sqlite:///{folder / 'study.db'}"
    url = _str(raw, "storage")
    if "://" not in url:
        raise ConfigError(
            f"storage {url!r} is not a database URL (e.g. sqlite:///study.db, "
            "journal:///study.journal, postgresql://user@host/db)"
        )
    return url


def _space(raw: Any, folder: Path) -> SpaceConfig:
    if isinstance(raw, Mapping):
        return parse_space(raw)
    return load_space(_path(raw, "space", folder))


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (value parsed as YAML) to a raw config mapping."""
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set expects key.sub=value, got {item!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: cannot parse value {text!r} as YAML") from None
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"--set {key}: {where} is not a mapping (it is {_show(child)})")
            node = child
        node[parts[-1]] = value
    return raw


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> StudyConfig:
    """Read ``study.yaml``, apply ``--set`` overrides, and validate everything.

    Args:
        path: the study file; its folder is the study folder (outputs go there).
        overrides: ``"key.sub=value"`` strings, values parsed as YAML scalars.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "study.yaml"
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{str(path)!r} must contain a mapping, got {_show(raw)}")
    raw = apply_overrides(raw, overrides)
    _mapping(raw, "study", _STUDY_KEYS)
    folder = path.resolve().parent
    if "model" not in raw:
        raise ConfigError("study needs a 'model' (e.g. model: {name: digits_cnn})")
    seed = _int(raw.get("seed", 0), "seed")
    device = _device(raw.get("device", "cpu"))
    return StudyConfig(
        name=_str(raw.get("name", folder.name), "name"),
        folder=folder,
        model=_model(raw["model"]),
        data=_data(raw.get("data", "digits"), folder),
        baseline=_baseline(raw.get("baseline"), folder),
        space=_space(raw.get("space", {}), folder),
        proxy=_proxy(raw.get("proxy")),
        budgets=_dataclass_section(
            Budgets,
            raw.get("budgets"),
            "budgets",
            {
                "max_macs": _count,
                "max_params": _count,
                "max_latency_ms": lambda v, w: None if v is None else _positive(v, w),
            },
        ),
        objectives=_objectives(raw.get("objectives", ["accuracy", "macs"])),
        sampler=_sampler(raw.get("sampler", "tpe"), seed),
        trials=_int(raw.get("trials", 20), "trials", 1),
        storage=_storage(raw.get("storage"), folder),
        device=device,
        seed=seed,
        threads=None if raw.get("threads") is None else _int(raw["threads"], "threads", 1),
        warm_start=_warm_start(raw.get("warm_start", [])),
        latency=_latency(raw.get("latency"), device),
        initial_design=_initial_design(raw.get("initial_design")),
    )


# ---- a study's stored config -----------------------------------------------------------------
def _rebuild(kind: Any, value: Any, folder: Path, where: str) -> Any:
    """Inverse of ``_jsonable(asdict(...))`` for a value annotated ``kind``."""
    origin, args = get_origin(kind), get_args(kind)
    if value is None:
        return None
    if origin in (Union, types.UnionType):  # X | None
        return _rebuild(next(a for a in args if a is not type(None)), value, folder, where)
    if kind is Path:
        return Path(os.path.normpath(folder / value))
    if is_dataclass(kind):
        hints = get_type_hints(kind)
        _mapping(value, where, [f.name for f in fields(kind)])
        return kind(**{k: _rebuild(hints[k], v, folder, f"{where}.{k}") for k, v in value.items()})
    if origin is tuple:
        return tuple(_rebuild(args[0], item, folder, where) for item in value)
    if origin is dict:
        return {k: _rebuild(args[1], item, folder, f"{where}.{k}") for k, item in value.items()}
    return value


def config_from_dict(
    stored: Mapping[str, Any], folder: str | os.PathLike[str], *, device: str | None = None
) -> StudyConfig:
    """Rebuild the :class:`StudyConfig` stored on a study (the inverse of ``to_dict``).

    Args:
        stored: ``StudyConfig.to_dict()`` output, e.g. a study's ``config`` user attribute.
        folder: the study folder; the stored paths are relative to it.
        device: replaces the stored device (validated like ``device`` in ``study.yaml``).
    """
    folder = Path(folder).expanduser().resolve()
    try:
        cfg = _rebuild(StudyConfig, {**stored, "folder": "."}, folder, "stored config")
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"stored config does not fit this version of autodecomp: {err}") from None
    return cfg if device is None else replace(cfg, device=_device(device))
