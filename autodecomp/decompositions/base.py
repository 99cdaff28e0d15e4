"""The contract every decomposition method implements, and the registry that holds them."""

from __future__ import annotations

import functools
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..core.errors import DecompositionError, UnsupportedLayerError
from ..core.registry import Registry
from ..core.spec import ConvSpec
from ..factorize.cache import FactorCache, default_cache, weight_key
from ..factorize.output_fit import balance_norms, refine_output_fit, unwhiten_rows, whiten_input
from ..factorize.tensorly_solvers import SOLVERS, check_solver_name, from_tensorly

if TYPE_CHECKING:
    from ..factorize.input_stats import InputStats

__all__ = [
    "DATA_DAMPING",
    "REFINE_STEPS",
    "SOLVERS",
    "DecomposedConv",
    "check_finite_kernel",
    "check_rank_multiple",
    "check_rank_request",
    "check_ratio",
    "get_method",
    "methods",
    "register",
    "supporting_methods",
]

Rank = Any  # each method documents its own rank spec (int, tuple, ...), always JSON-serialisable

DATA_DAMPING = 1e-2  # data-aware fits use Σ + DATA_DAMPING * mean(diag Σ) * I
REFINE_STEPS = 50  # L-BFGS iterations of the output-error refinement


def check_ratio(ratio: Any) -> None:
    """A target ratio is a fraction of the dense layer's parameters: a number in ``(0, 1]``
    (above 1 a decomposed layer would be bigger than the dense one)."""
    number = isinstance(ratio, int | float) and not isinstance(ratio, bool)
    if not (number and math.isfinite(ratio) and 0 < ratio <= 1):
        raise ValueError(
            f"ratio must be a number in (0, 1] (a fraction of the dense layer's parameters), "
            f"got {ratio!r}"
        )


def check_finite_kernel(method: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """A kernel (or bias) with NaN or Inf entries has no decomposition: raise
    :class:`DecompositionError` before any solver sees it (an SVD of it fails or returns
    non-finite factors)."""
    bad = [(what, t) for what, t in (("kernel", weight), ("bias", bias)) if t is not None]
    bad = [(what, t) for what, t in bad if not bool(torch.isfinite(t).all())]
    if bad:
        what, tensor = bad[0]
        nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
        raise DecompositionError(
            f"{method} cannot decompose a {what} with non-finite (NaN or inf) entries: {nan} NaN, "
            f"{inf} Inf of {tensor.numel()}"
        )


def _checked_first(from_weight: Callable[..., DecomposedConv]) -> Callable[..., DecomposedConv]:
    """``from_weight`` that first refuses a ``solver`` option the method does not have
    (:meth:`DecomposedConv.check_solver`) and a non-finite kernel (:func:`check_finite_kernel`)."""

    @functools.wraps(from_weight)
    def checked(cls: type[DecomposedConv], weight: torch.Tensor, bias: Any, *args, **kwargs):
        if "solver" in kwargs:
            cls.check_solver(kwargs["solver"])
        check_finite_kernel(getattr(cls, "name", cls.__name__), weight, bias)
        return from_weight(cls, weight, bias, *args, **kwargs)

    return checked


def check_rank_multiple(multiple: Any) -> None:
    """A rank multiple (:meth:`DecomposedConv.align_rank`) must be an integer >= 1."""
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"rank_multiple must be an integer >= 1, got {multiple!r}")


def check_rank_request(rank: Any, ratio: Any) -> None:
    """A layer is given exactly one of an explicit rank and a target ratio."""
    if (ratio is None) == (rank is None):
        raise ValueError(
            f"give exactly one of ratio= or rank= (got ratio={ratio!r}, rank={rank!r})"
        )


