"""tensorly's own solvers and factorized tensors, as a cross-check and fallback of autodecomp's.

The ``solver="tensorly"`` option of a decomposition method runs one of these instead of the
method's own solver:

=================  ===========================================================
function           tensorly solver
=================  ===========================================================
:func:`cp`         ``tensorly.decomposition.parafac`` (ALS)
:func:`tucker2`    ``tensorly.decomposition.partial_tucker`` (HOSVD / HOOI)
:func:`tt`         ``tensorly.decomposition.tensor_train`` (TT-SVD)
:func:`ring`       ``tensorly.decomposition.tensor_ring`` (TR-SVD)
:func:`slice_svd`  ``tensorly.tenalg.svd_interface`` (truncated SVD)
=================  ===========================================================

Inputs and outputs are torch tensors; the solve itself runs in float64 on a tensorly
backend chosen per call (``"pytorch"``, the default: no copy, the tensor's device;
``"numpy"``: a CPU copy), set for the calling thread only and restored afterwards, so the
backend a user selected with ``tl.set_backend`` is left as it was.

:func:`as_tensorly` and :func:`from_tensorly` move factors between torch and the backend
that is active when they are called (what a layer's ``to_tensorly()`` returns).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import tensorly as tl
import torch
from tensorly.decomposition import parafac, partial_tucker, tensor_ring, tensor_train
from tensorly.tenalg import svd_interface

from ..core.errors import DecompositionError
from .cp_als import cp_to_tensor, default_max_iter

__all__ = [
    "BACKENDS",
    "SOLVERS",
    "as_tensorly",
    "check_solver_name",
    "cp",
    "from_tensorly",
    "ring",
    "slice_svd",
    "tt",
    "tucker2",
]

SOLVERS = ("autodecomp", "tensorly")  # the values of a method's ``solver`` option
BACKENDS = ("pytorch", "numpy")  # tensorly backends a solve may run on


def check_solver_name(solver: Any) -> str:
    """``solver`` if it is one of :data:`SOLVERS`, else a ValueError naming the valid ones."""
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid solvers: {', '.join(SOLVERS)}")
    return solver


# ---- moving tensors between torch and tensorly ------------------------------------------------
def as_tensorly(t: torch.Tensor) -> Any:
    """A copy of ``t`` as a tensor of the active tensorly backend (detached)."""
    t = t.detach()
    if tl.get_backend() == "pytorch":
        return t.clone()
    return tl.tensor(t.cpu().numpy().copy())


def from_tensorly(x: Any) -> torch.Tensor:
    """A tensor of any tensorly backend as a torch tensor (shares memory where it can)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.as_tensor(np.asarray(tl.to_numpy(x)))


