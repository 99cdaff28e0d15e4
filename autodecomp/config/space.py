"""Search spaces: ``search_spaces/*.yaml`` (or a study's inline ``space``) -> :class:`SpaceConfig`.

Method names may be globs over the registered decomposition methods; per-layer
``overrides`` replace the defaults for the layers their globs match.
"""

from __future__ import annotations

import fnmatch
import math
import os
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..decompositions import SOLVERS, get_method, methods
from .checks import boolean, integer, mapping, number, one_of, show, strings
from .raw import read_yaml
from .schema import LayerRule, RatioRange, SpaceConfig

__all__ = ["load_space", "parse_space"]


def _method_patterns(value: Any, where: str) -> tuple[str, ...]:
    """Expand method names / globs (``"*"``) into registered method names."""
    valid = methods()
    names: list[str] = []
    for pattern in strings(value, where):
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


def _ratio_range(
    value: Any, where: str, *, lo_min: float = 0.0, open_lo: bool = True, hi_max: float = 1.0
) -> RatioRange:
    """A ``[lo, hi]`` range within ``(lo_min, hi_max]`` (``[lo_min, hi_max]`` unless
    ``open_lo``); a parameter ratio above 1 would make a layer bigger than the dense one."""
    if isinstance(value, list | tuple):
        value = {"range": list(value)}
    raw = mapping(value, where, ("range", "log", "step"))
    pair = raw.get("range")
    if not (isinstance(pair, list | tuple) and len(pair) == 2):
        raise ConfigError(f"{where}.range must be a pair [lo, hi], got {show(pair)}")
    lo = number(pair[0], f"{where}.range[0]", lo=lo_min)
    hi = number(pair[1], f"{where}.range[1]", lo=lo_min)
    if hi > hi_max:
        raise ConfigError(
            f"{where}.range[1] is {show(pair[1])}, above {hi_max:g}: a ratio is a fraction of "
            f"the dense layer's parameters, in ({lo_min:g}, {hi_max:g}]"
        )
    if (open_lo and lo <= lo_min) or hi < lo:
        bound = f"{lo_min} {'<' if open_lo else '<='} lo <= hi"
        raise ConfigError(f"{where}.range must satisfy {bound}, got {show(pair)}")
    log = boolean(raw.get("log", False), f"{where}.log")
    step = raw.get("step")
    if step is not None:
        step = number(step, f"{where}.step", lo=1e-12)
        if log:
            raise ConfigError(f"{where}: 'log' and 'step' cannot be combined")
    return RatioRange(lo, hi, log, step)


def _shift_range(value: Any, where: str) -> RatioRange:
    """Shift-layer pruning: the fraction of a shift block's intermediate channels removed."""
    pruned = _ratio_range(value, where, open_lo=False, hi_max=math.inf)
    if pruned.hi >= 1:
        raise ConfigError(f"{where}.range must lie in [0, 1), got {[pruned.lo, pruned.hi]}")
    if pruned.log and pruned.lo <= 0:
        raise ConfigError(f"{where}: 'log' needs range[0] > 0, got {[pruned.lo, pruned.hi]}")
    return pruned


def _rank_choices(value: Any, where: str) -> dict[str, tuple[Any, ...]]:
    raw = mapping(value, where, methods())
    out = {}
    for method, ranks in raw.items():
        if not isinstance(ranks, list) or not ranks:
            raise ConfigError(f"{where}.{method} must be a non-empty list of ranks")
        for rank in ranks:
            flat = rank if isinstance(rank, list) else [rank]
            if not all(isinstance(r, int) and not isinstance(r, bool) for r in flat):
                raise ConfigError(f"{where}.{method}: rank {show(rank)} is not an int or int list")
        out[method] = tuple(ranks)
    return out


