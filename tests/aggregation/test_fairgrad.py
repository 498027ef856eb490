"""FairGrad against its definition (Ban & Ji 2024, Equation 4): (G w)_i = w_i^(-1/alpha), w > 0."""

import numpy as np
import pytest
import scipy.optimize
import torch

from tolaria.aggregation import FairGrad


def fairgrad_reference(j: torch.Tensor, alpha: float) -> torch.Tensor:
    """The equation solved by SciPy's bounded least squares, as the paper's own code does."""
    g = (j.to(torch.float64) @ j.to(torch.float64).T).numpy()
    k = g.shape[0]
    res = scipy.optimize.least_squares(
        lambda w: g @ w - w ** (-1.0 / alpha),
        np.ones(k) / k,
        bounds=(1e-12, np.inf),
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
        max_nfev=10_000,
    )
    return torch.from_numpy(res.x) @ j.to(torch.float64)


def _conflicting(k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    j = torch.randn(k, 60, generator=gen, dtype=torch.float64) * torch.logspace(-1, 1, k, dtype=torch.float64)[:, None]
    if k > 1:
        j[1] = -0.7 * j[0] + 0.3 * j[1]
    return j


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_matches_the_definition(alpha, k):
    # Newton stops at the rounding of F, about 1e-9 relative here: the reference's own tolerance.
    j = _conflicting(k, seed=k)
    reference = fairgrad_reference(j, alpha)
    assert (FairGrad(alpha)(j) - reference).norm() <= 1e-8 * reference.norm()


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_the_weights_solve_the_equation_and_make_every_source_progress(alpha):
    j = _conflicting(6, seed=2)
    d, stats = FairGrad(alpha)(j, return_stats=True)
    w, g = stats.weights, stats.gram
    assert (w > 0).all()
    torch.testing.assert_close(g @ w, w ** (-1 / alpha), rtol=1e-8, atol=0)
    assert ((j @ d) > 0).all()  # g_i . d = w_i^(-1/alpha) > 0: no source conflicts with d


def test_alpha_zero_is_the_mean():
    j = _conflicting(4, seed=3)
    torch.testing.assert_close(FairGrad(0.0)(j), j.mean(0))


def test_scale_of_the_gradients_scales_the_result_as_the_equation_says():
    j = _conflicting(4, seed=4)
    alpha, c = 2.0, 1e3
    # w(c J) = c^(-2 alpha / (1 + alpha)) w(J), so d(c J) = c^((1 - alpha) / (1 + alpha)) d(J).
    torch.testing.assert_close(FairGrad(alpha)(c * j), c ** ((1 - alpha) / (1 + alpha)) * FairGrad(alpha)(j))


def test_agrees_with_torchjd():
    tjd = pytest.importorskip("torchjd.aggregation")
    for k, alpha in [(2, 1.0), (4, 0.5), (8, 2.0)]:
        j = _conflicting(k, seed=10 + k)
        reference = tjd.FairGrad(alpha)(j)
        assert (FairGrad(alpha)(j) - reference).norm() <= 1e-8 * reference.norm()


@pytest.mark.parametrize("kwargs", [{"alpha": -1.0}, {"alpha": float("nan")}, {"alpha": "1"}, {"max_iters": 0}])
def test_bad_arguments_are_refused_by_name(kwargs):
    with pytest.raises(ValueError, match=f"FairGrad {next(iter(kwargs))} must be"):
        FairGrad(**kwargs)
