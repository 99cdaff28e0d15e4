"""Kronecker-structured kernels: factor shapes, Van Loan–Pitsianis rearrangement and SVDs.

A 4D kernel ``W`` of shape ``(F, C, kh, kw)`` is split into factors ``A_1 ... A_S`` with
shapes ``(F_k, C_k, h_k, w_k)`` whose mode sizes multiply to ``W``'s; index ``f`` of ``W``
is the mixed-radix number ``(f_1, ..., f_S)`` (most significant first), and so on for every
mode. A *structure* is the tuple of the factor shapes.

Every SVD here is computed once per (weight, structure prefix) in float64 and cached, so
any rank is a truncation of the cached factorisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from itertools import product

import torch

from .cache import FactorCache
from .svd import gram_svd

__all__ = [
    "Shape",
    "Structure",
    "best_ranks",
    "chain_cores",
    "chain_dense",
    "chain_kernel",
    "chain_params",
    "chain_tensor",
    "chain_weights",
    "is_structure",
    "kron_energy",
    "kron_svd",
    "preferred_structures",
    "rank_limit",
    "rearrange",
    "size",
    "structures",
    "tt_kron",
]

Shape = tuple[int, int, int, int]
Structure = tuple[Shape, ...]


# ---- factor shapes -------------------------------------------------------------------------
@lru_cache(maxsize=1024)
def _ordered_factorizations(n: int, parts: int) -> tuple[tuple[int, ...], ...]:
    """All tuples of ``parts`` positive integers whose product is ``n``."""
    if parts == 1:
        return ((n,),)
    return tuple(
        (d, *rest)
        for d in range(1, n + 1)
        if n % d == 0
        for rest in _ordered_factorizations(n // d, parts - 1)
    )


def size(shape: Sequence[int]) -> int:
    """Number of elements of a factor."""
    return math.prod(shape)


def input_size(shape: Sequence[int]) -> int:
    """The factor's share of the input side, ``C_k * h_k * w_k``."""
    return shape[1] * shape[2] * shape[3]


@lru_cache(maxsize=256)
def structures(shape: Shape, parts: int) -> tuple[Structure, ...]:
    """Every split of ``shape`` into ``parts`` Kronecker factors.

    A split is valid when every factor takes a non-trivial share of the input side
    (``C_k * h_k * w_k >= 2``): otherwise the factorisation degenerates into a low-rank
    matrix factorisation of a reshaped kernel rather than a Kronecker structure.
    """
    per_mode = [_ordered_factorizations(n, parts) for n in shape]
    found = []
    for f, c, h, w in product(*per_mode):
        factors = tuple(zip(f, c, h, w, strict=True))
        if all(input_size(a) >= 2 for a in factors):
            found.append(factors)
    return tuple(found)


def is_structure(shape: Shape, structure: Structure) -> bool:
    """Whether ``structure`` splits ``shape`` exactly, each factor with input side >= 2."""
    return (
        len(structure) >= 2
        and all(len(a) == 4 for a in structure)
        and all(math.prod(a[m] for a in structure) == n for m, n in enumerate(shape))
        and all(input_size(a) >= 2 for a in structure)
    )


def _reuse(structure: Structure, nominal_rank: int = 8) -> float:
    """Multiply-adds per parameter of the chain's convolutions at stride 1.

    Each weight of factor ``k`` is applied ``C_<k * F_>k`` times per output pixel (the dense
    conv: once); the factors are weighted by their parameter counts at equal ranks.
    """
    last = len(structure) - 1
    weights = [
        nominal_rank ** (1 if k in (0, last) else 2) * size(a) for k, a in enumerate(structure)
    ]
    uses = [
        math.prod(a[1] for a in structure[:k]) * math.prod(a[0] for a in structure[k + 1 :])
        for k in range(len(structure))
    ]
    return sum(w * u for w, u in zip(weights, uses, strict=True)) / sum(weights)


