"""The search space on a concrete model: the only module that calls ``trial.suggest_*``.

Per target layer the trial draws ``"{layer}/method"`` from a categorical whose choices are
fixed for that layer across trials (the allowed methods that support it, plus ``"keep"``
when allowed), then one method-scoped parameter: ``"{layer}/{method}/ratio"`` (a float) or,
when the space lists explicit ranks for that method, ``"{layer}/{method}/rank"``.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from torch import nn

from .config import ConfigError, RatioRange, SpaceConfig
from .decompositions import ConvSpec, get_method, supporting_methods
from .surgery import KEEP, conv_layers

__all__ = ["KEEP", "LayerSpace", "SearchSpace", "resolve_space", "suggest_plan", "uniform_params"]

RankCode = int | str  # an int rank, or a JSON list for tuple ranks (Optuna choices are scalars)


@dataclass(frozen=True)
class LayerSpace:
    """What the search may do with one layer."""

    name: str
    spec: ConvSpec
    choices: tuple[str, ...]
    ratio: RatioRange
    ranks: dict[str, tuple[RankCode, ...]] = field(default_factory=dict)

    def param_names(self) -> list[str]:
        """Every parameter name this layer can produce."""
        names = [f"{self.name}/method"]
        for method in self.choices:
            if method != KEEP:
                names.append(f"{self.name}/{method}/{'rank' if method in self.ranks else 'ratio'}")
        return names


@dataclass(frozen=True)
class SearchSpace:
    """The resolved per-layer choices of a search space on one model."""

    layers: tuple[LayerSpace, ...]

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]


def _encode(rank: Any) -> RankCode:
    return rank if isinstance(rank, int) else json.dumps(list(rank))


def _decode(code: RankCode) -> Any:
    return json.loads(code) if isinstance(code, str) else code


def _matching(names: Sequence[str], patterns: Sequence[str], where: str) -> set[str]:
    matched: set[str] = set()
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise ConfigError(
                f"{where}: glob {pattern!r} matches no target conv layer; layers: {shown}"
            )
        matched.update(hits)
    return matched


def _rank_codes(
    name: str, spec: ConvSpec, method: str, ranks: Sequence[Any]
) -> tuple[RankCode, ...]:
    cls = get_method(method)
    codes: list[RankCode] = []
    for rank in ranks:
        try:
            normal = cls.normalize_rank(spec, rank)
        except ValueError as err:
            raise ConfigError(f"space ranks for {method!r} on layer {name!r}: {err}") from None
        code = _encode(normal)
        if code not in codes:
            codes.append(code)
    return tuple(codes)


def resolve_space(model: nn.Module, cfg: SpaceConfig) -> SearchSpace:
    """Apply a search-space config to a model's conv layers.

    Raises:
        ConfigError: a glob that matches no layer, a rank invalid for a layer, or a target
            layer that no allowed method supports while ``keep`` is disallowed.
    """
    try:
        return _resolve(model, cfg)
    except ConfigError as err:
        if cfg.source == "<inline>":
            raise
        raise ConfigError(f"{cfg.source}: {err}") from None


def _resolve(model: nn.Module, cfg: SpaceConfig) -> SearchSpace:
    convs = conv_layers(model)
    included = _matching(convs, cfg.include, "space.layers.include")
    excluded = _matching(convs, cfg.exclude, "space.layers.exclude")
    targets = [n for n in convs if n in included and n not in excluded]
    if not targets:
        raise ConfigError("space.layers: include/exclude leave no conv layer to search")
    rules = [
        (r, _matching(targets, r.layers, f"space.overrides[{i}].layers"))
        for i, r in enumerate(cfg.overrides)
    ]
    layers = []
    for name in targets:
        methods, keep, ratio, ranks = cfg.methods, cfg.keep, cfg.ratio, dict(cfg.ranks)
        for rule, hits in rules:
            if name in hits:
                methods = rule.methods if rule.methods is not None else methods
                keep = rule.keep if rule.keep is not None else keep
                ratio = rule.ratio or ratio
                ranks = {**ranks, **(rule.ranks or {})}
        spec = ConvSpec.from_conv(model.get_submodule(name))
        supported = supporting_methods(spec)
        offered = [m for m in methods if m in supported]
        if not offered and not keep:
            raise ConfigError(
                f"layer {name!r}: none of the allowed methods ({', '.join(methods)}) supports "
                f"it and keep is false; methods that can: {', '.join(supported) or 'none'}"
            )
        if not offered:  # only "keep": nothing to search on this layer
            continue
        layers.append(
            LayerSpace(
                name=name,
                spec=spec,
                choices=tuple(offered) + ((KEEP,) if keep else ()),
                ratio=ratio,
                ranks={m: _rank_codes(name, spec, m, ranks[m]) for m in offered if m in ranks},
            )
        )
    return SearchSpace(tuple(layers))


def suggest_plan(trial: optuna.Trial, space: SearchSpace) -> dict[str, dict[str, Any]]:
    """Draw a JSON-serialisable plan for :func:`autodecomp.apply_plan` from ``trial``."""
    plan: dict[str, dict[str, Any]] = {}
    for layer in space.layers:
        method = trial.suggest_categorical(f"{layer.name}/method", list(layer.choices))
        if method == KEEP:
            plan[layer.name] = {"method": KEEP}
        elif method in layer.ranks:
            code = trial.suggest_categorical(
                f"{layer.name}/{method}/rank", list(layer.ranks[method])
            )
            plan[layer.name] = {"method": method, "rank": _decode(code)}
        else:
            r = layer.ratio
            ratio = trial.suggest_float(
                f"{layer.name}/{method}/ratio", r.lo, r.hi, log=r.log, step=r.step
            )
            plan[layer.name] = {"method": method, "ratio": ratio}
    return plan


def _snap(ratio: float, r: RatioRange) -> float:
    if r.step is not None:
        ratio = r.lo + round((ratio - r.lo) / r.step) * r.step
    return min(max(ratio, r.lo), r.hi)


def _nearest_rank(layer: LayerSpace, method: str, ratio: float) -> RankCode:
    """The largest listed rank within ``ratio`` of the dense parameters (else the smallest)."""
    cls = get_method(method)
    sized = sorted(
        (cls.param_count(layer.spec, cls.normalize_rank(layer.spec, _decode(c))), c)
        for c in layer.ranks[method]
    )
    budget = ratio * layer.spec.dense_params()
    within = [c for p, c in sized if p <= budget]
    return within[-1] if within else sized[0][1]


def uniform_params(space: SearchSpace, method: str, ratio: float | None = None) -> dict[str, Any]:
    """Fixed parameters of a uniform baseline: every layer ``method`` at ``ratio``.

    Layers that do not offer ``method`` are kept dense; the ratio is clipped (and snapped
    to the step) into each layer's range; with explicit ranks, the largest rank within the
    ratio is taken.

    Raises:
        ConfigError: no layer offers ``method``, or a layer offers neither it nor ``keep``.
    """
    if method != KEEP and not any(method in layer.choices for layer in space.layers):
        offered = sorted({m for layer in space.layers for m in layer.choices})
        raise ConfigError(
            f"warm_start {method!r} is offered on no searched layer; offered: {', '.join(offered)}"
        )
    params: dict[str, Any] = {}
    for layer in space.layers:
        key = f"{layer.name}/method"
        if method != KEEP and method in layer.choices:
            params[key] = method
            if method in layer.ranks:
                params[f"{layer.name}/{method}/rank"] = _nearest_rank(layer, method, ratio)
            else:
                params[f"{layer.name}/{method}/ratio"] = _snap(ratio, layer.ratio)
        elif KEEP in layer.choices:
            params[key] = KEEP
        else:
            raise ConfigError(
                f"warm_start {method!r}: layer {layer.name!r} offers neither it nor keep "
                f"(choices: {', '.join(layer.choices)})"
            )
    return params
