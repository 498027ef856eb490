"""PCD against its definition (the paper's program, solved by enumerating active sets on the gradients,
as its Appendix B.2 does), and against TorchJD."""

import itertools
import warnings

import pytest
import torch

from tolaria.aggregation.pcd import PCD

from . import stateful_checks as checks
from .reference import assert_close_to_reference


class PCDReference:
    """PCD on the K x N gradients, in float64, one call at a time."""

    def __init__(self, tau=0.02, beta=0.999, eps=1e-8):
        self.tau, self.beta, self.eps = tau, beta, eps
        self.average, self.steps = None, 0

    def __call__(self, grads):
        g = grads.to(torch.float64)
        k = g.shape[0]
        sq = (g * g).sum(dim=1)
        self.average = (1 - self.beta) * sq if self.average is None else self.beta * self.average + (1 - self.beta) * sq
        self.steps += 1
        denominators = (self.average / (1 - self.beta**self.steps) + self.eps).sqrt()
        scales = torch.where(denominators > 0, 1 / denominators, 0.0)
        if sq[0] == 0:
            return torch.zeros(g.shape[1], dtype=torch.float64)
        normalized = scales[:, None] * g
        primary = normalized[0]
        taus = torch.as_tensor(self.tau, dtype=torch.float64).expand(k - 1)
        bounds = taus * (normalized[1:] ** 2).sum(dim=1)
        tol = 1e-9 * float((normalized**2).sum(dim=1).max())
        best, best_distance = None, float("inf")
        # The minimiser is the projection of g~_0 onto the affine set of its active constraints: try
        # every set of constraints held with equality, keep the feasible point closest to g~_0.
        for size in range(k):
            for active in itertools.combinations(range(k - 1), size):
                rows = normalized[1:][list(active)]
                if size:
                    step = torch.linalg.pinv(rows) @ (bounds[list(active)] - rows @ primary)
                    d = primary + step
                    if (rows @ d - bounds[list(active)]).abs().max() > tol:
                        continue  # inconsistent equalities
                else:
                    d = primary
                if k > 1 and (normalized[1:] @ d - bounds).min() < -tol:
                    continue
                distance = float((d - primary).norm())
                if distance < best_distance:
                    best, best_distance = d, distance
        if best is None:  # infeasible: the constraints are dropped
            return g[0].clone()
        if best.norm() <= 1e-7 * normalized.norm(dim=1).max():
            return torch.zeros(g.shape[1], dtype=torch.float64)
        return best * g[0].norm() / best.norm()