def _preference(structure: Structure) -> tuple:
    """Sort key of the weight-free choice: balanced sizes, few multiply-adds, kernel whole."""
    sizes = [size(a) for a in structure]
    spread = math.log(max(sizes) / min(sizes))
    kernel_factors = [k for k, a in enumerate(structure) if a[2] * a[3] > 1]
    split_kernel = max(len(kernel_factors) - 1, 0)
    kernel_outer = int(bool(kernel_factors) and kernel_factors[-1] != len(structure) - 1)
    channels = sum(abs(math.log(a[0] / a[1])) for a in structure)
    return (
        math.floor(spread / math.log(4) + 1e-9),
        round(math.log2(_reuse(structure))),
        split_kernel,
        kernel_outer,
        spread,
        channels,
    )


@lru_cache(maxsize=256)
def preferred_structures(shape: Shape, parts: int, count: int) -> tuple[Structure, ...]:
    """Up to ``count`` valid structures, best first, diverse in how the kernel is split.

    The first one is the weight-free default. The others are taken round-robin from the
    "spatial families" (which factor gets which part of the kernel), each family ordered by
    the same preference, so a small candidate list still covers different kernel splits.
    """
    families: dict[tuple, list[Structure]] = {}
    for s in sorted(structures(shape, parts), key=lambda s: (_preference(s), s)):
        families.setdefault(tuple((a[2], a[3]) for a in s), []).append(s)
    ordered = list(families.values())
    chosen: list[Structure] = []
    depth = 0
    while len(chosen) < count and any(depth < len(f) for f in ordered):
        chosen += [f[depth] for f in ordered if depth < len(f)][: count - len(chosen)]
        depth += 1
    return tuple(chosen)


# ---- rearrangement and reconstruction --------------------------------------------------------
def rearrange(tensor: torch.Tensor, a_shape: Sequence[int]) -> torch.Tensor:
    """Van Loan–Pitsianis rearrangement of a stack of kernels.

    ``tensor`` of shape ``(L, F, C, kh, kw)`` becomes the ``(L * |A|, |B|)`` matrix whose
    rank-1 terms are ``vec([l, A]) vec(B)^T`` with ``kernel_l = sum A_l ⊗ B``.
    """
    lead, f, c, kh, kw = tensor.shape
    f1, c1, h1, w1 = a_shape
    f2, c2, h2, w2 = f // f1, c // c1, kh // h1, kw // w1
    split = tensor.reshape(lead, f1, f2, c1, c2, h1, h2, w1, w2)
    return split.permute(0, 1, 3, 5, 7, 2, 4, 6, 8).reshape(lead * f1 * c1 * h1 * w1, -1)


def chain_dense(
    weights: Sequence[torch.Tensor], structure: Structure, ranks: Sequence[int]
) -> torch.Tensor:
    """The dense kernel of a Kronecker chain stored in convolution layout.

    Factor ``k`` is stored as ``(R_{k-1} * F_k, R_k * C_k, h_k, w_k)`` (``R_0 = R_S = 1``)
    and ``W = sum_r A_1[r_1] ⊗ A_2[r_1, r_2] ⊗ ... ⊗ A_S[r_{S-1}]``.
    """
    bounds = [1, *ranks, 1]
    f, c, h, w = structure[-1]
    dense = weights[-1].reshape(bounds[-2], f, c, h, w)
    for k in range(len(structure) - 2, -1, -1):
        f, c, h, w = structure[k]
        factor = weights[k].reshape(bounds[k], f, bounds[k + 1], c, h, w)
        dense = torch.einsum("pfrcij,rgdkl->pfgcdikjl", factor, dense)
        lead, *sizes = dense.shape
        dense = dense.reshape(lead, *(sizes[2 * m] * sizes[2 * m + 1] for m in range(4)))
    return dense[0]


def chain_tensor(weight: torch.Tensor, structure: Structure) -> torch.Tensor:
    """The kernel as the order-``S`` tensor ``(|A_1|, ..., |A_S|)`` whose tensor train of ranks
    ``(1, R_1, ..., R_{S-1}, 1)`` is the Kronecker chain (Van Loan–Pitsianis, every level at once).

    Entry ``[a_1, ..., a_S]`` with ``a_k = (f_k, c_k, i_k, j_k)`` (row-major) is the kernel's
    entry at ``f = (f_1, ..., f_S)``, ``c = (c_1, ..., c_S)`` and so on (mixed radix, most
    significant first). :func:`chain_kernel` is the inverse.
    """
    parts = len(structure)
    split = weight.reshape(*(a[m] for m in range(4) for a in structure))
    order = [m * parts + k for k in range(parts) for m in range(4)]
    return split.permute(order).reshape([size(a) for a in structure])


