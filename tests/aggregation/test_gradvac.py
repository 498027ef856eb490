"""GradVac against Algorithm 1 of Wang et al. (2021), written literally on the gradients, and TorchJD."""

import warnings

import pytest
import torch

from tolaria.aggregation.gradvac import GradVac
from tolaria.aggregation.pcgrad import draw_orders

from . import stateful_checks as checks
from .reference import assert_close_to_reference


def gradvac_reference(grads, orders, targets, beta=0.5, eps=1e-8):
    """One call of Algorithm 1, one pair at a time, in float64 on the K x N gradients.

    ``orders[i]`` lists the j != i in the order g_i meets them; ``targets`` is a K x K list of lists of
    phi_hat, updated in place. Returns sum_i g_i^PC.
    """
    g = grads.to(torch.float64)
    k = g.shape[0]
    total = torch.zeros(g.shape[1], dtype=torch.float64)
    for i in range(k):
        g_pc = g[i].clone()
        for j in orders[i]:
            norm_i, norm_j = float(g_pc.norm()), float(g[j].norm())
            phi = float(torch.dot(g_pc, g[j])) / (norm_i * norm_j + eps)
            phi_hat = targets[i][j]
            if phi < phi_hat and norm_j > 0:  # Equation 4: lift cos(g_i^PC, g_j) to phi_hat
                sin, sin_hat = max(1 - phi * phi, 0.0) ** 0.5, max(1 - phi_hat * phi_hat, 0.0) ** 0.5
                g_pc = g_pc + norm_i * (phi_hat * sin - phi * sin_hat) / (norm_j * sin_hat + eps) * g[j]
            targets[i][j] = (1 - beta) * phi_hat + beta * phi
        total = total + g_pc
    return total


def orders_from(generator_state, k, calls):
    """The orders GradVac draws from a generator in this state, call after call."""
    gen = torch.Generator()
    gen.set_state(generator_state)
    return [draw_orders(k, shuffle=True, generator=gen, device=torch.device("cpu")).tolist() for _ in range(calls)]


