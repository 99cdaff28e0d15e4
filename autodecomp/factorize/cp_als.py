"""CP (CANDECOMP/PARAFAC) decomposition by alternating least squares, in float64 torch.

Built for conv kernels (3- and 4-way tensors with a few large and a few tiny modes), for
any order:

- Singleton modes are squeezed out; a vector or matrix is solved exactly by truncated SVD.
- The modes are split into a leading and a trailing group. Each sweep does two large
  contractions (the tensor with the trailing factors, then with the leading ones); every
  MTTKRP is finished from those partials by small batched products, so no large
  Khatri-Rao product is formed.
- Normal equations (Hadamard product of the Gram matrices) are solved by Cholesky with a
  tiny proximal ridge. The fit is tracked from the Gram matrices, switching to the exact
  residual once the error is too small for that formula's precision.
- Bro's line search extrapolates along the last sweep's step every other sweep.
- Small problems not fitted exactly (ALS stalls in swamps and local minima) are polished
  by Levenberg-Marquardt and retried from a couple of seeded random starts.
- NaN/Inf and degenerate solutions (weights diverging while components cancel) raise
  :class:`~autodecomp.core.errors.DecompositionError`.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..core.errors import DecompositionError
from .cp_ops import hadamard, khatri_rao, normalize_columns, scaled, split_modes, unflatten

__all__ = ["cp_als", "cp_to_tensor", "default_max_iter"]

_EXACT_BELOW = 1e-3  # below this relative error the Gram-based fit formula loses digits
_FLOOR = 1e-12  # relative error treated as an exact fit
_SWEEP_FLOPS, _MIN_SWEEPS, _MAX_SWEEPS = 5e10, 20, 500  # the default sweep cap
_LS_START, _LS_EVERY, _LS_MAX_FAIL = 2, 2, 4  # extrapolation: start, period, fails to back off
_RESCUE_MAX_PARAMS = 1000  # inexact fits are rescued when rank * sum(shape) is at most this
_RESTARTS = 2  # random starts tried by a rescue
_LM_WARMUP, _LM_ITERS = 5, 100  # ALS sweeps before, and iterations of, Levenberg-Marquardt
_LM_CHECKPOINT = 30  # LM iterations after which a start that is not the best is dropped
_LM_STALL, _LM_STALLS = 1e-4, 3  # LM stops after this many iterations gaining less than this
_LM_SPREAD = 10.0  # ... and is undone once the weights pass this (heading for degeneracy)
_LM_TAU, _LM_MAX_NU = 1e-3, 2.0**40  # initial damping; damping growth that means no progress


@dataclass(frozen=True)
class _Settings:
    max_iter: int
    tol: float
    ridge: float
    linesearch: bool
    max_spread: float
    rescue: bool
    rescue_below: float
    restarts: int
    contraction_dtype: torch.dtype  # of the two tensor-sized contractions of a sweep


def default_max_iter(numel: int, rank: int) -> int:
    """The default sweep cap of a rank-``rank`` CP of a tensor of ``numel`` entries: 500, fewer
    on large problems so that the sweeps' contractions cost about 5e10 flops (at least 20)."""
    per_sweep = 4 * numel * rank  # two tensor-sized contractions with R columns
    return int(min(_MAX_SWEEPS, max(_MIN_SWEEPS, _SWEEP_FLOPS / per_sweep)))


