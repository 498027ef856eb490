"""CAGrad against Liu et al. (2021), by scipy in float64: the dual in the weights (Algorithm 1), the
primal problem it comes from, and the properties of the result, on realistic and on hard inputs."""

import numpy as np
import pytest
import scipy.optimize
import torch

import tolaria.aggregation.cagrad as cagrad_module
from tolaria.aggregation import CAGrad


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
            objective,
            start,
            bounds=[(0, 1)] * k,
            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
            method="SLSQP",
            options={"ftol": 1e-16, "maxiter": 2000},
        )
        if best is None or res.fun < best.fun:
            best = res
    w = best.x
    gw_norm = np.sqrt(w @ g @ w)
    weights = mean + radius / gw_norm * w if gw_norm >= norm_eps else np.zeros(k)
    return j.T @ torch.from_numpy(weights)


def primal_reference(j: torch.Tensor, c: float) -> torch.Tensor:
    """The problem CAGrad's dual comes from, plainly: d = argmax_{||d - g0|| <= c ||g0||} min_i g_i . d.

    SLSQP on (d, t): maximise t subject to J d >= t and the ball, both smooth, from several starts.
    The maximiser is unique unless the sources are Pareto-stationary (then 0 is optimal).
    """
    jn = j.numpy()
    k, n = jn.shape
    g0 = jn.mean(0)
    radius = c * np.linalg.norm(g0)
    constraints = [
        {"type": "ineq", "fun": lambda x: jn @ x[:n] - x[n], "jac": lambda x: np.hstack([jn, -np.ones((k, 1))])},
        {
            "type": "ineq",
            "fun": lambda x: radius**2 - ((x[:n] - g0) ** 2).sum(),
            "jac": lambda x: np.concatenate([-2 * (x[:n] - g0), [0.0]]),
        },
    ]
    best = None
    for start in [g0] + [g0 + radius * row / max(np.linalg.norm(row), 1e-300) for row in jn[:4]]:
        res = scipy.optimize.minimize(
            lambda x: -x[n],
            np.concatenate([start, [(jn @ start).min()]]),
            jac=lambda x: np.concatenate([np.zeros(n), [-1.0]]),
            constraints=constraints,
            method="SLSQP",
            options={"ftol": 1e-16, "maxiter": 5000},
        )
        if best is None or res.fun < best.fun:
            best = res
    return torch.from_numpy(best.x[:n])