def _inputs(k, calls, seed, n=30, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(k, n, generator=gen, dtype=torch.float64)
    # Correlated steps, so that the targets move away from 0 and some pairs sit above, some below.
    return [(base + 0.7 * torch.randn(k, n, generator=gen, dtype=torch.float64)).to(dtype) for _ in range(calls)]


@pytest.mark.parametrize("k", [1, 2, 3, 5, 9])
@pytest.mark.parametrize("beta,eps", [(0.5, 1e-8), (0.01, 1e-8), (1.0, 0.0), (0.3, 1e-3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matches_the_algorithm_over_several_calls(k, beta, eps, dtype):
    aggregator = GradVac(beta, eps, seed=k)
    calls = _inputs(k, 5, seed=k + 100, dtype=dtype)
    orders = orders_from(aggregator.generator.get_state(), k, len(calls))
    targets = [[0.0] * k for _ in range(k)]
    for j, order in zip(calls, orders):
        out = aggregator(j)
        assert out.dtype == dtype and out.device == j.device and out.shape == j.shape[1:]
        assert_close_to_reference(out, gradvac_reference(j, order, targets, beta, eps), dtype)
    torch.testing.assert_close(aggregator.state_dict()["targets"], torch.tensor(targets, dtype=torch.float64))


def test_first_call_is_pcgrad_and_vaccines_are_counted():
    # Targets start at 0: the vaccine of a pair with a negative cosine is PCGrad's projection (to eps).
    j = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    aggregator = GradVac(seed=0)
    out, stats = aggregator(j, return_stats=True)
    order = orders_from(GradVac(seed=0).generator.get_state(), 3, 1)[0]
    projected = []
    for i in range(3):
        g = j[i].clone()
        for o in order[i]:
            if torch.dot(g, j[o]) < 0:
                g = g - torch.dot(g, j[o]) / torch.dot(j[o], j[o]) * j[o]
        projected.append(g)
    torch.testing.assert_close(out, sum(projected), rtol=0, atol=1e-7)
    assert int(stats.conflicts) >= 2  # (0, 1) and (1, 0) conflict whatever the order


def _torchjd_with_orders(monkeypatch, tjd_aggregator, j, order):
    """TorchJD's GradVac with its torch.randperm made to visit the pairs in ``order``."""
    k = j.shape[0]
    perms = iter([[[o for o in range(k) if o != i].index(x) for x in order[i]] for i in range(k)])
    with monkeypatch.context() as m:
        m.setattr(torch, "randperm", lambda n, **kwargs: torch.tensor(next(perms)))
        return tjd_aggregator(j)


@pytest.mark.parametrize("k,beta", [(2, 0.5), (4, 0.5), (6, 0.2), (7, 1.0)])
def test_agrees_with_torchjd(monkeypatch, k, beta):
    tjd = pytest.importorskip("torchjd.aggregation")
    aggregator = GradVac(beta=beta, seed=7)
    theirs = tjd.GradVac(beta=beta)
    calls = _inputs(k, 6, seed=k)
    for j, order in zip(calls, orders_from(aggregator.generator.get_state(), k, len(calls))):
        ours = aggregator(j)
        expected = _torchjd_with_orders(monkeypatch, theirs, j, order)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12 * float(expected.abs().max()))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"beta": -0.1}, "beta"),
        ({"beta": 1.5}, "beta"),
        ({"beta": True}, "beta"),
        ({"beta": "0.5"}, "beta"),
        ({"eps": -1e-8}, "eps"),
        ({"eps": float("inf")}, "eps"),
        ({"eps": None}, "eps"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=f"GradVac {name} must be"):
        GradVac(**kwargs)


def test_bad_seed_and_generator_are_refused():
    with pytest.raises(ValueError, match="seed or a generator"):
        GradVac(seed=1, generator=torch.Generator())
    with pytest.raises(TypeError, match="seed must be an integer"):
        GradVac(seed=1.5)
    with pytest.raises(TypeError, match="CPU torch.Generator"):
        GradVac(generator="gen")


def test_seed_and_generator_reproduce_and_the_global_rng_is_untouched():
    calls = _inputs(5, 4, seed=3)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first, second = GradVac(seed=42), GradVac(generator=torch.Generator().manual_seed(42))
    outs_first = [first(j) for j in calls]
    outs_second = [second(j) for j in calls]
    assert all(torch.equal(x, y) for x, y in zip(outs_first, outs_second))
    unseeded = GradVac()
    for j in calls:
        unseeded(j)
    assert torch.equal(torch.get_rng_state(), before)
    # Other seeds draw other orders, which change the result of these (conflicting) sources.
    assert any(not torch.equal(outs_first[0], GradVac(seed=s)(calls[0])) for s in range(5))


def test_a_shared_generator_advances():
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    GradVac(generator=gen)(torch.randn(4, 10))
    assert not torch.equal(gen.get_state(), state)


def test_state_dict_round_trip_resumes_bit_for_bit(tmp_path):
    calls = _inputs(5, 8, seed=11)
    checks.assert_state_round_trip(lambda: GradVac(beta=0.3, seed=1), calls, tmp_path)
    checks.assert_state_is_a_copy(lambda: GradVac(beta=0.3, seed=1), calls)
    aggregator = GradVac(beta=0.3, seed=1)
    checks.run(aggregator, calls[:3])
    state = aggregator.state_dict()
    assert state["targets"].device.type == "cpu" and state["targets"].dtype == torch.float64


def test_fresh_state_dict_and_reset():
    j = _inputs(4, 1, seed=2)[0]
    aggregator = GradVac(seed=5)
    assert aggregator.stateful and aggregator.state_dict()["targets"] is None
    state = aggregator.state_dict()
    first = aggregator(j)
    aggregator.reset()
    assert aggregator.state_dict()["targets"] is None
    aggregator.load_state_dict(state)
    assert torch.equal(aggregator(j), first)


@pytest.mark.parametrize(
    "state,match",
    [
        ({"targets": None}, "keys"),
        ({"targets": None, "generator": torch.Generator().get_state(), "x": 1}, "keys"),
        ({"targets": torch.zeros(3, 2, dtype=torch.float64), "generator": torch.Generator().get_state()}, "square"),
        ({"targets": torch.zeros(3, dtype=torch.float64), "generator": torch.Generator().get_state()}, "square"),
        ({"targets": None, "generator": torch.zeros(3)}, "generator"),
    ],
)
def test_load_state_dict_refuses_bad_states(state, match):
    with pytest.raises(ValueError, match=match):
        GradVac().load_state_dict(state)


def test_a_change_of_k_restarts_the_targets_with_a_warning():
    aggregator = GradVac(seed=3)
    aggregator(torch.randn(4, 10, dtype=torch.float64))
    j = _inputs(3, 1, seed=4)[0]
    fresh = GradVac()
    fresh.load_state_dict({"targets": None, "generator": aggregator.generator.get_state()})
    with pytest.warns(UserWarning, match="called with 3 sources after 4: its cosine targets restart"):
        out = aggregator(j)
    assert torch.equal(out, fresh(j))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aggregator(j)  # same K: no warning


def test_nonfinite_input_gives_nan_and_keeps_the_targets():
    calls = _inputs(3, 2, seed=8)
    aggregator = GradVac(seed=0, nonfinite="propagate")
    aggregator(calls[0])
    targets = aggregator.state_dict()["targets"]
    bad = calls[1].clone()
    bad[1, 0] = float("nan")
    assert torch.isnan(aggregator(bad)).all()
    assert torch.equal(aggregator.state_dict()["targets"], targets)


def test_zero_gradients_get_no_vaccine():
    j = torch.tensor([[1.0, 2.0], [0.0, 0.0], [-1.0, 0.5]], dtype=torch.float64)
    aggregator = GradVac(beta=1.0, seed=0)
    for _ in range(3):
        _, stats = aggregator(j, return_stats=True)
        assert stats.weights[1] == 1.0 and torch.isfinite(stats.weights).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_backends_agree(backend, dtype):
    if backend == "triton":
        pytest.importorskip("tolaria.kernels", reason="the Triton kernels are not importable in this install")
    calls = _inputs(5, 3, seed=21, n=70, dtype=dtype)
    on_cpu, other = GradVac(seed=4, backend="cpu"), GradVac(seed=4, backend=backend)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for j in calls:
        expected, result = on_cpu(j), other(j)
        assert result.dtype == dtype and result.device == j.device
        torch.testing.assert_close(result, expected, rtol=tol, atol=tol * float(expected.abs().max()))


def test_repr():
    assert repr(GradVac(0.25, 0.0, backend="torch")) == (
        "GradVac(beta=0.25, eps=0.0, backend='torch', nonfinite='raise')"
    )
