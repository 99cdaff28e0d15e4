"""The search space on a concrete model: the only module that calls ``trial.suggest_*``.

Per target layer the trial draws ``"{layer}/method"`` from a categorical whose choices are
fixed for that layer across trials (the allowed methods that support it, plus ``"keep"``
when allowed), then one method-scoped parameter: ``"{layer}/{method}/ratio"`` (a float) or,
when the space lists explicit ranks for that method, ``"{layer}/{method}/rank"``.

Shift pruning (``shift_prune`` in the space): every shift block of the model
(:func:`autodecomp.compress.prune.shift_blocks`: the 1x1 -> shift -> 1x1 blocks of a ShiftResNet, or
any module following that protocol) selected by the layer globs draws
``"{block}/shift_prune"``, the fraction of its intermediate channels removed (plan entry
``{"method": "prune", "prune": p}`` under the block's name). The 1x1 convs inside a pruned
block are not decomposition targets: pruning is how such a block is compressed, so every
module of the model has at most one plan entry and ``apply_plan`` never decomposes a layer
whose shape pruning changes. A layer that draws a method building shift blocks (``shift``)
also draws ``"{layer}/{method}/prune"`` in the same range, and its entry gets ``"prune": p``:
``apply_plan`` decomposes it, then prunes the decomposed layer.

MAC cap (``max_layer_macs`` in the space, default 1.0): no option costs more than that
fraction of its dense layer's MACs (:mod:`~autodecomp.search.mac_cap`). A method's ratio
range on a layer ends at its ratio ceiling (:meth:`LayerSpace.ratio_range`; ratios stay
fractions of the dense parameters), listed ranks over the cap are dropped, and a method
with no option under the cap is not offered on that layer.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FixedTrial
from torch import nn

from ..compress.plan import KEEP, PRUNE, PlanEntry
from ..compress.prune import prunable_methods, shift_blocks
from ..compress.surgery import conv_layers, skeleton
from ..config import Budgets, RatioRange, SpaceConfig
from ..core.errors import ConfigError
from ..decompositions import ConvSpec, get_method, supporting_methods
from ..measure.cost import count_macs, count_params
from ..measure.plan_cost import PlanCost, layer_input_shapes
from .mac_cap import ratio_ceiling, within_cap

__all__ = [
    "KEEP",
    "PRUNE",
    "BlockSpace",
    "LayerSpace",
    "SearchSpace",
    "block_params",
    "cheapest_cost",
    "check_budgets",
    "data_init_supported",
    "layer_params",
    "resolve_space",
    "suggest_plan",
    "uniform_params",
]

RankCode = int | str  # an int rank, or a JSON list for tuple ranks (Optuna choices are scalars)


@dataclass(frozen=True)
class LayerSpace:
    """What the search may do with one layer."""

    name: str
    spec: ConvSpec
    choices: tuple[str, ...]
    ratio: RatioRange
    ranks: dict[str, tuple[RankCode, ...]] = field(default_factory=dict)
    prune: RatioRange | None = None  # the pruning range of the choices in ``prunable``
    prunable: tuple[str, ...] = ()  # choices whose decomposed layer is pruned as well
    rank_multiple: int = 1  # ratio-chosen channel ranks >= this: rounded down to a multiple
    solvers: dict[str, str] = field(default_factory=dict)  # method -> non-default solver
    ceilings: dict[str, float] = field(default_factory=dict)  # method -> ratio ceiling < hi

    def ratio_range(self, method: str) -> RatioRange:
        """The ratios ``method`` draws on this layer: the space's range ending at the method's
        MAC ceiling (the whole range at the ceiling when it lies below the low end)."""
        ceiling = self.ceilings.get(method)
        r = self.ratio
        if ceiling is None or ceiling >= r.hi:
            return r
        if ceiling <= r.lo:
            return RatioRange(ceiling, ceiling, r.log, r.step)
        hi = ceiling if r.step is None else r.lo + math.floor((ceiling - r.lo) / r.step) * r.step
        return RatioRange(r.lo, hi, r.log, r.step)

    def param_names(self) -> list[str]:
        """Every parameter name this layer can produce."""
        names = [f"{self.name}/method"]
        for method in self.choices:
            if method != KEEP:
                names.append(f"{self.name}/{method}/{'rank' if method in self.ranks else 'ratio'}")
            if method in self.prunable:
                names.append(f"{self.name}/{method}/prune")
        return names


@dataclass(frozen=True)
class BlockSpace:
    """A shift block whose intermediate channels the search prunes."""

    name: str
    prune: RatioRange

    def param_names(self) -> list[str]:
        return [f"{self.name}/shift_prune"]


@dataclass(frozen=True)
class SearchSpace:
    """The resolved per-layer choices and pruned shift blocks of a search space on one model."""

    layers: tuple[LayerSpace, ...]
    blocks: tuple[BlockSpace, ...] = ()
    init: str = "weight"  # "data": decomposed layers are fitted to calibration outputs

    @property
    def names(self) -> list[str]:
        """Every plan key: the searched layers, then the pruned shift blocks."""
        return [layer.name for layer in self.layers] + [block.name for block in self.blocks]


def _encode(rank: Any) -> RankCode:
    return rank if isinstance(rank, int) else json.dumps(list(rank))


def _decode(code: RankCode) -> Any:
    return json.loads(code) if isinstance(code, str) else code


def _matching(
    names: Sequence[str], patterns: Sequence[str], where: str, kind: str = "target conv layer"
) -> set[str]:
    matched: set[str] = set()
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise ConfigError(f"{where}: glob {pattern!r} matches no {kind}; layers: {shown}")
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


def resolve_space(
    model: nn.Module, cfg: SpaceConfig, input_shape: Sequence[int] | None = None
) -> SearchSpace:
    """Apply a search-space config to a model's conv layers and (with ``shift_prune``) its
    shift blocks; the layer globs select among both.

    ``input_shape`` ``(C, H, W)`` gives each layer's input size, at which options are held
    to ``cfg.max_layer_macs`` (a study always passes it; without it nothing is capped).

    Raises:
        ConfigError: a glob that matches no layer, a rank invalid for a layer, or a target
            layer that no allowed method supports (or none under the MAC cap) while
            ``keep`` is disallowed.
    """
    try:
        return _resolve(model, cfg, None if input_shape is None else tuple(input_shape))
    except ConfigError as err:
        if cfg.source == "<inline>":
            raise
        raise ConfigError(f"{cfg.source}: {err}") from None


def _capped(
    spec: ConvSpec,
    size: tuple[int, int],
    methods: Sequence[str],
    ratio: RatioRange,
    ranks: dict[str, tuple[RankCode, ...]],
    cfg: SpaceConfig,
) -> tuple[list[str], dict[str, float], dict[str, tuple[RankCode, ...]]]:
    """The methods with an option under the MAC cap, their ratio ceilings below ``ratio.hi``
    and their listed ranks under the cap."""
    kept: list[str] = []
    ceilings: dict[str, float] = {}
    capped: dict[str, tuple[RankCode, ...]] = {}
    for method in methods:
        if method in ranks:
            codes = ranks[method]
            normal = [get_method(method).normalize_rank(spec, _decode(c)) for c in codes]
            fit = within_cap(method, spec, normal, size, cfg.max_layer_macs)
            capped[method] = tuple(c for c, r in zip(codes, normal, strict=True) if r in fit)
            if capped[method]:
                kept.append(method)
            continue
        ceiling = ratio_ceiling(method, spec, size, cfg.max_layer_macs, ratio.hi, cfg.rank_multiple)
        if ceiling is not None:
            kept.append(method)
            if ceiling < ratio.hi:
                ceilings[method] = ceiling
    return kept, ceilings, capped


def _resolve(
    model: nn.Module, cfg: SpaceConfig, input_shape: tuple[int, ...] | None
) -> SearchSpace:
    convs = conv_layers(model)
    blocks = shift_blocks(model) if cfg.shift_prune is not None else []
    kind = "conv layer or shift block" if blocks else "target conv layer"
    included = _matching(convs + blocks, cfg.include, "space.layers.include", kind)
    excluded = _matching(convs + blocks, cfg.exclude, "space.layers.exclude", kind)
    pruned = [b for b in blocks if b in included and b not in excluded]
    inside = tuple(f"{b}." for b in pruned)
    targets = [n for n in convs if n in included and n not in excluded and not n.startswith(inside)]
    if not targets and not pruned:
        raise ConfigError(f"space.layers: include/exclude leave no {kind} to search")
    rules = [
        (r, _matching(targets, r.layers, f"space.overrides[{i}].layers"))
        for i, r in enumerate(cfg.overrides)
    ]
    shapes = {} if input_shape is None else layer_input_shapes(model, input_shape, targets)
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
        listed = {m: _rank_codes(name, spec, m, ranks[m]) for m in offered if m in ranks}
        uncapped, ceilings = offered, {}
        if name in shapes:
            size = shapes[name][1:]
            offered, ceilings, listed = _capped(spec, size, offered, ratio, listed, cfg)
        if uncapped and not offered and not keep:
            raise ConfigError(
                f"layer {name!r}: every option of {', '.join(uncapped)} costs more than "
                f"space.max_layer_macs = {cfg.max_layer_macs:g} x its dense MACs and keep is "
                "false; raise max_layer_macs or allow keep"
            )
        if not offered:  # only "keep": nothing to search on this layer
            continue
        pruning = cfg.shift_prune is not None
        prunable = tuple(m for m in offered if m in prunable_methods()) if pruning else ()
        layers.append(
            LayerSpace(
                name=name,
                spec=spec,
                choices=tuple(offered) + ((KEEP,) if keep else ()),
                ratio=ratio,
                ranks=listed,
                prune=cfg.shift_prune if prunable else None,
                prunable=prunable,
                rank_multiple=cfg.rank_multiple,
                solvers={m: s for m, s in cfg.solvers.items() if m in offered},
                ceilings=ceilings,
            )
        )
    blocks_space = tuple(BlockSpace(b, cfg.shift_prune) for b in pruned)
    return SearchSpace(tuple(layers), blocks_space, cfg.init)


def _suggest_ratio(trial: optuna.Trial, name: str, r: RatioRange) -> float:
    return trial.suggest_float(name, r.lo, r.hi, log=r.log, step=r.step)


def suggest_plan(trial: optuna.Trial, space: SearchSpace) -> dict[str, dict[str, Any]]:
    """Draw a JSON-serialisable plan for :func:`autodecomp.apply_plan` from ``trial``."""
    plan: dict[str, dict[str, Any]] = {}
    for layer in space.layers:
        method = trial.suggest_categorical(f"{layer.name}/method", list(layer.choices))
        fields: dict[str, Any] = {}
        if method in layer.ranks:
            code = trial.suggest_categorical(
                f"{layer.name}/{method}/rank", list(layer.ranks[method])
            )
            fields["rank"] = _decode(code)
        elif method != KEEP:
            name = f"{layer.name}/{method}/ratio"
            fields["ratio"] = _suggest_ratio(trial, name, layer.ratio_range(method))
            if layer.rank_multiple > 1:
                fields["rank_multiple"] = layer.rank_multiple
        if method in layer.prunable:
            fields["prune"] = _suggest_ratio(trial, f"{layer.name}/{method}/prune", layer.prune)
        if space.init == "data" and data_init_supported(layer, method):
            fields["init"] = "data"
        options = {"solver": layer.solvers[method]} if method in layer.solvers else {}
        plan[layer.name] = PlanEntry(method, **fields, options=options).to_dict()
    for block in space.blocks:
        prune = _suggest_ratio(trial, f"{block.name}/shift_prune", block.prune)
        plan[block.name] = PlanEntry(PRUNE, prune=prune).to_dict()
    return plan


def data_init_supported(layer: LayerSpace, method: str | None = None) -> bool:
    """Whether ``method`` (default: any method ``layer`` offers) can fit the layer's output on
    calibration inputs (:meth:`~autodecomp.decompositions.DecomposedConv.data_init_reason`)."""
    offered = [m for m in layer.choices if m != KEEP] if method is None else [method]
    return any(m != KEEP and get_method(m).data_init_reason(layer.spec) is None for m in offered)


def _snap(ratio: float, r: RatioRange) -> float:
    if r.step is not None:
        ratio = r.lo + round((ratio - r.lo) / r.step) * r.step
    return min(max(ratio, r.lo), r.hi)


def _nearest_rank(layer: LayerSpace, method: str, ratio: float) -> RankCode:
    """The largest listed rank within ``ratio`` of the dense parameters (else the smallest):
    :meth:`~autodecomp.decompositions.DecomposedConv.rank_within` over the listed ranks."""
    cls, spec = get_method(method), layer.spec
    pairs = sorted(
        ((cls.normalize_rank(spec, _decode(c)), c) for c in layer.ranks[method]),
        key=lambda pair: (cls.param_count(spec, pair[0]), pair[1]),
    )
    chosen = cls.rank_within(spec, ratio, [rank for rank, _ in pairs])
    return next(code for rank, code in pairs if rank is chosen)


def layer_params(layer: LayerSpace, method: str, ratio: float | None = None) -> dict[str, Any]:
    """Fixed parameters putting ``layer`` on ``method`` at about ``ratio``.

    The ratio is clipped (and snapped to the step) into the method's range on the layer
    (:meth:`LayerSpace.ratio_range`: below its MAC ceiling); with explicit
    ranks, the largest rank within the ratio is taken; a pruned method's pruning ratio is
    the range's low end.
    """
    params: dict[str, Any] = {f"{layer.name}/method": method}
    if method == KEEP:
        return params
    if method in layer.ranks:
        params[f"{layer.name}/{method}/rank"] = _nearest_rank(layer, method, ratio)
    else:
        params[f"{layer.name}/{method}/ratio"] = _snap(ratio, layer.ratio_range(method))
    if method in layer.prunable:
        params[f"{layer.name}/{method}/prune"] = layer.prune.lo
    return params


def block_params(space: SearchSpace) -> dict[str, Any]:
    """The pruned shift blocks at the low end of their pruning range."""
    return {f"{block.name}/shift_prune": block.prune.lo for block in space.blocks}


def uniform_params(space: SearchSpace, method: str, ratio: float | None = None) -> dict[str, Any]:
    """Fixed parameters of a uniform baseline: every layer ``method`` at ``ratio``.

    Layers that do not offer ``method`` are kept dense; each layer's value is that of
    :func:`layer_params`; shift blocks are at the low end of their pruning range.

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
        if method in layer.choices:
            params |= layer_params(layer, method, ratio)
        elif KEEP in layer.choices:
            params |= layer_params(layer, KEEP)
        else:
            raise ConfigError(
                f"warm_start {method!r}: layer {layer.name!r} offers neither it nor keep "
                f"(choices: {', '.join(layer.choices)})"
            )
    return params | block_params(space)