def realistic(k: int, seed: int) -> torch.Tensor:
    """N >> K with a shared component and conflicts, as gradients of related tasks are."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn((1, 400), generator=gen, dtype=torch.float64)
    return torch.randn((k, 400), generator=gen, dtype=torch.float64) + 0.3 * shared


def hard(kind: str, k: int, n: int, seed: int = 0) -> torch.Tensor:
    """Inputs where a solver that only handles N >> K goes wrong (K x N, float64)."""
    gen = torch.Generator().manual_seed(1000 * seed + 10 * k + n)
    j = torch.randn((k, n), generator=gen, dtype=torch.float64)
    if kind == "near_opposite":  # g_1 = -g_0 up to 1e-3: the conflict-averse direction is nearly 0
        j[1] = -j[0] + 1e-3 * torch.randn(n, generator=gen, dtype=torch.float64)
    elif kind == "low_rank":  # rank 2
        basis = torch.randn((2, n), generator=gen, dtype=torch.float64)
        j = torch.randn((k, 2), generator=gen, dtype=torch.float64) @ basis
    elif kind == "duplicate":
        j[1], j[2] = j[0], 2 * j[0]
    elif kind == "scaled":  # norms over four orders of magnitude
        j = j * torch.logspace(-2, 2, k, dtype=torch.float64)[:, None]
    return j


# (kind, K, N): K > N for most, so that G is singular; the first is where the old solver was 10% off.
HARD_CASES = [
    ("random", 8, 3),
    ("random", 10, 2),
    ("random", 6, 1),
    ("near_opposite", 4, 20),
    ("near_opposite", 8, 3),
    ("low_rank", 6, 30),
    ("duplicate", 5, 20),
    ("scaled", 6, 20),
    ("scaled", 9, 4),
]


def check_against_primal(j: torch.Tensor, c: float) -> None:
    """d is the primal optimum (to 1e-6 relative); a zero d only where zero is optimal (Pareto-stationary).

    ``norm_eps=0``: the solver itself is checked, not the convention that zeroes a tiny ||g_w||.
    """
    d = CAGrad(c=c, norm_eps=0.0)(j)
    ref = primal_reference(j, c)
    scale = float(j.norm(dim=1).max() ** 2)
    g0 = j.mean(0)
    assert (d - g0).norm() <= c * g0.norm() * (1 + 1e-9) + 1e-12 or torch.equal(d, torch.zeros_like(d))
    worst, worst_ref = float((j @ d).min()), float((j @ ref).min())
    assert worst >= worst_ref - 1e-9 * scale  # never worse than the reference
    if torch.equal(d, torch.zeros_like(d)):
        assert worst_ref <= 1e-9 * scale, "zero returned, but some direction of the ball conflicts with no source"
    else:
        assert (d - ref).norm() <= 1e-6 * ref.norm()


@pytest.mark.parametrize("k", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_reference(k, seed):
    j = realistic(k, seed)
    d = CAGrad(c=0.5)(j)
    ref = cagrad_reference(j)
    assert (d - ref).norm() <= 1e-6 * ref.norm()


@pytest.mark.parametrize("kind,k,n", HARD_CASES)
@pytest.mark.parametrize("c", [0.2, 0.5, 0.9, 2.0])
def test_hard_inputs_match_the_primal_problem(kind, k, n, c):
    check_against_primal(hard(kind, k, n), c)


def test_the_dual_is_solved_exactly_where_k_exceeds_n():
    # The dual objective of the answer, read back from its weights, is the dual reference's (or lower).
    j = hard("random", 8, 3)
    g = j @ j.T
    g = g / g.trace()
    k = j.shape[0]
    weights = CAGrad(c=0.5)(j, return_stats=True)[1].weights
    mean = torch.full((k,), 1.0 / k, dtype=torch.float64)
    w = weights - mean  # = (r / ||g_w||) w*: its direction is w*'s
    w = w / w.sum()
    b = g @ mean
    radius = 0.5 * (mean @ b).sqrt()
    value = float(b @ w + radius * (w @ g @ w).sqrt())
    res = min(
        (
            scipy.optimize.minimize(
                lambda v: v @ b.numpy() + float(radius) * np.sqrt(max(v @ g.numpy() @ v, 0.0)),
                start,
                bounds=[(0, 1)] * k,
                constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1}],
                method="SLSQP",
                options={"ftol": 1e-16, "maxiter": 2000},
            )
            for start in [mean.numpy()] + list(np.eye(k))
        ),
        key=lambda r: r.fun,
    )
    assert (w >= -1e-12).all()
    assert value <= res.fun + 1e-10


@pytest.mark.parametrize(
    "kind,k,n", [("random", 12, 3), ("near_opposite", 14, 40), ("low_rank", 16, 30), ("scaled", 12, 40)]
)
@pytest.mark.parametrize("c", [0.5, 2.0])
def test_beyond_enumeration_matches_the_primal_problem(kind, k, n, c):
    check_against_primal(hard(kind, k, n), c)


@pytest.mark.parametrize(
    "kind,n", [("random", 3), ("random", 50), ("near_opposite", 5), ("low_rank", 20), ("scaled", 20)]
)
@pytest.mark.parametrize("c", [0.2, 0.9, 2.0])
def test_search_beyond_enumeration_agrees_with_enumeration(monkeypatch, kind, n, c):
    # K = 11 by both paths: every support enumerated, and the search through quadratic programs.
    j = hard(kind, 11, n, seed=1)
    searched = CAGrad(c=c)(j)
    monkeypatch.setattr(cagrad_module, "ENUMERATION_MAX_K", 11)
    enumerated = CAGrad(c=c)(j)
    assert torch.equal(searched, enumerated) or (searched - enumerated).norm() <= 1e-9 * enumerated.norm()


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


@pytest.mark.parametrize("k", [3, 12])
def test_a_zero_gradient_makes_the_sources_pareto_stationary(k):
    # No direction improves a source whose gradient is 0: the optimum of the dual is at g_w = 0.
    j = realistic(k, seed=3)[:, :40].clone()
    j[0] = 0
    assert torch.equal(CAGrad(c=0.5)(j), torch.zeros(40, dtype=torch.float64))
    assert float((j @ primal_reference(j, 0.5)).min()) <= 1e-9


def test_agrees_with_torchjd():
    tjd = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("cvxpy")
    for k in (2, 5, 8):
        j = realistic(k, seed=9)
        ref = tjd.CAGrad(c=0.5)(j)  # cvxpy/Clarabel, accurate to about 1e-5 here
        assert (CAGrad(c=0.5)(j) - ref).norm() <= 1e-4 * ref.norm()
