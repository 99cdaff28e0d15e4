"""SeKron (Hameed et al. 2022): a sequence of S Kronecker factors with per-level ranks.

``W ≈ sum_{r_1} A_1[r_1] ⊗ (sum_{r_2} A_2[r_1, r_2] ⊗ (... ⊗ A_S[r_{S-1}]))``: each factor is
indexed by the ranks on both of its sides, like the cores of a tensor train, so the
sequential SVD (GKPD on the remainder, with the rank index carried along) recovers a kernel
of that structure exactly and is quasi-optimal otherwise. It runs as a chain of
convolutions with growing dilation (see :class:`~.gkpd.KroneckerChainConv`); ``S = 2`` is
GKPD.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..core.spec import ConvSpec
from ..factorize.kronecker import (
    Structure,
    is_structure,
    preferred_structures,
    rank_limit,
    structures,
    tt_kron,
)
from .base import register
from .gkpd import KroneckerChainConv, as_shape, check_rank_keys, equal_norms

__all__ = ["SeKronConv"]


def _invalid_ranks(structure: Structure, ranks: Sequence[int]) -> str | None:
    for k, r in enumerate(ranks):
        top = rank_limit(structure, ranks[:k])
        if not (isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= top):
            return f"R{k + 1}={r!r} out of range: must be in [1, {top}]"
    return None


@register("sekron")
class SeKronConv(KroneckerChainConv):
    """Sequence of Kronecker factors, initialised by sequential Van Loan–Pitsianis SVDs."""

    rank_help = (
        "r (int: the layer's default structure, every rank r) or {'shapes': [[F1, C1, h1, w1],"
        " ..., [FS, CS, hS, wS]], 'ranks': [R1, ..., R(S-1)]}; shapes multiply to the kernel's,"
        " S >= 2, and may be left out (default structure with len(ranks) + 1 factors)"
    )

    @classmethod
    def default_levels(cls, spec: ConvSpec) -> int:
        """Three factors where the input side allows it, else two."""
        return 3 if structures(spec.weight_shape, 3) else 2

    @classmethod
    def default_structure(cls, spec: ConvSpec, levels: int) -> Structure:
        """The weight-free structure: balanced factor sizes, kernel kept whole and innermost."""
        found = preferred_structures(spec.weight_shape, levels, 1)
        if not found:
            raise ValueError(
                f"sekron cannot split kernel {list(spec.weight_shape)} into {levels} factors "
                "whose input sides C_k*h_k*w_k are all >= 2"
            )
        return found[0]

    @classmethod
    def normalize_rank(cls, spec: ConvSpec, rank: Any) -> dict[str, Any]:
        if isinstance(rank, int) and not isinstance(rank, bool):
            rank = {"ranks": [rank] * (cls.default_levels(spec) - 1)}
        if not isinstance(rank, dict):
            raise ValueError(
                "sekron rank must be an int or {'shapes': [[F, C, h, w], ...], 'ranks': [...]}, "
                f"got {rank!r}"
            )
        check_rank_keys("sekron", rank, {"shapes", "ranks", "max_params"}, {"ranks"})
        ranks = rank["ranks"]
        if not (isinstance(ranks, list | tuple) and ranks):
            raise ValueError(f"sekron ranks must be a non-empty list of ints, got {ranks!r}")
        if "shapes" in rank:
            shapes = rank["shapes"]
            if not (isinstance(shapes, list | tuple) and len(shapes) == len(ranks) + 1):
                raise ValueError(
                    f"sekron shapes must be a list of len(ranks) + 1 = {len(ranks) + 1} factor "
                    f"shapes, got {shapes!r}"
                )
            structure = tuple(as_shape(a, "sekron factor shape") for a in shapes)
            if not is_structure(spec.weight_shape, structure):
                raise ValueError(
                    f"sekron shapes {[list(a) for a in structure]} are invalid for kernel "
                    f"{list(spec.weight_shape)}: they must multiply to it mode by mode and every "
                    "factor's C_k*h_k*w_k must be >= 2"
                )
        else:
            structure = cls.default_structure(spec, len(ranks) + 1)
        problem = _invalid_ranks(structure, list(ranks))
        if problem is not None:
            raise ValueError(f"sekron ranks {list(ranks)}: {problem}")
        out = cls._rank_spec(structure, ranks)
        if "max_params" in rank:
            out["max_params"] = rank["max_params"]
        return out

    @classmethod
    def structure_of(
        cls, spec: ConvSpec, rank: dict[str, Any]
    ) -> tuple[Structure, tuple[int, ...]]:
        return tuple(tuple(a) for a in rank["shapes"]), tuple(rank["ranks"])

    @classmethod
    def _rank_spec(cls, structure: Structure, ranks: Sequence[int]) -> dict[str, Any]:
        return {"shapes": [list(a) for a in structure], "ranks": list(ranks)}

    @classmethod
    def rank_candidates(cls, spec: ConvSpec) -> Iterator[dict[str, Any]]:
        structure = cls.default_structure(spec, cls.default_levels(spec))
        r = 1
        while _invalid_ranks(structure, [r] * (len(structure) - 1)) is None:
            yield cls._rank_spec(structure, [r] * (len(structure) - 1))
            r += 1

    @classmethod
    def _factorize(
        cls, weight: torch.Tensor, wkey: str, structure: Structure, ranks: tuple[int, ...], cache
    ) -> list[torch.Tensor]:
        """Sequential SVD, then one scalar per factor so that all factors have equal norms."""
        return equal_norms(tt_kron(weight, wkey, structure, ranks, cache))
