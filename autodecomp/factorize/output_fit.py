"""Fitting factors to a layer's output: input-channel whitening and output-error refinement.

The objective is ``||(W_hat - W) L||^2`` with ``W`` read as ``(F, C*kh*kw)`` and ``L`` a
Cholesky factor of the (damped) second moment of the layer's input patches, which is the
mean squared output error on the calibration inputs (see :mod:`autodecomp.compress.calibration`).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = [
    "balance_norms",
    "output_error",
    "refine_output_fit",
    "unwhiten_rows",
    "whiten_input",
]


def whiten_input(weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``W'[f, :, i, j] = W[f, :, i, j] @ L``: the kernel with its input-channel mode whitened."""
    return torch.einsum("fcij,cd->fdij", weight.to(factor), factor)


def unwhiten_rows(rows: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``rows @ L^{-1}`` (``L`` lower triangular): maps a whitened input stage back."""
    return torch.linalg.solve_triangular(factor, rows.to(factor), upper=False, left=False)


def output_error(dense: torch.Tensor, weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``||(dense - weight) L||^2`` with both kernels read as ``(F, C*kh*kw)``."""
    delta = (dense - weight).reshape(weight.shape[0], -1)
    return (delta @ factor).square().sum()


def refine_output_fit(
    module: nn.Module, weight: torch.Tensor, factor: torch.Tensor, steps: int
) -> tuple[float, float]:
    """Minimise the output error over every factor of ``module`` by L-BFGS, in place.

    ``module`` is any decomposed layer (``dense_weight()`` differentiable in its parameters);
    its bias is left alone. The fit runs in float64 on a copy with a strong-Wolfe line search
    (each step lowers the objective), and is written back only when it lowered the error.

    Returns:
        The relative output error ``||(W_hat - W) L|| / ||W L||`` before and after.
    """
    work = copy.deepcopy(module).to(dtype=torch.float64)
    target = weight.detach().to(factor)
    scale = float(output_error(torch.zeros_like(target), target, factor)) or 1.0
    params = [p for name, p in work.named_parameters() if name != "bias"]
    for p in work.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    def loss() -> torch.Tensor:
        return output_error(work.dense_weight(), target, factor) / scale

    with torch.no_grad():
        before = float(loss())
    optimizer = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=steps,
        max_eval=2 * steps,
        tolerance_grad=1e-10,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = loss()
        value.backward()
        return value

    optimizer.step(closure)
    with torch.no_grad():
        after = float(loss())
        if after < before and all(bool(torch.isfinite(p).all()) for p in params):
            targets = [p for name, p in module.named_parameters() if name != "bias"]
            for mine, fitted in zip(targets, params, strict=True):
                mine.copy_(fitted)
        else:
            after = before
    return before**0.5, after**0.5


@torch.no_grad()
def balance_norms(module: nn.Module) -> None:
    """Give every factor (parameter but the bias) the same norm, keeping their product.

    A whitened fit leaves the input stage and the other factors at very different scales,
    which makes the first fine-tuning steps unstable. The kernel is multilinear in the
    factors of every method, so scalars whose product is 1 leave it unchanged; the result is
    checked and undone when that does not hold.
    """
    factors = [p for name, p in module.named_parameters() if name != "bias"]
    norms = [float(p.norm()) for p in factors]
    if len(factors) < 2 or min(norms) == 0.0 or not all(math.isfinite(n) for n in norms):
        return
    before = module.dense_weight()
    mean = math.exp(sum(math.log(n) for n in norms) / len(norms))
    for p, n in zip(factors, norms, strict=True):
        p.mul_(mean / n)
    tolerance = 1e-5 if before.dtype == torch.float32 else 1e-10
    if float((module.dense_weight() - before).norm()) > tolerance * float(before.norm()):
        for p, n in zip(factors, norms, strict=True):
            p.mul_(n / mean)
