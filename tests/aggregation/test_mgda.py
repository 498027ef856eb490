"""MGDA against its definition: the min-norm point of the convex hull, by scipy, and its properties."""

import numpy as np
import pytest
import scipy.optimize
import torch

from tolaria.aggregation import MGDA

from .conflict_cases import BEYOND_ENUMERATION, cases, make_jacobian


def min_norm_point_reference(j: torch.Tensor) -> torch.Tensor:
    """min ||J^T w||^2 over the simplex, plainly with SLSQP in float64, from every vertex and the centre."""
    g = (j @ j.T).numpy()
    k = g.shape[0]
    best = None
    for start in [np.full(k, 1.0 / k)] + list(np.eye(k)):
        res = scipy.optimize.minimize(
            lambda w: w @ g @ w,
            start,
            jac=lambda w: 2 * g @ w,
            bounds=[(0, None)] * k,
            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1, "jac": lambda w: np.ones(k)}],
            method="SLSQP",
            options={"ftol": 1e-16, "maxiter": 500},
        )
        if best is None or res.fun < best.fun:
            best = res
    return j.T @ torch.from_numpy(best.x)


def _check_min_norm_point(j: torch.Tensor) -> None:
    d = MGDA()(j)
    ref = min_norm_point_reference(j)
    scale = j.norm(dim=1).max()
    assert (d - ref).norm() <= 1e-6 * scale
    assert d.norm() <= ref.norm() + 1e-9 * scale  # never worse than the reference


@pytest.mark.parametrize("kind,k,n", cases())
def test_matches_the_min_norm_point(kind, k, n):
    _check_min_norm_point(make_jacobian(kind, k, n, seed=11))


@pytest.mark.parametrize("kind,k,n", cases())
def test_defining_properties(kind, k, n):
    j = make_jacobian(kind, k, n, seed=12)
    d, stats = MGDA()(j, return_stats=True)
    scale = j.norm(dim=1).max() ** 2
    w = stats.weights
    assert (w >= -1e-12).all() and abs(float(w.sum()) - 1) < 1e-12  # a convex combination
    assert ((j @ d) >= d @ d - 1e-9 * scale).all()  # g_i . d >= ||d||^2 >= 0 for every source
    # Minimal among convex combinations: no random convex combination is shorter.
    torch.manual_seed(0)
    others = torch.distributions.Dirichlet(torch.ones(k, dtype=torch.float64)).sample((200,)) @ j if k > 1 else j
    assert (others.norm(dim=1) >= d.norm() - 1e-9 * scale).all()


@pytest.mark.parametrize("kind,k,n", BEYOND_ENUMERATION)
def test_matches_the_min_norm_point_beyond_enumeration(kind, k, n):
    # Beyond 10 sources the interior point runs, then the exact solve on the support it finds.
    _check_min_norm_point(make_jacobian(kind, k, n, seed=13))


def test_pareto_stationary_sources_give_zero():
    j = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    assert MGDA()(j).norm() < 1e-12


def test_agrees_with_torchjd():
    tjd = pytest.importorskip("torchjd.aggregation")
    for seed in range(4):
        j = make_jacobian("conflicting", 5, 300, seed=seed)
        ref = tjd.MGDA(epsilon=1e-12, max_iters=20000)(j)  # Frank-Wolfe: approaches the optimum slowly
        d = MGDA()(j)
        assert (d - ref).norm() <= 1e-3 * ref.norm()
        assert d.norm() <= ref.norm() * (1 + 1e-9)