def _smallest_params(layer: LayerSpace, method: str) -> dict[str, Any]:
    """``layer`` on ``method`` at its smallest option: the low end of the ratio range (or
    the smallest listed rank), pruned at the high end of the pruning range."""
    params = layer_params(layer, method, 0.0)  # clipped to the range's low end
    if method in layer.prunable:
        params[f"{layer.name}/{method}/prune"] = layer.prune.hi
    return params


def cheapest_cost(
    model: nn.Module, space: SearchSpace, input_shape: tuple[int, ...]
) -> dict[str, int]:
    """``{"macs": ..., "params": ...}``: the least MACs and the least parameters of any plan
    of ``space``, each layer at its cheapest smallest option (``keep`` included when
    allowed) and each shift block pruned at the high end of its range.

    Counted by fvcore on unfitted skeletons of the plans (:func:`~autodecomp.compress.surgery
    .skeleton`), one per method: a layer's cost depends on its own option only, so the
    least total is the baseline's with every layer's dense cost swapped for its least.
    """
    cost = PlanCost(model, input_shape, space.names)
    dense_params = {n: count_params(model.get_submodule(n)) for n in space.names}
    least = {n: (cost.dense_macs(n), dense_params[n]) for n in space.names}
    for layer in space.layers:
        if KEEP not in layer.choices:  # its dense cost is no option
            least[layer.name] = (math.inf, math.inf)
    blocks = {f"{b.name}/shift_prune": b.prune.hi for b in space.blocks}
    methods = dict.fromkeys(m for layer in space.layers for m in layer.choices if m != KEEP)
    for method in methods or [KEEP]:
        layers = tuple(layer for layer in space.layers if method in layer.choices)
        params = dict(blocks)
        for layer in layers:
            params |= _smallest_params(layer, method)
        sub = SearchSpace(layers, space.blocks)
        plan = suggest_plan(FixedTrial(params), sub)
        _, _, records = cost(skeleton(model, plan), plan)
        for name, record in records.items():
            macs, count = least[name]
            least[name] = (min(macs, record["macs"]), min(count, record["params"]))
    return {
        "macs": cost.macs + sum(least[n][0] - cost.dense_macs(n) for n in space.names),
        "params": count_params(model) + sum(least[n][1] - dense_params[n] for n in space.names),
    }


def check_budgets(
    model: nn.Module, space: SearchSpace, budgets: Budgets, input_shape: tuple[int, ...]
) -> None:
    """Raise :class:`ConfigError` if ``budgets.max_macs`` or ``max_params`` is below the
    cheapest plan of ``space`` (:func:`cheapest_cost`): every trial would be over budget.

    ``model`` may be untrained: only its structure is counted.
    """
    wanted = {"macs": budgets.max_macs, "params": budgets.max_params}
    if all(v is None for v in wanted.values()):
        return
    shape = tuple(input_shape)
    limits = budgets.limits(count_macs(model, shape), count_params(model))
    least = cheapest_cost(model, space, shape)
    for key, budget in wanted.items():
        if budget is None or limits[key] >= least[key]:
            continue
        unit = "MACs" if key == "macs" else "params"
        given = f"{limits[key]:,.0f}" if budget > 1 else f"{budget:g} ({limits[key]:,.0f} {unit})"
        raise ConfigError(
            f"budgets.max_{key} {given} is below the cheapest plan of the space "
            f"({least[key]:,} {unit}: every layer at its smallest option)"
        )
