"""``study.yaml`` -> :class:`StudyConfig`: every key read and checked once, in one place.

Paths inside ``study.yaml`` are relative to the study folder. The flat sections are built
from their dataclasses' settings (:func:`~autodecomp.config.checks.section`); what spans
several keys (the proxy's accuracy floor, a GPU latency on a CPU study, a data set that
needs a ``root``) is checked here after the section is built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..decompositions import methods
from ..measure.objectives import OBJECTIVES
from ..workload.data import DATASETS
from .checks import (
    device,
    integer,
    local_path,
    mapping,
    number,
    registered,
    section,
    show,
    string,
    strings,
)
from .raw import apply_overrides, read_yaml
from .schema import (
    BaselineConfig,
    Budgets,
    DataConfig,
    InitialDesign,
    LatencyConfig,
    ModelConfig,
    ProxyConfig,
    SamplerConfig,
    SpaceConfig,
    StudyConfig,
    WarmStart,
)
from .space import load_space, parse_space

__all__ = ["load_config"]

_STUDY_FIELDS = {f.name: f for f in fields(StudyConfig)}
_STUDY_KEYS = tuple(name for name in _STUDY_FIELDS if name != "folder")


def _shorthand(raw: Any, key: str) -> Any:
    """``data: digits`` stands for ``data: {name: digits}`` (likewise model and sampler)."""
    return {key: raw} if isinstance(raw, str) else raw


def _data(raw: Any, folder: Path) -> DataConfig:
    data = section(DataConfig, _shorthand(raw, "name"), "data", folder)
    if data.name in DATASETS and DATASETS.get(data.name).needs_root and data.root is None:
        raise ConfigError(f"data.root is required for data {data.name!r} (a local folder)")
    return data


def _proxy(raw: Any) -> ProxyConfig:
    proxy = section(ProxyConfig, raw, "proxy")
    if proxy.accuracy_floor > 0 and not (1 <= proxy.floor_step <= proxy.steps):
        raise ConfigError(
            f"proxy.floor_step must be in [1, proxy.steps={proxy.steps}] when "
            f"proxy.accuracy_floor > 0, got {proxy.floor_step}"
        )
    if proxy.max_output_error is not None and proxy.calibration_size < 1:
        raise ConfigError("proxy.max_output_error needs proxy.calibration_size >= 1, got 0")
    return proxy


def _latency(raw: Any, study_device: str) -> LatencyConfig:
    latency = section(LatencyConfig, raw, "latency")
    if latency.device == "cuda" and not study_device.startswith("cuda"):
        raise ConfigError(
            f"latency.device 'cuda' needs the study on a GPU (device: {study_device})"
        )
    return latency


def _objectives(raw: Any) -> tuple[str, ...]:
    names = tuple(registered(name, OBJECTIVES) for name in strings(raw, "objectives"))
    if "accuracy" not in names or len(set(names)) != len(names):
        raise ConfigError(f"objectives must include 'accuracy' once, no repeats; got {list(names)}")
    return names


def _sampler(raw: Any, seed: int) -> SamplerConfig:
    """The sampler section; its seed defaults to the study's."""
    raw = _shorthand(raw, "name")
    sampler = section(SamplerConfig, raw, "sampler")
    return sampler if isinstance(raw, Mapping) and "seed" in raw else replace(sampler, seed=seed)


def _warm_start(raw: Any) -> tuple[WarmStart, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"warm_start must be a list of {{method, ratio}}, got {show(raw)}")
    out = []
    valid = methods()
    for i, item in enumerate(raw):
        where = f"warm_start[{i}]"
        item = mapping(item, where, ("method", "ratio"))
        method = string(item.get("method"), f"{where}.method")
        if method != "keep" and method not in valid:
            raise ConfigError(
                f"{where}: unknown method {method!r}; valid: keep, {', '.join(valid)}"
            )
        if method == "keep":
            out.append(WarmStart("keep"))
        else:
            ratio = number(item.get("ratio"), f"{where}.ratio", lo=1e-12, hi=1.0)
            out.append(WarmStart(method, ratio))
    return tuple(out)


def _initial_design(raw: Any) -> InitialDesign:
    """The initial design; a bare integer is its number of ``plans``."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = {"plans": raw}
    return section(InitialDesign, raw, "initial_design")


def _storage(raw: Any, folder: Path) -> str:
    if raw is None:
        return f"sqlite:///{folder / 'study.db'}"
    url = string(raw, "storage")
    if "://" not in url:
        raise ConfigError(
            f"storage {url!r} is not a database URL (e.g. sqlite:///study.db, "
            "journal:///study.journal, postgresql://user@host/db)"
        )
    return url


def _top_setting(raw: Mapping[str, Any], key: str, folder: Path) -> Any:
    """A top-level key declared on :class:`StudyConfig` with its check (``setting``)."""
    item = _STUDY_FIELDS[key]
    return item.metadata["check"](raw.get(key, item.default), key, folder)


def _space(raw: Any, folder: Path) -> SpaceConfig:
    if isinstance(raw, Mapping):
        return parse_space(raw)
    return load_space(local_path(raw, "space", folder))


def _inline_space(raw: dict[str, Any], overrides: Sequence[str], folder: Path) -> dict[str, Any]:
    """``raw`` with a space given as a file read into it when an override sets a key inside
    it (``--set space.init=data``), so that the override applies to the file's settings."""
    inside = any(o.partition("=")[0].startswith("space.") for o in overrides)
    if inside and isinstance(raw.get("space"), str):
        return {**raw, "space": read_yaml(local_path(raw["space"], "space", folder))}
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
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{str(path)!r} must contain a mapping, got {show(raw)}")
    folder = path.resolve().parent
    raw = apply_overrides(_inline_space(raw, overrides, folder), overrides)
    mapping(raw, "study", _STUDY_KEYS)
    if "model" not in raw:
        raise ConfigError("study needs a 'model' (e.g. model: {name: digits_cnn})")
    seed = integer(raw.get("seed", 0), "seed")
    study_device = device(raw.get("device", "cpu"))
    return StudyConfig(
        name=string(raw.get("name", folder.name), "name"),
        folder=folder,
        model=section(ModelConfig, _shorthand(raw["model"], "name"), "model"),
        data=_data(raw.get("data", "digits"), folder),
        baseline=section(BaselineConfig, raw.get("baseline"), "baseline", folder),
        space=_space(raw.get("space", {}), folder),
        proxy=_proxy(raw.get("proxy")),
        budgets=section(Budgets, raw.get("budgets"), "budgets"),
        objectives=_objectives(raw.get("objectives", ["accuracy", "macs"])),
        sampler=_sampler(raw.get("sampler", "tpe"), seed),
        trials=integer(raw.get("trials", 20), "trials", 1),
        storage=_storage(raw.get("storage"), folder),
        device=study_device,
        seed=seed,
        threads=None if raw.get("threads") is None else integer(raw["threads"], "threads", 1),
        warm_start=_warm_start(raw.get("warm_start", [])),
        latency=_latency(raw.get("latency"), study_device),
        initial_design=_initial_design(raw.get("initial_design")),
        deterministic=_top_setting(raw, "deterministic", folder),
    )