@contextmanager
def _on(backend: str) -> Iterator[None]:
    """Run on tensorly's ``backend`` in this thread only; the previous backend is restored."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown tensorly backend {backend!r}; valid: {', '.join(BACKENDS)}")
    with warnings.catch_warnings():
        # tensorly's SVD warns for every unfolding smaller than the rank (it pads the factor)
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        with tl.backend_context(backend, local_threadsafe=True):
            yield


def _solver_input(x: torch.Tensor, backend: str) -> Any:
    x = x.detach().to(torch.float64)
    return x if backend == "pytorch" else x.cpu().numpy()


def _result(x: Any, like: torch.Tensor) -> torch.Tensor:
    return from_tensorly(x).to(device=like.device, dtype=torch.float64)


def _finite(what: str, tensor: torch.Tensor) -> torch.Tensor:
    x = tensor.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise DecompositionError(f"tensorly {what} input contains NaN or Inf values")
    return x


def _pad(core: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """A ``(r, n, r')`` core zero-padded to ``(left, n, right)``: tensorly caps a rank at its
    unfolding's size; the padded bond contributes nothing."""
    r, n, s = core.shape
    if (r, s) == (left, right):
        return core
    out = core.new_zeros(left, n, right)
    out[:r, :, :s] = core
    return out


# ---- CP ----------------------------------------------------------------------------------------
def cp(
    tensor: torch.Tensor,
    rank: int,
    *,
    max_iter: int | None = None,
    tol: float = 1e-8,
    init: str = "svd",
    seed: int = 0,
    max_spread: float = 1e3,
    linesearch: bool = False,
    backend: str = "pytorch",
) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """Rank-``rank`` CP of ``tensor`` by tensorly's ``parafac`` (ALS), float64.

    The result has the form of :func:`~autodecomp.factorize.cp_als.cp_als` with
    ``balance=True``: unit weights, each component's scale spread evenly over its factor
    columns, components sorted by decreasing scale. Singleton modes are left out of the
    solve (their factors are ones).

    Args:
        tensor: a real tensor of order >= 2.
        rank: number of components (>= 1).
        max_iter: sweep cap (``n_iter_max``); ``None``: cp_als's default cap.
        tol: tensorly's ``rec_error`` criterion: stop once a sweep lowers the relative
            error by less than ``tol`` (tensorly's default 1e-8; cp_als's ``tol`` is relative
            to the error instead).
        init: ``"svd"`` or ``"random"``.
        seed: tensorly's ``random_state`` (random columns of the SVD init, random init).
        max_spread: raise when the component scales' norm exceeds this multiple of the
            tensor norm (degenerate components cancelling each other; tensorly has no guard).
        linesearch: tensorly's line search (off by default, as in tensorly).
        backend: ``"pytorch"`` or ``"numpy"``.

    Returns:
        ``(weights, factors, rel_error)`` in float64 on ``tensor``'s device.

    Raises:
        DecompositionError: NaN/Inf in the input or the result, or a degenerate fit.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"CP rank must be an int >= 1, got {rank!r}")
    x = _finite("parafac", tensor)
    shape = list(x.shape)
    norm = float(torch.linalg.vector_norm(x))
    if norm == 0:
        return x.new_ones(rank), [x.new_zeros(s, rank) for s in shape], 0.0
    keep = [i for i, s in enumerate(shape) if s > 1]
    keep = keep if len(keep) >= 2 else list(range(len(shape)))
    core = x.reshape([shape[i] for i in keep]) / norm
    cap = default_max_iter(x.numel(), rank) if max_iter is None else max_iter
    with _on(backend):
        weights, kept = parafac(
            _solver_input(core, backend),
            rank,
            n_iter_max=cap,
            init=init,
            tol=tol,
            random_state=seed,
            cvg_criterion="rec_error",
            linesearch=linesearch,
        )
    kept = [_result(f, x) for f in kept]
    kept[0] = kept[0] * _result(weights, x)
    factors = [x.new_ones(1, rank) for _ in shape]
    for mode, factor in zip(keep, kept, strict=True):
        factors[mode] = factor
    norms = torch.stack([torch.linalg.vector_norm(f, dim=0) for f in factors])
    scales = norms.prod(dim=0)
    if not bool(torch.isfinite(scales).all()):
        raise DecompositionError("tensorly parafac produced NaN/Inf factors")
    spread = float(torch.linalg.vector_norm(scales))
    if spread > max_spread:
        raise DecompositionError(
            f"tensorly parafac at rank {rank} is degenerate: the component scales reached "
            f"{spread:.1e} x the tensor norm while cancelling each other; use a lower rank"
        )
    order = torch.argsort(scales, descending=True)
    balanced = scales[order].clamp_min(0) ** (1.0 / len(factors))
    factors = [
        f[:, order] / n[order].clamp_min(1e-300) * balanced * norm ** (1.0 / len(factors))
        for f, n in zip(factors, norms, strict=True)
    ]
    ones = x.new_ones(rank)
    rel_error = float(torch.linalg.vector_norm(cp_to_tensor(ones, factors) - x) / norm)
    if not math.isfinite(rel_error):
        raise DecompositionError("tensorly parafac produced a non-finite reconstruction")
    return ones, factors, rel_error


# ---- Tucker-2 ----------------------------------------------------------------------------------
def tucker2(
    weight: torch.Tensor, r_in: int, r_out: int, *, iters: int = 0, backend: str = "pytorch"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of a kernel ``(F, C, kh, kw)`` along its channel modes by tensorly's
    ``partial_tucker``: the HOSVD (``iters = 0``) refined by ``iters`` HOOI sweeps.

    Returns:
        ``(u_out (F, r_out), u_in (C, r_in), core (r_out, r_in, kh, kw))``, float64.
    """
    x = _finite("partial_tucker", weight)
    with _on(backend):
        (core, factors), _ = partial_tucker(
            _solver_input(x, backend),
            rank=(r_out, r_in),
            modes=(0, 1),
            n_iter_max=iters,
            init="svd",
            tol=0,
        )
    return _result(factors[0], x), _result(factors[1], x), _result(core, x)


# ---- tensor train and tensor ring --------------------------------------------------------------
def tt(
    tensor: torch.Tensor, ranks: Sequence[int], *, backend: str = "pytorch"
) -> list[torch.Tensor]:
    """TT-SVD of ``tensor`` by tensorly's ``tensor_train``.

    Args:
        tensor: a tensor of order ``d``.
        ranks: the ``d + 1`` bond ranks, ``ranks[0] = ranks[-1] = 1``.

    Returns:
        Cores ``(ranks[k], tensor.shape[k], ranks[k + 1])``, float64.
    """
    x = _finite("tensor_train", tensor)
    with _on(backend):
        cores = tensor_train(_solver_input(x, backend), rank=[int(r) for r in ranks])
    return [_pad(_result(c, x), ranks[k], ranks[k + 1]) for k, c in enumerate(cores.factors)]


def ring(
    tensor: torch.Tensor, ranks: Sequence[int], *, backend: str = "pytorch"
) -> list[torch.Tensor]:
    """TR-SVD of ``tensor`` by tensorly's ``tensor_ring`` (from mode 0).

    Exact for rings whose first bond ``ranks[0]`` is 1 (a tensor train); for larger ones
    the first SVD mixes the two bonds of mode 0 and the result is only an approximation.

    Args:
        tensor: a tensor of order ``d``.
        ranks: the ``d + 1`` ring ranks, ``ranks[0] = ranks[-1]``.

    Returns:
        Cores ``(ranks[k], tensor.shape[k], ranks[k + 1])``, float64.
    """
    x = _finite("tensor_ring", tensor)
    with _on(backend):
        cores = tensor_ring(_solver_input(x, backend), rank=[int(r) for r in ranks])
    return [_pad(_result(c, x), ranks[k], ranks[k + 1]) for k, c in enumerate(cores.factors)]


# ---- SVDs --------------------------------------------------------------------------------------
def slice_svd(
    matrices: torch.Tensor, *, backend: str = "pytorch"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of each matrix of a stack ``(A, m, n)`` by tensorly's ``svd_interface``.

    Returns:
        ``U (A, m, k)``, ``S (A, k)`` (descending), ``Vh (A, k, n)`` with ``k = min(m, n)``,
        float64.
    """
    x = _finite("svd_interface", matrices)
    k = min(x.shape[1], x.shape[2])
    us, ss, vs = [], [], []
    with _on(backend):
        for matrix in x:
            u, s, vh = svd_interface(_solver_input(matrix, backend), n_eigenvecs=k)
            us.append(_result(u, x))
            ss.append(_result(s, x))
            vs.append(_result(vh, x))
    return torch.stack(us), torch.stack(ss), torch.stack(vs)