def cp_to_tensor(weights: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """The dense tensor ``sum_r weights[r] * factors[0][:, r] o factors[1][:, r] o ...``."""
    shape = [f.shape[0] for f in factors]
    if len(factors) == 1:
        return factors[0] @ weights
    split = split_modes(shape)
    left = khatri_rao(factors[:split]) * weights
    return (left @ khatri_rao(factors[split:]).T).reshape(shape)


def cp_als(
    tensor: torch.Tensor,
    rank: int,
    *,
    max_iter: int | None = None,
    tol: float = 1e-6,
    init: str | Sequence[torch.Tensor] = "svd",
    seed: int = 0,
    ridge: float = 1e-12,
    linesearch: bool = True,
    max_spread: float = 1e3,
    balance: bool = True,
    rescue: bool = True,
    rescue_below: float = math.inf,
    restarts: int = _RESTARTS,
    single_contractions: bool = False,
    callback: Callable[[int, float], None] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """Rank-``rank`` CP decomposition of ``tensor`` by ALS.

    Args:
        tensor: a real tensor of any order (computed in float64 on its device).
        rank: number of components (>= 1).
        max_iter: cap on ALS sweeps; ``None`` allows 500, fewer on large problems so that
            the sweeps' contractions cost about 5e10 flops (but at least 20 sweeps).
        tol: stop once a sweep lowers the relative error by less than ``tol`` times itself.
        init: ``"svd"`` (leading left singular vectors of each unfolding, padded with seeded
            random columns when ``rank`` exceeds the mode size), ``"random"``, or start
            factors (a warm start: one ``(mode size, rank)`` matrix per mode, any scaling).
        seed: seed of every random draw, so results are reproducible.
        ridge: proximal term (towards the previous iterate) added to the unit-diagonal
            normal equations; it conditions the solves without biasing an exact fit.
        linesearch: extrapolate along the last sweep's step (Bro 1998) when it helps.
        max_spread: raise when the norm of the component weights exceeds this multiple of
            the tensor norm (diverging components that cancel each other).
        balance: spread each component's weight evenly over its factor columns (weights
            returned as ones); otherwise factor columns have unit norm and the weights
            carry the scale.
        rescue: when ALS ends short of an exact fit on a small problem (rank * sum of the
            mode sizes <= 1000), polish it by Levenberg-Marquardt and also try two seeded
            random starts, keeping the best (ALS stalls in swamps and local minima).
        rescue_below: rescue only ALS fits whose relative error is below this.
        restarts: the random starts a rescue tries after its polish.
        single_contractions: run the sweeps' two tensor-sized contractions in float32 (the
            solves, Gram matrices and errors stay float64): about 1.3x faster on large
            problems, for fits that stop far above float32's rounding (search precision).
        callback: called as ``callback(sweep, rel_error)`` after every sweep of the ALS from
            ``init`` (not during a rescue), e.g. to time the error trajectory.

    Returns:
        ``(weights, factors, rel_error)``: ``weights`` of shape ``(rank,)``, ``factors[n]``
        of shape ``(tensor.shape[n], rank)`` (float64), components sorted by decreasing
        weight, and the relative Frobenius error of the reconstruction.

    Raises:
        DecompositionError: NaN/Inf in the input or iterates, or a degenerate solution.
        ValueError: bad ``rank``, ``init`` or ``max_iter``.
    """
    rank = _check_rank(rank)
    if isinstance(init, str) and init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd', 'random' or start factors, got {init!r}")
    if max_iter is not None and max_iter < 1:
        raise ValueError(f"max_iter must be >= 1 or None, got {max_iter!r}")
    x = tensor.detach().to(torch.float64)
    if x.dim() == 0:
        raise ValueError("cp_als needs a tensor with at least one mode")
    if not torch.isfinite(x).all():
        raise DecompositionError("CP-ALS input contains NaN or Inf values")
    shape = list(x.shape)
    norm = torch.linalg.vector_norm(x)
    if norm == 0:
        return x.new_zeros(rank), [x.new_zeros(s, rank) for s in shape], 0.0

    if max_iter is None:
        max_iter = default_max_iter(x.numel(), rank)
    settings = _Settings(
        max_iter,
        tol,
        ridge,
        linesearch,
        max_spread,
        rescue,
        rescue_below,
        restarts,
        torch.float32 if single_contractions else torch.float64,
    )
    gen = torch.Generator(device=x.device).manual_seed(seed)
    keep = [i for i, s in enumerate(shape) if s > 1] or [0]
    core = x.reshape([shape[i] for i in keep]) / norm
    if core.dim() <= 2:
        weights, kept = _svd_cp(core, rank, gen)
    else:
        start = init if isinstance(init, str) else _start(init, shape, rank, keep, norm)
        weights, kept = _solve(core, rank, start, gen, settings, callback)
    factors = [x.new_ones(1, rank) for _ in shape]
    for mode, factor in zip(keep, kept, strict=True):
        factors[mode] = factor
    weights = weights * norm

    order = torch.argsort(weights, descending=True)
    weights, factors = weights[order], [f[:, order] for f in factors]
    rel_error = float(torch.linalg.vector_norm(cp_to_tensor(weights, factors) - x) / norm)
    if not math.isfinite(rel_error):
        raise DecompositionError("CP-ALS produced a non-finite reconstruction")
    if balance:
        scale = weights ** (1.0 / len(factors))
        factors = [f * scale for f in factors]
        weights = torch.ones_like(weights)
    return weights, factors, rel_error


def _start(
    init: Sequence[torch.Tensor], shape: list[int], rank: int, keep: list[int], norm: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Start factors as unit columns of the kept modes and weights (of the unit-norm tensor)."""
    sizes = [tuple(f.shape) for f in init]
    if sizes != [(s, rank) for s in shape]:
        raise ValueError(f"start factors must have the shapes {[(s, rank) for s in shape]}")
    weights, unit = normalize_columns([f.detach().to(norm) for f in init])
    for mode in set(range(len(shape))) - set(keep):
        weights = weights * unit[mode][0]  # a singleton mode's sign
    return weights / norm, [unit[mode] for mode in keep]


def _solve(
    x: torch.Tensor,
    rank: int,
    init: str | tuple[torch.Tensor, list[torch.Tensor]],
    gen: torch.Generator,
    settings: _Settings,
    callback: Callable[[int, float], None] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """ALS from ``init``; small problems short of an exact fit are then rescued."""
    solver = _Solver(x, rank, settings)
    if isinstance(init, str):
        weights, factors = x.new_ones(rank), _initial_factors(x, rank, init, gen)
    else:
        weights, factors = init
    weights, err, _ = solver.als(weights, factors, settings.max_iter, callback)
    small = rank * sum(x.shape) <= _RESCUE_MAX_PARAMS
    if settings.rescue and small and _FLOOR < err < settings.rescue_below:
        weights, factors = _rescue(solver, weights, factors, err, gen)
    return weights, factors


def _rescue(
    solver: _Solver,
    weights: torch.Tensor,
    factors: list[torch.Tensor],
    err: float,
    gen: torch.Generator,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Levenberg-Marquardt from the stalled fit, then from random starts; keeps the best."""
    best = (weights, factors, err)
    for attempt in range(1 + solver.settings.restarts):
        if best[2] <= _FLOOR:
            break
        try:
            if attempt == 0:
                trial_weights, trial = weights, [f.clone() for f in factors]
            else:
                trial = _initial_factors(solver.x, solver.rank, "random", gen)
                trial_weights, _, _ = solver.als(weights.new_ones(solver.rank), trial, _LM_WARMUP)
            trial_weights, trial_err, _ = solver.levenberg_marquardt(trial_weights, trial, best[2])
        except DecompositionError:
            continue
        if trial_err < best[2]:
            best = (trial_weights, trial, trial_err)
    return best[0], best[1]


class _Solver:
    """CP fitting of a unit-norm tensor of order >= 3 (unit-norm factor columns + weights)."""

    def __init__(self, x: torch.Tensor, rank: int, settings: _Settings) -> None:
        self.x = x
        self.shape = list(x.shape)
        self.rank = rank
        self.settings = settings
        self.split = split_modes(self.shape)
        self.left = list(range(self.split))
        self.right = list(range(self.split, x.dim()))
        self.data = x.to(settings.contraction_dtype)  # what the two large contractions read
        self.matrix = self.data.reshape(math.prod(self.shape[: self.split]), -1)

    # ---- the two large contractions ------------------------------------------------------
    def contract_right(self, factors: list[torch.Tensor]) -> torch.Tensor:
        """The tensor contracted with the trailing factors: shape ``(R, *leading dims)``."""
        factors = [f.to(self.data.dtype) for f in factors]
        n_left, n_right = self.matrix.shape
        last = self.shape[-1]
        if n_left + n_right <= self.x.numel() // last:  # Khatri-Rao of the group is small
            kr = khatri_rao([factors[k] for k in self.right])
            out = (kr.T @ self.matrix.T).reshape(self.rank, *self.shape[: self.split])
            return out.to(torch.float64)
        out = (factors[-1].T @ self.data.reshape(-1, last).T).reshape(self.rank, *self.shape[:-1])
        for k in reversed(self.right[:-1]):
            out = _reduce(out, factors[k], out.dim() - 2)
        return out.to(torch.float64)

    def contract_left(self, factors: list[torch.Tensor]) -> torch.Tensor:
        """The tensor contracted with the leading factors: shape ``(R, *trailing dims)``."""
        factors = [f.to(self.data.dtype) for f in factors]
        n_left, n_right = self.matrix.shape
        first = self.shape[0]
        if n_left + n_right <= self.x.numel() // first:
            kr = khatri_rao([factors[k] for k in self.left])
            out = (kr.T @ self.matrix).reshape(self.rank, *self.shape[self.split :])
            return out.to(torch.float64)
        out = (factors[0].T @ self.data.reshape(first, -1)).reshape(self.rank, *self.shape[1:])
        for k in self.left[1:]:
            out = _reduce(out, factors[k], 0)
        return out.to(torch.float64)

    # ---- ALS -------------------------------------------------------------------------------
    def solve(
        self, grams: list[torch.Tensor], mode: int, mttkrp: torch.Tensor, previous: torch.Tensor
    ) -> torch.Tensor:
        """Least-squares update of one factor, transposed ``(R, I_mode)``.

        The ridge pulls towards the ``previous`` value (transposed) rather than towards zero,
        so it keeps the system well conditioned without biasing an exact fit.
        """
        ridge = self.settings.ridge
        gram = hadamard(grams, skip=(mode,))
        gram.diagonal().add_(ridge)
        rhs = mttkrp + ridge * previous
        chol, info = torch.linalg.cholesky_ex(gram)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, chol)
        return torch.linalg.pinv(gram, hermitian=True) @ rhs

    def sweep(
        self,
        weights: torch.Tensor,
        factors: list[torch.Tensor],
        grams: list[torch.Tensor],
        partial: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Update every factor in place; returns the weights and the last mode's MTTKRP.

        ``partial`` is the tensor contracted with the current trailing factors, if known.
        """
        for mode in range(len(factors)):
            if mode == 0:
                partial = self.contract_right(factors) if partial is None else partial
                group = self.left
            elif mode == self.split:
                partial = self.contract_left(factors)
                group = self.right
            mttkrp = _mttkrp(partial, factors, group, mode)
            update = self.solve(grams, mode, mttkrp, (factors[mode] * weights).T)
            weights = torch.linalg.vector_norm(update, dim=1)
            factors[mode] = (update / weights.clamp_min(1e-300)[:, None]).T
            grams[mode] = factors[mode].T @ factors[mode]
        return weights, mttkrp

    def error(
        self,
        weights: torch.Tensor,
        factors: list[torch.Tensor],
        grams: list[torch.Tensor],
        inner: torch.Tensor,
    ) -> float:
        """Relative error from ``<X, X_hat>`` and the Gram matrices (exact when small)."""
        squared = 1.0 - 2.0 * float(inner) + float(weights @ hadamard(grams) @ weights)
        if squared < _EXACT_BELOW**2:
            return float(torch.linalg.vector_norm(cp_to_tensor(weights, factors) - self.x))
        return math.sqrt(squared)

    def check(self, weights: torch.Tensor, grams: list[torch.Tensor], err: float) -> None:
        """Raise on non-finite iterates or diverging, cancelling components."""
        if not (math.isfinite(err) and torch.isfinite(weights).all()):
            raise DecompositionError("CP-ALS produced NaN/Inf iterates (ill-conditioned problem)")
        spread = float(torch.linalg.vector_norm(weights))
        if spread > self.settings.max_spread:
            congruence = hadamard(grams)
            congruence.fill_diagonal_(1.0)
            i, j = divmod(int(torch.argmin(congruence)), self.rank)
            raise DecompositionError(
                f"CP-ALS at rank {self.rank} is degenerate: the component weights reached "
                f"{spread:.1e} x the tensor norm while cancelling each other (components "
                f"{i} and {j} have congruence {float(congruence[i, j]):+.4f}); "
                "use a lower rank"
            )

    def als(
        self,
        weights: torch.Tensor,
        factors: list[torch.Tensor],
        max_iter: int,
        callback: Callable[[int, float], None] | None = None,
    ) -> tuple[torch.Tensor, float, int]:
        """ALS sweeps with Bro's extrapolation, updating ``factors`` in place.

        Returns the weights, the relative error and the number of sweeps done;
        ``callback(sweep, error)`` is called after each sweep.
        """
        tol, linesearch = self.settings.tol, self.settings.linesearch
        grams = [f.T @ f for f in factors]
        partial, err_prev, err = None, math.inf, math.inf
        acc_pow, acc_fail = 2.0, 0
        for it in range(1, max_iter + 1):
            extrapolate = linesearch and it > _LS_START and it % _LS_EVERY == 0
            before = scaled(weights, factors) if extrapolate else None
            weights, mttkrp = self.sweep(weights, factors, grams, partial)
            partial = None
            err = self.error(weights, factors, grams, _inner(mttkrp, factors[-1], weights))
            if before is not None and err > _FLOOR:
                step = it ** (1.0 / acc_pow)
                after = scaled(weights, factors)
                moved = [b + step * (a - b) for a, b in zip(after, before, strict=True)]
                new_weights, new_factors = normalize_columns(moved)
                new_grams = [f.T @ f for f in new_factors]
                new_partial = self.contract_right(new_factors)
                first = _mttkrp(new_partial, new_factors, self.left, 0)
                new_inner = _inner(first, new_factors[0], new_weights)
                new_err = self.error(new_weights, new_factors, new_grams, new_inner)
                if new_err < err:
                    weights, err, partial = new_weights, new_err, new_partial
                    factors[:], grams[:] = new_factors, new_grams
                    acc_fail = 0
                else:
                    acc_fail += 1
                    if acc_fail == _LS_MAX_FAIL:
                        acc_pow, acc_fail = acc_pow + 1.0, 0
            self.check(weights, grams, err)
            if callback is not None:
                callback(it, err)
            if err < _FLOOR or err_prev - err < tol * err_prev:
                break
            err_prev = err
        return weights, err, it

    # ---- Levenberg-Marquardt (small problems) ------------------------------------------------
    def levenberg_marquardt(
        self,
        weights: torch.Tensor,
        factors: list[torch.Tensor],
        give_up: float = math.inf,
    ) -> tuple[torch.Tensor, float, int]:
        """Damped Gauss-Newton on all factors at once, forming ``J^T J``.

        Updates ``factors`` in place; returns the weights, the relative error and the
        number of iterations done. Stops after ``_LM_STALLS`` iterations in a row that gain
        less than ``_LM_STALL``, or after ``_LM_CHECKPOINT`` iterations if the error is not
        below ``give_up`` by then. Gives up (restoring its start) if the weights pass
        ``_LM_SPREAD``: it would be heading for a degenerate fit.
        """
        stall, stalls = max(self.settings.tol, _LM_STALL), 0
        theta = [f * weights ** (1.0 / len(factors)) for f in factors]
        err = self.residual(theta)
        start = (theta, err)
        mu, nu, it = None, 2.0, 0
        while it < _LM_ITERS and err > _FLOOR:
            if it == _LM_CHECKPOINT and err >= give_up:
                break
            it += 1
            jtj, grad = self.normal_equations(theta)
            if mu is None:
                mu = _LM_TAU * float(jtj.diagonal().max())
            trial, new_err = theta, err
            while nu <= _LM_MAX_NU:
                damped = jtj.clone()
                damped.diagonal().add_(mu)
                chol, info = torch.linalg.cholesky_ex(damped)
                if int(info) == 0:
                    step = torch.cholesky_solve(grad[:, None], chol)[:, 0]
                else:
                    step = torch.linalg.lstsq(damped, grad[:, None]).solution[:, 0]
                candidate = unflatten(theta, step)
                candidate_err = self.residual(candidate)
                if candidate_err < err:
                    predicted = float(step @ (mu * step + grad))
                    gain = (err**2 - candidate_err**2) / max(predicted, 1e-300)
                    mu *= max(1.0 / 3.0, 1.0 - (2.0 * gain - 1.0) ** 3)
                    nu, trial, new_err = 2.0, candidate, candidate_err
                    break
                mu, nu = mu * nu, nu * 2.0
            weights, unit = normalize_columns(trial)
            self.check(weights, [f.T @ f for f in unit], new_err)
            if float(torch.linalg.vector_norm(weights)) > _LM_SPREAD:
                theta, err = start
                break
            theta, err_prev, err = trial, err, new_err
            stalls = stalls + 1 if err_prev - err <= stall * err_prev else 0
            if stalls == _LM_STALLS:
                break
        weights, factors[:] = normalize_columns(theta)
        return weights, err, it

    def residual(self, factors: list[torch.Tensor]) -> float:
        """Exact relative error of unnormalised factors (the tensor has unit norm)."""
        ones = factors[0].new_ones(self.rank)
        return float(torch.linalg.vector_norm(cp_to_tensor(ones, factors) - self.x))

    def normal_equations(self, factors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``J^T J`` and ``J^T r`` of the residual ``x - [[factors]]``, parameters mode by mode.

        With ``Gamma`` the Hadamard product of the other modes' Gram matrices, block
        ``(n, n)`` is ``I (x) Gamma_n`` and block ``(n, m)`` has entries
        ``A_n[i, s] A_m[j, r] Gamma_nm[r, s]`` at ``((i, r), (j, s))``.
        """
        order, rank = len(factors), self.rank
        grams = [f.T @ f for f in factors]
        sizes = [f.shape[0] * rank for f in factors]
        offsets = [0, *itertools.accumulate(sizes)]
        jtj = factors[0].new_zeros(offsets[-1], offsets[-1])
        right, left = self.contract_right(factors), self.contract_left(factors)
        grad = []
        for n in range(order):
            gamma = hadamard(grams, skip=(n,))
            rows = slice(offsets[n], offsets[n + 1])
            eye = torch.eye(factors[n].shape[0], dtype=gamma.dtype, device=gamma.device)
            jtj[rows, rows] = torch.kron(eye, gamma)
            for m in range(n + 1, order):
                block = torch.einsum(
                    "is,jr,rs->irjs", factors[n], factors[m], hadamard(grams, skip=(n, m))
                ).reshape(sizes[n], sizes[m])
                jtj[rows, offsets[m] : offsets[m + 1]] = block
                jtj[offsets[m] : offsets[m + 1], rows] = block.T
            partial, group = (right, self.left) if n < self.split else (left, self.right)
            mttkrp = _mttkrp(partial, factors, group, n).T
            grad.append((mttkrp - factors[n] @ gamma).reshape(-1))
        return jtj, torch.cat(grad)


# ---- small helpers ---------------------------------------------------------------------------
def _mttkrp(
    partial: torch.Tensor, factors: list[torch.Tensor], group: list[int], mode: int
) -> torch.Tensor:
    """Finish a group partial ``(R, *group dims)`` into the MTTKRP of ``mode``: ``(R, I)``."""
    pos = group.index(mode)
    for k in group[:pos]:
        partial = _reduce(partial, factors[k], 0)
    for k in reversed(group[pos + 1 :]):
        partial = _reduce(partial, factors[k], partial.dim() - 2)
    return partial


def _reduce(partial: torch.Tensor, factor: torch.Tensor, axis: int) -> torch.Tensor:
    """Contract data axis ``axis`` of ``partial`` ``(R, *dims)`` with ``factor[:, r]`` per r."""
    rank, dims = partial.shape[0], list(partial.shape[1:])
    before, size, after = math.prod(dims[:axis]), dims[axis], math.prod(dims[axis + 1 :])
    vectors = factor.T
    if after == 1:
        out = torch.bmm(partial.reshape(rank, before, size), vectors.unsqueeze(2))
    elif before == 1:
        out = torch.bmm(vectors.unsqueeze(1), partial.reshape(rank, size, after))
    else:
        out = torch.einsum("rasb,rs->rab", partial.reshape(rank, before, size, after), vectors)
    return out.reshape(rank, *dims[:axis], *dims[axis + 1 :])


def _inner(mttkrp: torch.Tensor, factor: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``<X, X_hat>`` from one mode's MTTKRP ``(R, I)``, its unit factor and the weights."""
    return (mttkrp * factor.T).sum(dim=1) @ weights


def _check_rank(rank: int) -> int:
    try:
        value = operator.index(rank)
    except TypeError:
        value = 0
    if isinstance(rank, bool) or value < 1:
        raise ValueError(f"CP rank must be an int >= 1, got {rank!r}")
    return value


def _random_columns(rows: int, cols: int, like: torch.Tensor, gen: torch.Generator):
    out = torch.randn(rows, cols, generator=gen, dtype=like.dtype, device=like.device)
    return out / torch.linalg.vector_norm(out, dim=0)


def _initial_factors(
    x: torch.Tensor, rank: int, init: str, gen: torch.Generator
) -> list[torch.Tensor]:
    """Unit-norm starting factors (mode 0 is solved first, so its start is never used)."""
    factors = [_random_columns(x.shape[0], rank, x, gen)]
    for mode in range(1, x.dim()):
        size = x.shape[mode]
        if init == "random":
            factors.append(_random_columns(size, rank, x, gen))
            continue
        others = [k for k in range(x.dim()) if k != mode]
        gram = torch.tensordot(x, x, dims=(others, others))
        basis = torch.linalg.eigh(gram)[1].flip(1)[:, : min(rank, size)]
        if rank > size:
            basis = torch.cat([basis, _random_columns(size, rank - size, x, gen)], dim=1)
        factors.append(basis)
    return factors


def _svd_cp(
    x: torch.Tensor, rank: int, gen: torch.Generator
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Optimal CP of a vector or matrix; components beyond its rank get zero weight."""
    matrix = x if x.dim() == 2 else x[:, None]
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = min(rank, s.numel())
    weights = torch.cat([s[:k], s.new_zeros(rank - k)])
    mats = [u, vh.T] if x.dim() == 2 else [u * vh[0, 0]]  # a vector keeps its sign in u
    factors = [
        torch.cat([m[:, :k], _random_columns(m.shape[0], rank - k, x, gen)], dim=1) for m in mats
    ]
    return weights, factors
