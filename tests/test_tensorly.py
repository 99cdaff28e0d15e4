"""tensorly's solvers as a per-method choice (``solver="tensorly"``), issue [K].

The cross-check: every method with a tensorly solver recovers an exactly low-rank kernel
through it, the solver changes neither the rank nor the cost of a layer, the SVD methods
agree with autodecomp's own solvers, and the choice travels from the search space through
the plan entry to ``apply_plan`` (what export rebuilds from).
"""

from __future__ import annotations

import math

import pytest
import tensorly as tl
import torch
from optuna.trial import FixedTrial
from torch import nn

import autodecomp as ad
from autodecomp.compress.plan import PlanEntry
from autodecomp.config import parse_space
from autodecomp.core.errors import ConfigError, DecompositionError
from autodecomp.decompositions import ConvSpec, get_method
from autodecomp.factorize import tensorly_solvers
from autodecomp.factorize.kronecker import chain_kernel, chain_tensor
from autodecomp.search.space import resolve_space, suggest_plan

METHODS = ad.methods()
WITH_TENSORLY = [m for m in METHODS if get_method(m).tensorly_solver is not None]
SVD_METHODS = ["tucker", "tt", "gkpd", "sekron", "shift"]  # same algorithm in both solvers

# (id, in, out, kernel, stride, padding, dilation)
GEOMETRIES = [
    ("3x3", 8, 12, 3, 1, 1, 1),
    ("3x3-s2", 12, 8, 3, 2, 1, 1),
    ("5x5-dil2", 8, 12, 5, 1, 4, 2),
    ("1x1", 8, 12, 1, 1, 0, 1),
]


def make_conv(geom) -> nn.Conv2d:
    _, cin, cout, k, s, p, d = geom
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d).double()
    torch.manual_seed(11)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    return conv


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).norm() / b.detach().norm())


def test_every_builtin_method_has_a_tensorly_solver():
    assert set(WITH_TENSORLY) >= {"cp", "pdp", "tucker", "tt", "tr", "gkpd", "sekron", "shift"}
    assert get_method("cp").tensorly_solver == "parafac"
    assert get_method("tucker").tensorly_solver == "partial_tucker"
    assert get_method("tt").tensorly_solver == "tensor_train"
    assert get_method("tr").tensorly_solver == "tensor_ring"


@pytest.mark.parametrize("method", WITH_TENSORLY)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_exact_rank_kernel_is_recovered_by_tensorly(method, geom):
    conv = make_conv(geom)
    spec = ConvSpec.from_conv(conv)
    cls = get_method(method)
    if cls.unsupported_reason(spec) is not None:
        pytest.skip(cls.unsupported_reason(spec))
    rank = cls.rank_for_ratio(spec, 0.3)
    if method == "tr":  # tensorly's TR-SVD is exact for rings whose first bond is 1 only
        rank = [1, rank[1], rank[2]]
    truth = cls.random(spec, rank, torch.Generator().manual_seed(3)).double()
    with torch.no_grad():
        conv.weight.copy_(truth.dense_weight())
    # plain ALS may sit in a swamp for a while before it converges
    opts = {"max_iter": 3000, "tol": 0.0} if cls.tensorly_solver == "parafac" else {}
    layer = ad.decompose_conv(conv, method, rank=rank, solver="tensorly", **opts)
    err = rel_err(layer.dense_weight(), conv.weight)
    assert err < 1e-4, f"{method} at rank {rank} by tensorly: relative error {err:.2e}"


@pytest.mark.parametrize("method", METHODS)
def test_solver_choice_leaves_rank_params_and_macs_unchanged(method):
    conv = make_conv(GEOMETRIES[0])
    ours = ad.decompose_conv(conv, method, ratio=0.3)
    theirs = ad.decompose_conv(conv, method, ratio=0.3, solver="tensorly")
    assert type(theirs) is type(ours)
    assert theirs.rank == ours.rank
    assert theirs.params() == ours.params() == ad.count_params(theirs)
    assert theirs.macs(9, 9) == ours.macs(9, 9) == ad.count_macs(theirs, (8, 9, 9))
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    assert theirs(x).shape == ours(x).shape == conv(x).shape
    assert 0 < rel_err(theirs.dense_weight(), conv.weight) < 1


@pytest.mark.parametrize("method", SVD_METHODS)
def test_svd_methods_agree_with_autodecomp(method):
    """Tucker (HOSVD), TT-SVD, the Kronecker SVDs and the slice SVDs are the same
    factorisations in both solvers: the kernels agree to rounding."""
    conv = make_conv(GEOMETRIES[2])
    ours = ad.decompose_conv(conv, method, ratio=0.3)
    theirs = ad.decompose_conv(conv, method, ratio=0.3, solver="tensorly")
    assert rel_err(theirs.dense_weight(), ours.dense_weight()) < 1e-9


def test_tucker_hooi_by_tensorly_is_no_worse_than_hosvd():
    conv = make_conv(GEOMETRIES[0])
    hosvd = ad.decompose_conv(conv, "tucker", rank=(3, 4), solver="tensorly")
    hooi = ad.decompose_conv(conv, "tucker", rank=(3, 4), solver="tensorly", hooi_iters=5)
    ours = ad.decompose_conv(conv, "tucker", rank=(3, 4), hooi_iters=5)
    e_hosvd, e_hooi = (
        rel_err(hosvd.dense_weight(), conv.weight),
        rel_err(hooi.dense_weight(), conv.weight),
    )
    assert e_hooi <= e_hosvd + 1e-12
    assert math.isclose(e_hooi, rel_err(ours.dense_weight(), conv.weight), rel_tol=1e-3)


