"""PCGrad against the literal per-pair float64 loop, on every backend, dtype and shape."""

import pytest
import torch

from tolaria.aggregation import PCGrad
from tolaria.aggregation.pcgrad import draw_orders, pcgrad_coefficients

from .reference import ascending_orders, assert_close_to_reference, conflicts_reference, pcgrad_reference

BACKENDS = ["cpu", "torch"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _conflicting(k: int, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Gradients with plenty of conflicts: a shared direction plus large opposing noise."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen, dtype=torch.float64)
    noise = torch.randn((k, n), generator=gen, dtype=torch.float64)
    signs = torch.tensor([1.0 if i % 2 == 0 else -0.7 for i in range(k)], dtype=torch.float64)
    return (signs[:, None] * base + 1.5 * noise).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", [(1, 5), (2, 3), (3, 1000), (5, 4097), (8, 257), (16, 100), (33, 70)])
def test_matches_reference_ascending(backend, dtype, k, n):
    j = _conflicting(k, n, dtype, seed=k * 100 + n)
    out, stats = PCGrad(shuffle=False, backend=backend)(j, return_stats=True)
    orders = ascending_orders(k)
    # The reference reads the same (rounded) inputs the engine read.
    assert_close_to_reference(out, pcgrad_reference(j, orders), dtype)
    assert out.dtype == dtype and out.shape == (n,)
    if dtype == torch.float64:
        assert int(stats.conflicts) == conflicts_reference(j, orders)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_shuffled_orders_match_reference(backend, reduction):
    j = _conflicting(6, 300, torch.float64, seed=3)
    seed = 1234
    out = PCGrad(reduction=reduction, generator=torch.Generator().manual_seed(seed), backend=backend)(j)
    orders = draw_orders(6, shuffle=True, generator=torch.Generator().manual_seed(seed), device=j.device)
    assert_close_to_reference(out, pcgrad_reference(j, orders.tolist(), reduction), torch.float64)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_weights_multiply_projected_gradients(reduction):
    j = _conflicting(4, 200, torch.float64, seed=9)
    w = [0.5, 2.0, 1.0, 0.25]
    out = PCGrad(reduction=reduction, shuffle=False, weights=w)(j)
    assert_close_to_reference(out, pcgrad_reference(j, ascending_orders(4), reduction, w), torch.float64)


def test_orders_are_permutations_of_the_others():
    orders = draw_orders(7, shuffle=True, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    for i, row in enumerate(orders.tolist()):
        assert sorted(row) == [j for j in range(7) if j != i]


def test_shuffle_draws_differ_between_calls_and_reproduce_with_seed():
    a = draw_orders(9, shuffle=True, generator=torch.Generator().manual_seed(5), device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(5)
    b = draw_orders(9, shuffle=True, generator=gen, device=torch.device("cpu"))
    c = draw_orders(9, shuffle=True, generator=gen, device=torch.device("cpu"))
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


def test_projects_every_gradient_not_only_the_first():
    # g0 and g1 conflict; the prototype projected only g0. Here g1 must be projected too.
    j = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    out, stats = PCGrad(shuffle=False)(j, return_stats=True)
    g0_pc = torch.tensor([1.0, 0.0]) - (-1.0 / 2.0) * torch.tensor([-1.0, 1.0])
    g1_pc = torch.tensor([-1.0, 1.0]) - (-1.0 / 1.0) * torch.tensor([1.0, 0.0])
    torch.testing.assert_close(out, (g0_pc + g1_pc).double())
    assert int(stats.conflicts) == 2


def test_zero_gradient_source_is_harmless():
    j = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [-1.0, 1.0, 0.0]], dtype=torch.float64)
    out = PCGrad(shuffle=False)(j)
    assert torch.isfinite(out).all()
    assert_close_to_reference(out, pcgrad_reference(j, ascending_orders(3)), torch.float64)


def test_rejects_bad_configuration():
    with pytest.raises(ValueError, match="reduction"):
        PCGrad(reduction="max")
    with pytest.raises(ValueError, match="backend"):
        PCGrad(backend="gpu")
    with pytest.raises(ValueError, match="nonfinite"):
        PCGrad(nonfinite="ignore")
    with pytest.raises(TypeError, match="Generator"):
        PCGrad(generator=42)
    with pytest.raises(ValueError, match="positive sum"):
        PCGrad(reduction="mean", weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="3 weights but got 2"):
        PCGrad(weights=[1.0, 1.0, 1.0])(torch.randn(2, 4))


@pytest.mark.parametrize("reduction,weighted", [("sum", False), ("mean", False), ("mean", True)])
@pytest.mark.parametrize("k", [1, 2, 5, 17])
def test_host_loop_matches_the_device_loop(k, reduction, weighted):
    # A CPU Gram matrix takes the host (NumPy) loop; the torch loop (every other device, and
    # torch.compile) must agree with it, weights and conflicts.
    j = _conflicting(k, 64, torch.float64, seed=k)
    gram = j @ j.T
    w = [0.5 + i for i in range(k)] if weighted else None
    host = PCGrad(reduction=reduction, weights=w, generator=torch.Generator().manual_seed(k)).weighting(gram)
    orders = draw_orders(k, shuffle=True, generator=torch.Generator().manual_seed(k), device=j.device)
    coeffs, conflicts = pcgrad_coefficients(gram, orders)
    scale = torch.ones(k, dtype=torch.float64) if w is None else torch.tensor(w, dtype=torch.float64)
    if reduction == "mean":
        scale = scale / scale.sum()
    torch.testing.assert_close(host.weights, scale @ coeffs)
    assert int(host.conflicts) == int(conflicts) == conflicts_reference(j, orders.tolist())


def test_device_loop_matches_reference():
    k = 6
    j = _conflicting(k, 50, torch.float64, seed=4)
    orders = draw_orders(k, shuffle=True, generator=torch.Generator().manual_seed(2), device=j.device)
    coeffs, _ = pcgrad_coefficients(j @ j.T, orders)
    assert_close_to_reference(coeffs.sum(dim=0) @ j, pcgrad_reference(j, orders.tolist()), torch.float64)


def test_the_shuffles_never_touch_torchs_global_generator_and_a_seed_repeats_them():
    j = torch.randn(6, 50, dtype=torch.float64)
    j[1] = -j[0] + 0.1 * j[1]
    j[3] = -0.5 * j[2] + 0.2 * j[3]
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first, second = PCGrad(seed=3), PCGrad(seed=3)
    runs = [[agg(j) for _ in range(4)] for agg in (first, second)]
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert not all(torch.equal(runs[0][0], r) for r in runs[0][1:])  # the orders do change per call


def test_the_generators_state_resumes_the_orders():
    j = torch.randn(5, 30, dtype=torch.float64)
    j[1] = -j[0] + 0.1 * j[1]
    agg = PCGrad(seed=11)
    agg(j)
    saved = agg.state_dict()
    expected = [agg(j) for _ in range(3)]
    other = PCGrad(seed=12)
    other.load_state_dict(saved)
    assert [torch.equal(other(j), e) for e in expected] == [True] * 3
    assert PCGrad(shuffle=False).stateful is False and agg.stateful is True
    with pytest.raises(ValueError, match="a seed or a generator"):
        PCGrad(seed=1, generator=torch.Generator())
