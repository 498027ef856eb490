"""The QP-based weightings return one canonical answer: the minimum-norm optimal weights (for the
dual-cone ones, the least sum_i v_i^2 |g_i|^2: the contributions' norm), so that
permuting the sources permutes the weights and nothing else, and the weights stay bounded; MGDA's
epsilon is a stopping rule that holds at loose values; reg_eps / norm_eps mean what TorchJD means.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

from tolaria.aggregation import MGDA, DualProj, UPGrad

from . import property_assertions as props
from .input_families import ranked

QP_AGGREGATORS = {"upgrad": UPGrad, "dualproj": DualProj, "mgda": MGDA}
# Rank-deficient Gram matrices (more sources than directions): many optimal weight vectors each.
SHAPES = [(4, 3, 2), (5, 3, 3), (8, 6, 5), (9, 11, 5), (12, 40, 6), (20, 10, 10)]


def _weights(aggregator, j: torch.Tensor) -> torch.Tensor:
    return aggregator(j, return_stats=True)[1].weights


@pytest.mark.parametrize("name", QP_AGGREGATORS)
@pytest.mark.parametrize("k,n,rank", SHAPES)
def test_permuting_the_sources_permutes_the_weights(name, k, n, rank):
    aggregator = QP_AGGREGATORS[name]()
    gen = torch.Generator().manual_seed(k * n)
    for _ in range(3):
        j = ranked(k, n, rank, gen)
        w = _weights(aggregator, j)
        order = torch.randperm(k, generator=gen)
        gap = (_weights(aggregator, j[order]) - w[order]).abs().max().item()
        assert gap <= 1e-8 * (1 + w.abs().max().item())


def _min_norm_reference(gram: np.ndarray, lower: np.ndarray, v: np.ndarray) -> np.ndarray:
    """argmin sum_i x_i^2 |g_i|^2 (the contributions' squared norms) over the optimal set of the box
    QP, {x >= lower : x - v in null(G)}: a QP in the coordinates a of the null space (x = v + N a),
    through SLSQP."""
    values, vectors = np.linalg.eigh(gram)
    null = vectors[:, values <= 1e-10 * values.max()]
    if null.shape[1] == 0:
        return v
    s = np.diag(gram) / np.diag(gram).max()

    def norm2(a):
        x = v + null @ a
        return (s * x * x).sum()

    res = scipy.optimize.minimize(
        norm2,
        np.zeros(null.shape[1]),
        jac=lambda a: 2 * null.T @ (s * (v + null @ a)),
        constraints=[{"type": "ineq", "fun": lambda a: v + null @ a - lower, "jac": lambda a: null}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    assert res.success, res.message
    return v + null @ res.x


@pytest.mark.parametrize("k,n,rank", SHAPES[:4])
def test_dualproj_weights_are_the_minimum_norm_optimum(k, n, rank):
    gen = torch.Generator().manual_seed(k + n + rank)
    for _ in range(3):
        j = ranked(k, n, rank, gen)
        _, stats = DualProj()(j, return_stats=True)
        v = stats.weights.numpy()
        lower = np.full(k, 1.0 / k)
        reference = _min_norm_reference(stats.gram.numpy(), lower, v)
        np.testing.assert_allclose(v, reference, atol=1e-5 * (1 + np.abs(v).max()))


def test_near_opposite_sources_get_bounded_weights_and_no_conflict_in_float32():
    # A 5 x 3 case of rows 1 and 2 opposite up to a factor -1.2, in float32: the weights could be any
    # of many optimal vectors, some enormous; float32 then lost the cancellation (J d had a negative
    # entry of half its norm).
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        j = torch.randn(5, 3, generator=gen)
        j[2] = -1.2 * j[1]
        for aggregator in (UPGrad(), DualProj()):
            props.assert_non_conflicting(aggregator, j)
            assert aggregator(j, return_stats=True)[1].weights.abs().max() < 1e3


def _mgda_optimum(gram: np.ndarray) -> float:
    k = gram.shape[0]
    res = scipy.optimize.minimize(
        lambda w: w @ gram @ w,
        np.full(k, 1.0 / k),
        jac=lambda w: 2 * gram @ w,
        bounds=[(0, None)] * k,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1, "jac": lambda w: np.ones(k)}],
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 3000},
    )
    return float(res.fun)


@pytest.mark.parametrize("epsilon,max_iters", [(1e-3, 100), (1e-5, 1000), (1e-8, 60)])
def test_mgda_epsilon_bounds_the_objective_at_any_value(epsilon, max_iters):
    gen = torch.Generator().manual_seed(50)
    for _ in range(3):
        j = torch.randn(50, 100, generator=gen, dtype=torch.float64)
        _, stats = MGDA(epsilon=epsilon, max_iters=max_iters)(j, return_stats=True)
        g, w = stats.gram.numpy(), stats.weights.numpy()
        optimum = _mgda_optimum(g)
        assert w @ g @ w <= optimum * (1 + epsilon) + 1e-12 * np.trace(g)
        assert abs(w.sum() - 1) < 1e-9 and (w >= -1e-12).all()


@pytest.mark.parametrize("cls", [UPGrad, DualProj])
def test_reg_eps_and_norm_eps_reproduce_torchjd(cls):
    tjd = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("qpsolvers")
    pytest.importorskip("quadprog")
    gen = torch.Generator().manual_seed(3)
    for k in (3, 5, 8, 12):
        j = torch.randn(k, 40, generator=gen, dtype=torch.float64)
        j[1] = -0.9 * j[0] + 0.2 * j[1]  # a conflict the projection resolves
        reference = getattr(tjd, cls.__name__)()(j)  # TorchJD's defaults: norm_eps = reg_eps = 1e-4
        ours = cls(reg_eps=1e-4, norm_eps=1e-4)(j)
        assert (ours - reference).norm() <= 1e-9 * reference.norm()


def test_reg_eps_solves_the_regularised_problem():
    j = ranked(6, 20, 4, torch.Generator().manual_seed(6))
    gram = j @ j.T
    reg = 1e-2
    h = gram / gram.trace() + reg * torch.eye(6, dtype=torch.float64)
    _, stats = DualProj(reg_eps=reg)(j, return_stats=True)
    v = stats.weights
    hv = h @ v
    free = v > 1 / 6 + 1e-9
    assert (v >= 1 / 6 - 1e-12).all() and (hv >= -1e-12).all() and hv[free].abs().max() <= 1e-10


def test_norm_eps_leaves_tiny_gradients_unprojected():
    j = 1e-4 * ranked(4, 10, 4, torch.Generator().manual_seed(4))  # trace(G) ~ 1e-7 < norm_eps
    j[1] = -j[0]
    _, stats = UPGrad(norm_eps=1e-4, reg_eps=1e-4)(j, return_stats=True)
    torch.testing.assert_close(stats.weights, torch.full((4,), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("cls", [UPGrad, DualProj])
@pytest.mark.parametrize("field", ["reg_eps", "norm_eps"])
@pytest.mark.parametrize("value", [-1e-4, float("nan"), float("inf"), "1e-4", True])
def test_bad_regularisation_is_refused_by_name(cls, field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number >= 0"):
        cls(**{field: value})