class DecomposedConv(nn.Module, ABC):
    """A structured replacement for a dense ``nn.Conv2d``.

    Subclasses own everything about their method: the rank spec and its valid range for a
    given layer, ratio -> rank, initialisation from the dense kernel, the forward pass, and
    exact parameter / MAC formulas. They are registered with :func:`register`.
    """

    name: ClassVar[str]
    rank_help: ClassVar[str] = ""
    input_stage: ClassVar[str | None] = None
    """The 1x1 submodule that reads the input channels first, if the method has one: an
    input-channel map is then absorbed into its weight (see :meth:`whitened_init`)."""
    builds_shift_block: ClassVar[bool] = False
    """Whether the decomposed layer is a shift block (``first`` 1x1, ``shift``, ``last``
    1x1) that :mod:`autodecomp.compress.prune` can prune."""
    supports_data_init: ClassVar[bool] = True
    """Whether the method fits a layer's output on calibration inputs
    (:meth:`from_calibration`); see :meth:`data_init_reason`."""
    tensorly_solver: ClassVar[str | None] = None
    """The tensorly function that :meth:`from_weight` runs with ``solver="tensorly"`` (e.g.
    ``"parafac"``), or ``None`` when the method has no tensorly solver."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Each method's own :meth:`from_weight` (every initialisation passes it, the
        data-aware one included) refuses a bad ``solver`` and a non-finite kernel first: one
        check for all."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("from_weight")
        if isinstance(own, classmethod):
            cls.from_weight = classmethod(_checked_first(own.__func__))  # type: ignore[assignment]

    @classmethod
    def check_solver(cls, solver: Any) -> str:
        """``solver`` (one of :data:`SOLVERS`) if this method has it, else a ValueError.

        ``"autodecomp"`` (the default) is the method's own solver; ``"tensorly"`` runs
        :attr:`tensorly_solver` instead, in float64, as a cross-check and fallback.
        """
        check_solver_name(solver)
        if solver == "tensorly" and cls.tensorly_solver is None:
            raise ValueError(f"method {cls.name!r} has no tensorly solver; valid: autodecomp")
        return solver

    def __init__(self, spec: ConvSpec, rank: Rank) -> None:
        super().__init__()
        self.spec = spec
        self.rank = rank
        self.bias = nn.Parameter(torch.zeros(spec.out_channels)) if spec.bias else None

    # ---- what a method says about a layer ------------------------------------------------
    @classmethod
    def unsupported_reason(cls, spec: ConvSpec) -> str | None:
        """Why this method cannot serve ``spec``, or ``None`` when it can."""
        if spec.groups != 1:
            return f"grouped conv (groups={spec.groups}) needs a method for grouped convs"
        if spec.padding_mode != "zeros":
            return f"padding_mode={spec.padding_mode!r} (only 'zeros' is supported)"
        return None

    @classmethod
    def data_init_reason(cls, spec: ConvSpec) -> str | None:
        """Why this method cannot fit ``spec``'s output on calibration inputs (``"init":
        "data"``), or ``None`` when it can: input statistics are collected of plain
        zero-padded convs only."""
        if not cls.supports_data_init:
            return f"method {cls.name!r} has no data-aware initialisation"
        if spec.groups != 1 or spec.padding_mode != "zeros":
            return "only groups=1 convs with zero padding are supported"
        return None

    @classmethod
    @abstractmethod
    def normalize_rank(cls, spec: ConvSpec, rank: Rank) -> Rank:
        """Validate an explicit rank spec and return it in canonical form (raises ValueError)."""

    @classmethod
    @abstractmethod
    def param_count(cls, spec: ConvSpec, rank: Rank) -> int:
        """Exact number of parameters (bias included) of the decomposed layer."""

    @classmethod
    @abstractmethod
    def rank_candidates(cls, spec: ConvSpec) -> Iterable[Rank]:
        """Valid ranks along the method's default path, in non-decreasing parameter count."""

    @classmethod
    def rank_within(cls, spec: ConvSpec, ratio: float, ranks: Iterable[Rank]) -> Rank | None:
        """The last of ``ranks`` (listed in non-decreasing parameter count) whose parameters
        are <= ``ratio`` x dense, else the first; ``None`` when ``ranks`` is empty."""
        budget = ratio * spec.dense_params()
        chosen = None
        for rank in ranks:
            if chosen is not None and cls.param_count(spec, rank) > budget:
                break
            chosen = rank
        return chosen

    @classmethod
    def rank_for_ratio(cls, spec: ConvSpec, ratio: float, rank_multiple: int = 1) -> Rank:
        """Largest rank on the default path within ``ratio`` (:meth:`rank_within`), its
        channel widths then rounded down to ``rank_multiple`` (:meth:`align_rank`)."""
        check_ratio(ratio)
        chosen = cls.rank_within(spec, ratio, cls.rank_candidates(spec))
        if chosen is None:
            raise UnsupportedLayerError(f"method {cls.name!r} has no valid rank for {spec}")
        return cls.align_rank(spec, chosen, rank_multiple)

    @classmethod
    def resolve_rank(
        cls, spec: ConvSpec, *, rank: Any = None, ratio: float | None = None, rank_multiple: int = 1
    ) -> Rank:
        """The layer's rank: ``rank`` checked (:meth:`normalize_rank`) if given, else the
        rank of ``ratio`` (:meth:`rank_for_ratio`, aligned to ``rank_multiple``)."""
        if rank is not None:
            return cls.normalize_rank(spec, rank)
        return cls.rank_for_ratio(spec, ratio, rank_multiple)

    @classmethod
    def align_rank(cls, spec: ConvSpec, rank: Rank, multiple: int) -> Rank:
        """``rank`` with each channel width (a count of intermediate channels) that is at
        least ``multiple`` rounded down to a multiple of it; smaller widths, and ranks that
        are not channel widths (the default), are kept. Fewer parameters, so a rank within
        a ratio stays within it.

        CPU convolution kernels work on channels in vectors of 8 floats: a 25->25 3x3 conv
        costs about as much as a 32->32 one (``bench/latency.py --rank-multiple``).
        """
        check_rank_multiple(multiple)
        return rank if multiple == 1 else cls._aligned(spec, rank, multiple)

    @classmethod
    def _aligned(cls, spec: ConvSpec, rank: Rank, multiple: int) -> Rank:
        """The method's part of :meth:`align_rank` (``multiple`` > 1): keep ``rank``."""
        return rank

    @classmethod
    @abstractmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spec: ConvSpec,
        rank: Rank,
        **opts: Any,
    ) -> DecomposedConv:
        """Initialise the factors from a dense kernel (``rank`` already normalised)."""

    @classmethod
    def from_calibration(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spec: ConvSpec,
        rank: Rank,
        stats: InputStats,
        *,
        damping: float = DATA_DAMPING,
        refine_steps: int = REFINE_STEPS,
        whiten: bool = True,
        cache: FactorCache = default_cache,
        **opts: Any,
    ) -> DecomposedConv:
        """Data-aware initialisation: fit the layer's output on calibration inputs.

        Minimises ``tr(E Σ_λ E^T)``, ``E = dense_weight() - W``, ``Σ_λ = Σ + λ mean(diag Σ) I``:
        the mean squared output error on the calibration images (``λ = 0``) plus a small
        weight-space term that keeps directions the calibration data never excites close to
        the kernel. Two stages: :meth:`whitened_init`, then ``refine_steps`` L-BFGS iterations
        on the exact objective over all factors (float64), cached per (weight, statistics,
        rank, options); finally the factors' norms are equalised (``balance_norms``).

        Args:
            stats: the input statistics of this layer (:mod:`autodecomp.compress.calibration`).
            damping: ``λ`` (> 0 unless ``Σ`` is non-singular).
            refine_steps: L-BFGS iterations of the second stage (0 skips it).
            whiten: run :meth:`whitened_init`; ``False`` starts the refinement from the
                weight-space initialisation instead.
            cache: where factorisations are kept.
            **opts: the method's own options, as for :meth:`from_weight`.
        """
        if refine_steps < 0:
            raise ValueError(f"refine_steps must be >= 0, got {refine_steps!r}")
        if whiten:
            module = cls.whitened_init(
                weight, bias, spec, rank, stats, damping=damping, cache=cache, **opts
            )
        else:
            module = cls.from_weight(weight, bias, spec, rank, cache=cache, **opts)
            module = module.to(dtype=torch.float64)
        if refine_steps > 0:
            extra = json.dumps({k: repr(v) for k, v in opts.items()}, sort_keys=True)
            key = (
                f"{cls.name}/data-v1/{weight_key(weight)}/{stats.key}/"
                f"{json.dumps(rank, sort_keys=True)}/{damping!r}/{refine_steps}/{whiten}/{extra}"
            )
            factor = stats.patch_factor(damping)

            def refine() -> list[torch.Tensor]:
                refine_output_fit(module, weight, factor, refine_steps)
                return [p.detach().clone() for n, p in module.named_parameters() if n != "bias"]

            fitted = cache.get_or_compute(key, refine)
            with torch.no_grad():
                mine = [p for n, p in module.named_parameters() if n != "bias"]
                for param, value in zip(mine, fitted, strict=True):
                    param.copy_(value)
        balance_norms(module)
        return module.to(dtype=weight.dtype)

    @classmethod
    def whitened_init(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spec: ConvSpec,
        rank: Rank,
        stats: InputStats,
        *,
        damping: float,
        cache: FactorCache,
        **opts: Any,
    ) -> DecomposedConv:
        """First stage of :meth:`from_calibration` (float64 factors).

        With an :attr:`input_stage`: factorise ``W' = W ×_C L_C`` (``L_C`` the Cholesky
        factor of the damped channel moment ``Σ_C``) by the method's own initialisation, then
        right-multiply the input stage by ``L_C^{-1}``. For an ALS method this is the fit
        weighted by ``Σ_C``; for an SVD method it is the SVD in whitened coordinates, optimal
        for the output error when the input's spatial correlation is ignored
        (``Σ = Σ_C ⊗ I``). Without an input stage (the structure does not survive an
        arbitrary input-channel map): the weight-space initialisation.
        """
        if cls.input_stage is None:
            module = cls.from_weight(weight, bias, spec, rank, cache=cache, **opts)
            return module.to(dtype=torch.float64)
        factor = stats.channel_factor(damping)
        whitened = whiten_input(weight.detach(), factor)
        module = cls.from_weight(whitened, bias, spec, rank, cache=cache, **opts)
        stage = module.get_submodule(cls.input_stage)
        with torch.no_grad():
            rows = unwhiten_rows(stage.weight[:, :, 0, 0], factor)
            stage.weight.copy_(rows[:, :, None, None])
        return module

    @classmethod
    def empty_like(cls, spec: ConvSpec, rank: Rank, weight: torch.Tensor) -> DecomposedConv:
        """An uninitialised layer on the device and in the dtype of ``weight``.

        Built on the meta device and then given empty storage, so the default random
        initialisation of its sub-layers (most of a warm rank change) is skipped; a layer
        with buffers (computed in its constructor) is built normally.
        """
        with torch.device("meta"):
            module = cls(spec, rank)
        if next(module.buffers(), None) is not None:
            module = cls(spec, rank)
            return module.to(device=weight.device, dtype=weight.dtype)
        return module.to_empty(device=weight.device).to(dtype=weight.dtype)

    @classmethod
    def random(cls, spec: ConvSpec, rank: Rank, generator: torch.Generator) -> DecomposedConv:
        """A layer with random factors at ``rank``; its ``dense_weight()`` has exactly that rank."""
        module = cls(spec, cls.normalize_rank(spec, rank))
        with torch.no_grad():
            for param in module.parameters():
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype))
        return module

    # ---- what a layer instance provides ----------------------------------------------------
    @abstractmethod
    def dense_weight(self) -> torch.Tensor:
        """The effective dense kernel, shape ``(F, C, kh, kw)``."""

    @abstractmethod
    def macs(self, h: int, w: int) -> int:
        """Multiply-adds of one forward pass on a single ``h x w`` input (fvcore's convention)."""

    def params(self) -> int:
        return self.param_count(self.spec, self.rank)

    def to_tensorly(self) -> Any:
        """The layer's factors as a tensorly factorized tensor (``CPTensor``, ``TuckerTensor``,
        ``TTTensor``, ``TRTensor``) on the active tensorly backend, copied and detached.

        tensorly's reconstruction of it (``tl.cp_to_tensor`` etc.), mapped by
        :meth:`kernel_from_tensorly`, is :meth:`dense_weight`. Each method documents which
        tensor it factorises; the bias is not part of it.
        """
        raise NotImplementedError(f"method {self.name!r} has no tensorly form")

    def kernel_from_tensorly(self, full: Any) -> torch.Tensor:
        """The ``(F, C, kh, kw)`` kernel of the dense reconstruction of :meth:`to_tensorly`
        (a tensor of any tensorly backend), as a torch tensor: by default a reshape."""
        return from_tensorly(full).reshape(self.spec.weight_shape)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"{s.in_channels}, {s.out_channels}, kernel_size={s.kernel_size}, "
            f"stride={s.stride}, rank={self.rank!r}"
        )


_METHODS: Registry[type[DecomposedConv]] = Registry("decomposition method")


def round_down_width(width: int, multiple: int) -> int:
    """``width`` rounded down to a multiple of ``multiple`` if it is at least ``multiple``."""
    return width if width < multiple else width - width % multiple


def register(name: str) -> Callable[[type[DecomposedConv]], type[DecomposedConv]]:
    """Class decorator that registers a method under ``name`` (duplicates raise)."""

    def decorate(cls: type[DecomposedConv]) -> type[DecomposedConv]:
        if not (isinstance(cls, type) and issubclass(cls, DecomposedConv)):
            raise TypeError(f"{cls!r} is not a DecomposedConv subclass")
        _METHODS.add(name, cls)
        cls.name = name
        return cls

    return decorate


def methods() -> list[str]:
    """Registered method names, sorted."""
    return _METHODS.names()


def get_method(name: str) -> type[DecomposedConv]:
    """The method class registered under ``name``; unknown names list the valid ones."""
    return _METHODS.get(name)


def supporting_methods(spec: ConvSpec) -> list[str]:
    """Methods that can serve a layer of this geometry."""
    return [n for n, cls in _METHODS.items() if cls.unsupported_reason(spec) is None]