def chain_kernel(tensor: torch.Tensor, structure: Structure) -> torch.Tensor:
    """The ``(F, C, kh, kw)`` kernel of a :func:`chain_tensor` layout."""
    parts = len(structure)
    split = tensor.reshape(*(n for a in structure for n in a))
    order = [4 * k + m for m in range(4) for k in range(parts)]
    shape = [math.prod(a[m] for a in structure) for m in range(4)]
    return split.permute(order).reshape(shape)


def chain_cores(
    weights: Sequence[torch.Tensor], structure: Structure, ranks: Sequence[int]
) -> list[torch.Tensor]:
    """Factors in convolution layout ``(R_{k-1} F_k, R_k C_k, h_k, w_k)`` as the tensor-train
    cores ``(R_{k-1}, |A_k|, R_k)`` of :func:`chain_tensor`."""
    bounds = [1, *ranks, 1]
    return [
        w.reshape(bounds[k], f, bounds[k + 1], c, h, ww)
        .permute(0, 1, 3, 4, 5, 2)
        .reshape(bounds[k], f * c * h * ww, bounds[k + 1])
        for k, (w, (f, c, h, ww)) in enumerate(zip(weights, structure, strict=True))
    ]


def chain_weights(
    cores: Sequence[torch.Tensor], structure: Structure, ranks: Sequence[int]
) -> list[torch.Tensor]:
    """The inverse of :func:`chain_cores`: tensor-train cores in convolution layout."""
    bounds = [1, *ranks, 1]
    return [
        core.reshape(bounds[k], f, c, h, w, bounds[k + 1])
        .permute(0, 1, 5, 2, 3, 4)
        .reshape(bounds[k] * f, bounds[k + 1] * c, h, w)
        for k, (core, (f, c, h, w)) in enumerate(zip(cores, structure, strict=True))
    ]


# ---- cached factorisations -------------------------------------------------------------------
def _key(*parts: object) -> str:
    return "kron/" + "/".join(str(p) for p in parts)


def _level_matrix(
    weight: torch.Tensor, wkey: str, structure: Structure, ranks: Sequence[int], cache: FactorCache
) -> torch.Tensor:
    """The matrix factorised at level ``len(ranks)`` of the sequential decomposition."""
    level = len(ranks)
    if level == 0:
        return rearrange(weight[None], structure[0])
    _, s, vh = kron_svd(weight, wkey, structure, ranks[:-1], cache)
    r = ranks[-1]
    rest = (s[:r, None] * vh[:r]).reshape(r, *_remainder(weight.shape, structure[:level]))
    return rearrange(rest, structure[level])