@pytest.mark.parametrize("backend", ["numpy", "pytorch"])
def test_users_tensorly_backend_is_left_alone(backend):
    conv = make_conv(GEOMETRIES[0])
    with tl.backend_context(backend):
        for method in ("cp", "tucker", "tt", "tr"):
            ad.decompose_conv(conv, method, ratio=0.2, solver="tensorly")
            assert tl.get_backend() == backend


@pytest.mark.parametrize("method", METHODS)
def test_unknown_solver_is_a_clear_value_error(method):
    conv = make_conv(GEOMETRIES[0])
    with pytest.raises(
        ValueError, match=r"unknown solver 'nope'; valid solvers: autodecomp, tensorly"
    ):
        ad.decompose_conv(conv, method, ratio=0.3, solver="nope")


def test_non_finite_kernel_is_a_decomposition_error_for_tensorly_too():
    conv = make_conv(GEOMETRIES[0])
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(DecompositionError, match="non-finite"):
        ad.decompose_conv(conv, "cp", ratio=0.3, solver="tensorly")
    with pytest.raises(DecompositionError, match="NaN or Inf"):
        tensorly_solvers.cp(conv.weight.detach(), 3)


def test_solver_modules_agree_across_backends():
    t = torch.randn(6, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    on_torch = tensorly_solvers.tt(t, [1, 3, 3, 1], backend="pytorch")
    on_numpy = tensorly_solvers.tt(t, [1, 3, 3, 1], backend="numpy")
    rebuilt = [
        tl.tt_to_tensor([tensorly_solvers.as_tensorly(c) for c in cores])
        for cores in (on_torch, on_numpy)
    ]
    assert (
        rel_err(
            tensorly_solvers.from_tensorly(rebuilt[0]), tensorly_solvers.from_tensorly(rebuilt[1])
        )
        < 1e-12
    )
    err = tensorly_solvers.cp(t, 4, backend="numpy")[2]
    err_torch = tensorly_solvers.cp(t, 4, backend="pytorch")[2]
    assert math.isclose(err, err_torch, rel_tol=1e-6)
    with pytest.raises(ValueError, match="unknown tensorly backend"):
        tensorly_solvers.tt(t, [1, 3, 3, 1], backend="jax")


def test_chain_tensor_round_trip():
    w = torch.randn(12, 8, 3, 3, dtype=torch.float64)
    structure = ((2, 2, 1, 3), (3, 2, 3, 1), (2, 2, 1, 1))
    t = chain_tensor(w, structure)
    assert t.shape == (12, 18, 4)
    assert torch.equal(chain_kernel(t, structure), w)


# ---- the choice in the search space, the plan entry and apply_plan ---------------------------
def test_space_solver_key_per_method_and_for_all():
    assert parse_space({"solver": {"cp": "tensorly"}}).solvers == {"cp": "tensorly"}
    assert parse_space({"solver": {"cp": "autodecomp"}}).solvers == {}
    assert parse_space({}).solvers == {}
    every = parse_space({"solver": "tensorly"}).solvers
    assert every == dict.fromkeys(WITH_TENSORLY, "tensorly")
    with pytest.raises(
        ConfigError, match=r"unknown space\.solver\.cp 'scipy'; valid: autodecomp, tensorly"
    ):
        parse_space({"solver": {"cp": "scipy"}})
    with pytest.raises(ConfigError, match=r"unknown key space\.solver\.svd9"):
        parse_space({"solver": {"svd9": "tensorly"}})
    with pytest.raises(ConfigError, match=r"unknown space\.solver 'fast'"):
        parse_space({"solver": "fast"})


def test_plan_entry_carries_and_checks_the_solver():
    entry = PlanEntry.from_dict({"method": "cp", "ratio": 0.3, "solver": "tensorly"})
    assert entry.options == {"solver": "tensorly"}
    assert entry.to_dict() == {"method": "cp", "ratio": 0.3, "solver": "tensorly"}
    with pytest.raises(ValueError, match=r"layer 'conv': unknown solver 'nope'"):
        PlanEntry.from_dict({"method": "cp", "ratio": 0.3, "solver": "nope"}, "conv")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 12, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_search_space_solver_reaches_the_plan_and_apply_plan():
    torch.manual_seed(0)
    model = _Net().double()
    cfg = parse_space(
        {"layers": {"include": ["b"]}, "methods": ["cp", "tucker"], "solver": {"cp": "tensorly"}}
    )
    space = resolve_space(model, cfg)
    cp_plan = suggest_plan(FixedTrial({"b/method": "cp", "b/cp/ratio": 0.3}), space)
    assert cp_plan == {"b": {"method": "cp", "ratio": 0.3, "solver": "tensorly"}}
    tucker_plan = suggest_plan(FixedTrial({"b/method": "tucker", "b/tucker/ratio": 0.3}), space)
    assert tucker_plan == {"b": {"method": "tucker", "ratio": 0.3}}
    small = ad.apply_plan(model, cp_plan)
    direct = ad.decompose_conv(model.b, "cp", ratio=0.3, solver="tensorly")
    ours = ad.decompose_conv(model.b, "cp", ratio=0.3)
    assert torch.allclose(small.b.dense_weight(), direct.dense_weight())
    assert not torch.allclose(small.b.dense_weight(), ours.dense_weight())
