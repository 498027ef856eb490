"""CAGrad against Liu et al. (2021): the dual in the weights by scipy, and the primal's properties."""

import numpy as np
import pytest
import scipy.optimize
import torch

from tolaria.aggregation import CAGrad

from .conflict_cases import make_jacobian


def cagrad_reference(j: torch.Tensor, c: float = 0.5, norm_eps: float = 1e-4) -> torch.Tensor:
    """Algorithm 1 plainly: w = argmin_{simplex} g_w . g0 + c ||g0|| ||g_w|| (SLSQP), d = g0 + c||g0|| g_w/||g_w||.

    On G scaled to unit trace, as TorchJD, so that ``norm_eps`` has the same meaning.
    """
    g = (j @ j.T).numpy()
    g = g / g.trace()
    k = g.shape[0]
    mean = np.full(k, 1.0 / k)
    b = g @ mean
    radius = c * np.sqrt(mean @ b)
    objective = lambda w: w @ b + radius * np.sqrt(max(w @ g @ w, 0.0))  # noqa: E731
    best = None
    for start in [mean] + list(np.eye(k)):
        res = scipy.optimize.minimize(
            objective, start, bounds=[(0, 1)] * k,
            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
            method="SLSQP", options={"ftol": 1e-16, "maxiter": 2000},
        )
        if best is None or res.fun < best.fun:
            best = res
    w = best.x
    gw_norm = np.sqrt(w @ g @ w)
    weights = mean + radius / gw_norm * w if gw_norm >= norm_eps else np.zeros(k)
    return j.T @ torch.from_numpy(weights)


def realistic(k: int, seed: int) -> torch.Tensor:
    """N >> K with a shared component and conflicts, as gradients of related tasks are."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((k, 400), generator=gen, dtype=torch.float64) + 0.3 * torch.randn((1, 400), generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("k", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_reference(k, seed):
    j = realistic(k, seed)
    d = CAGrad(c=0.5)(j)
    ref = cagrad_reference(j)
    assert (d - ref).norm() <= 1e-6 * ref.norm()


@pytest.mark.parametrize("c", [0.0, 0.2, 0.5, 0.9])
def test_primal_properties(c):
    # d maximises min_i g_i . d over the ball ||d - g0|| <= c ||g0||: it lies on the ball and no
    # other point of the ball (nor the reference) does better.
    j = realistic(5, seed=7)
    g0 = j.mean(0)
    d = CAGrad(c=c)(j)
    radius = c * g0.norm()
    assert (d - g0).norm() <= radius * (1 + 1e-9) + 1e-12
    worst = (j @ d).min()
    assert worst >= (j @ cagrad_reference(j, c)).min() - 1e-7 * j.norm(dim=1).max() ** 2
    gen = torch.Generator().manual_seed(0)
    directions = torch.randn((300, j.shape[1]), generator=gen, dtype=torch.float64)
    points = g0 + radius * directions / directions.norm(dim=1, keepdim=True)
    assert ((points @ j.T).min(dim=1).values <= worst + 1e-9).all()


def test_zero_radius_gives_the_mean():
    j = realistic(4, seed=8)
    torch.testing.assert_close(CAGrad(c=0.0)(j), j.mean(0), rtol=1e-12, atol=1e-12)


def test_pareto_stationary_sources_give_zero():
    # Opposite gradients: the conflict-averse direction does not exist; TorchJD returns zero too.
    j = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    assert torch.equal(CAGrad()(j), torch.zeros(2, dtype=torch.float64))


def test_agrees_with_torchjd():
    tjd = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("cvxpy")
    for k in (2, 5, 8):
        j = realistic(k, seed=9)
        ref = tjd.CAGrad(c=0.5)(j)  # cvxpy/Clarabel, accurate to about 1e-5 here
        assert (CAGrad(c=0.5)(j) - ref).norm() <= 1e-4 * ref.norm()