def _inputs(k, calls, seed, n=12, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(k, n, generator=gen, dtype=torch.float64)
    scale = torch.rand(k, 1, generator=gen, dtype=torch.float64) * 10 + 0.1
    return [(scale * (base + torch.randn(k, n, generator=gen, dtype=torch.float64))).to(dtype) for _ in range(calls)]


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("tau,beta", [(0.02, 0.999), (0.5, 0.9), (1.0, 0.0), (0.0, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matches_the_definition_over_several_calls(k, tau, beta, dtype):
    aggregator, reference = PCD(tau, beta), PCDReference(tau, beta)
    for j in _inputs(k, 4, seed=k * 10 + int(tau * 7), dtype=dtype):
        out = aggregator(j)
        assert out.dtype == dtype and out.device == j.device and out.shape == j.shape[1:]
        assert_close_to_reference(out, reference(j), dtype)
    torch.testing.assert_close(aggregator.state_dict()["sq_norm_ema"], reference.average, rtol=1e-6, atol=0)


def test_few_sources_many_dimensions_and_a_vector_tau():
    tau = [0.9, 0.1, 0.6, 0.3]
    aggregator, reference = PCD(tau=torch.tensor(tau, dtype=torch.float64), beta=0.8), PCDReference(tau, 0.8)
    for j in _inputs(5, 3, seed=3, n=3):  # 4 secondary gradients in 3 dimensions: dependent constraints
        assert_close_to_reference(aggregator(j), reference(j), torch.float64)


def test_the_guarantees_hold_and_the_norm_is_the_primarys():
    j = _inputs(6, 1, seed=5, n=20)[0]
    # beta = 0 and eps = 0: the scales are exactly 1 / |g_i|, so g~_i is the unit gradient.
    out, stats = PCD(tau=0.4, beta=0.0, eps=0.0)(j, return_stats=True)
    unit = j / j.norm(dim=1, keepdim=True)
    # w_0 = s_0 |g_0| / |d~| = 1 / |d~|, so d~ = out / (w_0 |g_0|).
    direction = out / (stats.weights[0] * j[0].norm())
    progress = unit[1:] @ direction
    assert (progress >= 0.4 - 1e-10).all()
    assert (progress - 0.4).abs().min() <= 1e-10  # some conflict was resolved: a guarantee binds
    assert (stats.weights[1:] >= 0).all()
    torch.testing.assert_close(out.norm(), j[0].norm())
    assert int(stats.conflicts) == int((unit[1:] @ unit[0] < 0.4).sum()) > 0


def test_special_cases():
    # g_0 = 0: zero.
    j = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
    assert torch.equal(PCD()(j), torch.zeros(2, dtype=torch.float64))
    # Opposite secondary gradients with tau > 0: infeasible, the result is g_0.
    j = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, -3.0]], dtype=torch.float64)
    assert_close_to_reference(PCD(tau=0.1)(j), j[0], torch.float64)
    # tau = 0 and g_1 = -g_0: d~ is zero, and so is the result.
    j = torch.tensor([[1.0, -2.0], [-1.0, 2.0]], dtype=torch.float64)
    assert torch.equal(PCD(tau=0.0)(j), torch.zeros(2, dtype=torch.float64))
    # No conflict: the result is g_0 itself.
    j = torch.tensor([[1.0, 0.0], [1.0, 0.1]], dtype=torch.float64)
    assert_close_to_reference(PCD()(j), j[0], torch.float64)


@pytest.mark.parametrize("k,tau,beta", [(2, 0.02, 0.999), (3, 0.5, 0.9), (6, 0.3, 0.5), (8, 1.0, 0.99), (9, 0.0, 0.0)])
def test_agrees_with_torchjd(k, tau, beta):
    tjd = pytest.importorskip("torchjd.aggregation")
    ours, theirs = PCD(tau, beta), tjd.PCD(tau=tau, beta=beta)
    for j in _inputs(k, 5, seed=k):
        expected = theirs(j)
        torch.testing.assert_close(ours(j), expected, rtol=0, atol=1e-12 * max(float(expected.abs().max()), 1.0))


def test_agrees_with_torchjd_with_a_vector_tau_and_dependent_gradients():
    tjd = pytest.importorskip("torchjd.aggregation")
    tau = torch.tensor([0.2, 0.9, 0.05, 0.5, 0.7], dtype=torch.float64)
    ours, theirs = PCD(tau, 0.5), tjd.PCD(tau=tau, beta=0.5)
    for j in _inputs(6, 5, seed=17, n=3):
        expected = theirs(j)
        torch.testing.assert_close(ours(j), expected, rtol=0, atol=1e-10 * max(float(expected.abs().max()), 1.0))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"tau": -0.1}, "tau"),
        ({"tau": 1.5}, "tau"),
        ({"tau": True}, "tau"),
        ({"tau": [[0.1]]}, "tau"),
        ({"tau": [0.1, 2.0]}, "tau"),
        ({"tau": "0.1"}, "tau"),
        ({"beta": 1.0}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"beta": None}, "beta"),
        ({"eps": -1e-8}, "eps"),
        ({"eps": float("nan")}, "eps"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=f"PCD {name} must"):
        PCD(**kwargs)


def test_a_tau_vector_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="PCD tau has 2 values, one per secondary source, but 4 sources"):
        PCD(tau=[0.1, 0.2])(torch.randn(4, 5))