def _solvers(value: Any, where: str) -> dict[str, str]:
    """``solver``: one for every method (``solver: tensorly``) or per method (``solver: {cp:
    tensorly}``); only the non-default choices are kept (``autodecomp``: the method's own)."""
    if value is None:
        return {}
    if isinstance(value, str):
        one_of(value, where, SOLVERS)
        value = {m: value for m in methods() if get_method(m).tensorly_solver is not None}
    out = {}
    for method, solver in mapping(value, where, methods()).items():
        one_of(solver, f"{where}.{method}", SOLVERS)
        try:
            get_method(method).check_solver(solver)
        except ValueError as err:
            raise ConfigError(f"{where}.{method}: {err}") from None
        if solver != "autodecomp":
            out[method] = solver
    return out


def _max_layer_macs(value: Any, where: str) -> float:
    """The MAC cap: a positive fraction of each layer's dense multiply-adds."""
    number_given = isinstance(value, int | float) and not isinstance(value, bool)
    if not (number_given and value > 0):
        raise ConfigError(
            f"{where} must be a number > 0 (a fraction of each dense layer's MACs, e.g. 1.0), "
            f"got {show(value)}"
        )
    return float(value)


_SPACE_KEYS = (
    "layers", "methods", "keep", "ratio", "ranks", "shift_prune", "overrides", "init",
    "rank_multiple", "solver", "max_layer_macs",
)  # fmt: skip
_INITS = ("weight", "data")
_RULE_KEYS = ("layers", "methods", "keep", "ratio", "ranks")


def parse_space(raw: Any, source: str = "<inline>") -> SpaceConfig:
    """Validate a search-space mapping (the content of a ``search_spaces/*.yaml`` file)."""
    where = "space"
    raw = mapping(raw, where, _SPACE_KEYS)
    layers = mapping(raw.get("layers"), f"{where}.layers", ("include", "exclude"))
    overrides = []
    raw_rules = raw.get("overrides") or []
    if not isinstance(raw_rules, list):
        raise ConfigError(f"{where}.overrides must be a list, got {show(raw_rules)}")
    for i, rule in enumerate(raw_rules):
        at = f"{where}.overrides[{i}]"
        rule = mapping(rule, at, _RULE_KEYS)
        if "layers" not in rule:
            raise ConfigError(f"{at} needs 'layers' (globs on conv layer names)")
        overrides.append(
            LayerRule(
                layers=strings(rule["layers"], f"{at}.layers"),
                methods=_method_patterns(rule["methods"], f"{at}.methods")
                if "methods" in rule
                else None,
                keep=boolean(rule["keep"], f"{at}.keep") if "keep" in rule else None,
                ratio=_ratio_range(rule["ratio"], f"{at}.ratio") if "ratio" in rule else None,
                ranks=_rank_choices(rule["ranks"], f"{at}.ranks") if "ranks" in rule else None,
            )
        )
    shift = raw.get("shift_prune")
    init = raw.get("init", "weight")
    one_of(init, f"{where}.init", _INITS)
    return SpaceConfig(
        include=strings(layers.get("include", "*"), f"{where}.layers.include"),
        exclude=strings(layers.get("exclude", []), f"{where}.layers.exclude"),
        methods=_method_patterns(raw.get("methods", "*"), f"{where}.methods"),
        keep=boolean(raw.get("keep", True), f"{where}.keep"),
        ratio=_ratio_range(raw.get("ratio", [0.1, 0.8]), f"{where}.ratio"),
        ranks=_rank_choices(raw.get("ranks"), f"{where}.ranks"),
        shift_prune=None if shift is None else _shift_range(shift, f"{where}.shift_prune"),
        overrides=tuple(overrides),
        init=init,
        rank_multiple=integer(raw.get("rank_multiple", 1), f"{where}.rank_multiple", minimum=1),
        solvers=_solvers(raw.get("solver"), f"{where}.solver"),
        max_layer_macs=_max_layer_macs(raw.get("max_layer_macs", 1.0), f"{where}.max_layer_macs"),
        source=source,
    )


def load_space(path: str | os.PathLike[str]) -> SpaceConfig:
    """Load and validate a ``search_spaces/*.yaml`` file."""
    path = Path(path)
    try:
        return parse_space(read_yaml(path), source=str(path))
    except ConfigError as err:
        if str(path) in str(err):
            raise
        raise ConfigError(f"{path}: {err}") from None
