"""Small dense-algebra helpers of the CP solvers: Khatri-Rao and Hadamard products, column
normalisation and the flat parameter layout of Levenberg-Marquardt."""

from __future__ import annotations

import math

import torch

__all__ = ["hadamard", "khatri_rao", "normalize_columns", "scaled", "split_modes", "unflatten"]


def hadamard(grams: list[torch.Tensor], skip: tuple[int, ...] = ()) -> torch.Tensor:
    """Elementwise product of the Gram matrices not in ``skip``."""
    out = torch.ones_like(grams[0])
    for k, gram in enumerate(grams):
        if k not in skip:
            out = out * gram
    return out


def khatri_rao(mats: list[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product, first matrix's row index varying slowest."""
    out = mats[0]
    for mat in mats[1:]:
        out = (out[:, None, :] * mat[None, :, :]).reshape(-1, out.shape[1])
    return out


def split_modes(shape: list[int]) -> int:
    """Where to cut the modes into two groups so both partial products stay small."""
    return min(range(1, len(shape)), key=lambda m: math.prod(shape[:m]) + math.prod(shape[m:]))


def scaled(weights: torch.Tensor, factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Factors with the weights folded into the last one."""
    return [*factors[:-1], factors[-1] * weights]


def normalize_columns(factors: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Unit-norm columns and the product of the removed norms."""
    norms = [torch.linalg.vector_norm(f, dim=0) for f in factors]
    weights = torch.stack(norms).prod(dim=0)
    return weights, [f / n.clamp_min(1e-300) for f, n in zip(factors, norms, strict=True)]


def unflatten(factors: list[torch.Tensor], step: torch.Tensor) -> list[torch.Tensor]:
    """``factors`` plus a flat step laid out mode by mode."""
    out, start = [], 0
    for f in factors:
        out.append(f + step[start : start + f.numel()].reshape(f.shape))
        start += f.numel()
    return out