def test_state_dict_round_trip_resumes_bit_for_bit(tmp_path):
    calls = _inputs(5, 8, seed=23)
    checks.assert_state_round_trip(lambda: PCD(tau=0.3, beta=0.9), calls, tmp_path)
    checks.assert_state_is_a_copy(lambda: PCD(tau=0.3, beta=0.9), calls)
    aggregator = PCD(tau=0.3, beta=0.9)
    checks.run(aggregator, calls[:3])
    state = aggregator.state_dict()
    assert state["steps"] == 3 and state["sq_norm_ema"].dtype == torch.float64


def test_fresh_state_and_reset():
    j = _inputs(3, 2, seed=1)
    aggregator = PCD(beta=0.5)
    assert aggregator.stateful and aggregator.state_dict() == {"sq_norm_ema": None, "steps": 0}
    first = aggregator(j[0])
    aggregator(j[1])
    aggregator.reset()
    assert aggregator.state_dict() == {"sq_norm_ema": None, "steps": 0}
    assert torch.equal(aggregator(j[0]), first)


@pytest.mark.parametrize(
    "state,match",
    [
        ({"steps": 0}, "keys"),
        ({"sq_norm_ema": None, "steps": 0, "extra": 1}, "keys"),
        ({"sq_norm_ema": None, "steps": -1}, "steps"),
        ({"sq_norm_ema": None, "steps": 2}, "no moving average"),
        ({"sq_norm_ema": torch.zeros(2, 2), "steps": 1}, "1-D float"),
        ({"sq_norm_ema": torch.ones(3), "steps": 0}, "1-D"),
        ({"sq_norm_ema": torch.ones(3), "steps": 1.0}, "steps"),
    ],
)
def test_load_state_dict_refuses_bad_states(state, match):
    with pytest.raises(ValueError, match=match):
        PCD().load_state_dict(state)


def test_a_change_of_k_restarts_the_average_with_a_warning():
    aggregator = PCD(beta=0.5)
    aggregator(torch.randn(4, 10, dtype=torch.float64))
    j = _inputs(3, 1, seed=4)[0]
    with pytest.warns(UserWarning, match="called with 3 sources after 4: its moving average"):
        out = aggregator(j)
    assert torch.equal(out, PCD(beta=0.5)(j))
    assert aggregator.state_dict()["steps"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aggregator(j)


def test_nonfinite_input_gives_nan_and_keeps_the_average():
    calls = _inputs(3, 2, seed=8)
    aggregator = PCD(nonfinite="propagate")
    aggregator(calls[0])
    state = aggregator.state_dict()
    bad = calls[1].clone()
    bad[2, 1] = float("inf")
    assert torch.isnan(aggregator(bad)).all()
    after = aggregator.state_dict()
    assert after["steps"] == state["steps"] and torch.equal(after["sq_norm_ema"], state["sq_norm_ema"])


def test_the_primary_source_is_the_first():
    j = torch.tensor([[1.0, 0.0], [-0.5, 1.0]], dtype=torch.float64)
    out = PCD(tau=0.0)(j)
    swapped = PCD(tau=0.0)(j.flip(0))
    assert out[0] > 0 and swapped[1] > 0 and not torch.allclose(out, swapped)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_backends_agree(backend, dtype):
    if backend == "triton":
        pytest.importorskip("tolaria.kernels", reason="the Triton kernels are not importable in this install")
    calls = _inputs(5, 3, seed=21, n=70, dtype=dtype)
    on_cpu, other = PCD(tau=0.3, beta=0.9, backend="cpu"), PCD(tau=0.3, beta=0.9, backend=backend)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for j in calls:
        expected, result = on_cpu(j), other(j)
        assert result.dtype == dtype and result.device == j.device
        torch.testing.assert_close(result, expected, rtol=tol, atol=tol * float(expected.abs().max()))


def test_repr():
    assert repr(PCD(tau=[0.5, 0.25], beta=0.0)) == (
        "PCD(tau=[0.5, 0.25], beta=0.0, eps=1e-08, backend='auto', nonfinite='raise')"
    )
