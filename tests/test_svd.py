"""Singular vectors through the Gram matrix (factorize/svd.py) against torch.linalg.svd."""

from __future__ import annotations

import pytest
import torch

from autodecomp.factorize.svd import gram_svd, left_singular_vectors


def _matrix(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(6, 20), (20, 6), (3, 7, 11), (3, 11, 7), (8, 8)])
def test_gram_svd_matches_the_economy_svd(shape):
    a = _matrix(*shape)
    u, s, vh = gram_svd(a)
    ref = torch.linalg.svdvals(a)
    assert u.shape[-1] == s.shape[-1] == vh.shape[-2] == min(shape[-2:])
    torch.testing.assert_close(s, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(u @ torch.diag_embed(s) @ vh, a, rtol=0, atol=1e-10)
    eye = torch.eye(u.shape[-1], dtype=a.dtype).expand(*u.shape[:-2], -1, -1)
    torch.testing.assert_close(u.mT @ u, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(vh @ vh.mT, eye, rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", [(6, 20), (20, 6)])
def test_left_singular_vectors_span_the_leading_subspaces(shape):
    a = _matrix(*shape, seed=1)
    u = left_singular_vectors(a.float())
    ref = torch.linalg.svd(a, full_matrices=False)[0]
    assert u.dtype == torch.float64 and u.shape == ref.shape
    for k in range(1, ref.shape[1] + 1):  # the same nested subspaces: equal projectors
        projector, expected = u[:, :k] @ u[:, :k].T, ref[:, :k] @ ref[:, :k].T
        torch.testing.assert_close(projector, expected, atol=1e-6, rtol=0)


def test_an_exact_low_rank_matrix_is_recovered_at_its_rank():
    a = _matrix(12, 3, seed=2) @ _matrix(3, 40, seed=3)
    u, s, vh = gram_svd(a)
    assert float(s[3] / s[0]) < 1e-7
    torch.testing.assert_close(u[:, :3] @ torch.diag(s[:3]) @ vh[:3], a, rtol=0, atol=1e-9)