def kron_svd(
    weight: torch.Tensor, wkey: str, structure: Structure, ranks: Sequence[int], cache: FactorCache
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of level ``len(ranks)`` of the sequential Kronecker decomposition (cached).

    Level 0 is the Van Loan–Pitsianis matrix of ``weight`` for ``A = structure[0]``; level
    ``k`` rearranges the remainder ``S V^T`` of level ``k - 1`` truncated at ``ranks[k-1]``,
    with the rank index carried into the rows. ``weight`` is float64; ``wkey`` its hash.
    """
    key = _key("svd", wkey, structure[: len(ranks) + 1], tuple(ranks))
    return cache.get_or_compute(
        key, lambda: gram_svd(_level_matrix(weight, wkey, structure, ranks, cache))
    )


def kron_energy(
    weight: torch.Tensor, wkey: str, structure: Structure, ranks: Sequence[int], cache: FactorCache
) -> torch.Tensor:
    """Squared singular values (descending) of the matrix of level ``len(ranks)`` (cached).

    Computed from the eigenvalues of the smaller Gram matrix: much cheaper than an SVD and
    accurate enough to compare truncation errors between structures and ranks.
    """

    def compute():
        matrix = _level_matrix(weight, wkey, structure, ranks, cache)
        gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
        return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)

    return cache.get_or_compute(
        _key("energy", wkey, structure[: len(ranks) + 1], tuple(ranks)), compute
    )


def _remainder(shape: Sequence[int], taken: Structure) -> Shape:
    return tuple(n // math.prod(a[m] for a in taken) for m, n in enumerate(shape))


def tt_kron(
    weight: torch.Tensor, wkey: str, structure: Structure, ranks: Sequence[int], cache: FactorCache
) -> list[torch.Tensor]:
    """Sequential (TT-SVD style) Kronecker chain of ``weight`` in convolution layout.

    Quasi-optimal: the squared error is the sum of the squared truncation errors of the
    levels, and a kernel that is exactly such a chain at ``ranks`` is recovered exactly.
    """
    bounds = [1, *ranks, 1]
    weights = []
    rest = None
    for k, (f, c, h, w) in enumerate(structure[:-1]):
        u, s, vh = kron_svd(weight, wkey, structure, ranks[:k], cache)
        r = ranks[k]
        left = u[:, :r].reshape(bounds[k], f, c, h, w, r).permute(0, 1, 5, 2, 3, 4)
        weights.append(left.reshape(bounds[k] * f, r * c, h, w))
        rest = s[:r, None] * vh[:r]
    f, c, h, w = structure[-1]
    weights.append(rest.reshape(bounds[-2] * f, c, h, w))
    return weights


# ---- choosing ranks within a parameter budget -------------------------------------------------
def chain_params(structure: Structure, ranks: Sequence[int]) -> int:
    """Parameters of a Kronecker chain: ``sum_k R_{k-1} R_k |A_k|`` with ``R_0 = R_S = 1``."""
    bounds = [1, *ranks, 1]
    return sum(bounds[k] * bounds[k + 1] * size(a) for k, a in enumerate(structure))


def rank_limit(structure: Structure, prefix: Sequence[int]) -> int:
    """Largest useful rank after ``prefix``: the smaller side of that level's matrix."""
    level = len(prefix)
    rows = (prefix[-1] if prefix else 1) * size(structure[level])
    return min(rows, math.prod(size(a) for a in structure[level + 1 :]))


def _grid(top: int, count: int) -> list[int]:
    if top <= count:
        return list(range(1, top + 1))
    points = {round(math.exp(math.log(top) * t / (count - 1))) for t in range(count)}
    return sorted(points)


def best_ranks(
    weight: torch.Tensor,
    wkey: str,
    structure: Structure,
    budget: float,
    cache: FactorCache,
    grid: int = 12,
) -> tuple[float, tuple[int, ...]] | None:
    """Ranks of least sequential-SVD error for ``structure`` within ``budget`` parameters.

    The squared error of the sequential decomposition is the sum of the levels' squared
    truncation errors, read off the (cached) singular values. The last rank takes all the
    budget left; earlier ranks are searched on a grid of at most ``grid`` values.

    Returns:
        ``(squared error, ranks)``, or ``None`` when even rank 1 everywhere does not fit.
    """
    last = len(structure) - 2
    best: tuple[float, tuple[int, ...]] | None = None

    def visit(prefix: tuple[int, ...], error: float) -> None:
        nonlocal best
        level = len(prefix)
        bounds = [1, *prefix]
        fixed = sum(bounds[k] * bounds[k + 1] * size(structure[k]) for k in range(level))
        later = sum(size(a) for a in structure[level + 2 :])
        per_rank = bounds[level] * size(structure[level]) + size(structure[level + 1])
        top = min(rank_limit(structure, prefix), int((budget - fixed - later) // per_rank))
        if top < 1:
            return
        energy = kron_energy(weight, wkey, structure, prefix, cache)
        if level == last:
            total = error + float(energy[top:].sum())
            if best is None or total < best[0]:
                best = (total, (*prefix, top))
            return
        for r in _grid(top, grid):
            visit((*prefix, r), error + float(energy[r:].sum()))

    visit((), 0.0)
    return best
