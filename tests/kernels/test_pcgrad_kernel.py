"""The PCGrad weighting kernel against the torch loop (same arithmetic) and the literal algorithm."""

import pytest
import torch
from kernel_cases import DEVICE, KS, ascending_orders, pcgrad_reference, randn

from tolaria.aggregation.pcgrad import draw_orders, pcgrad_coefficients
from tolaria.kernels.pcgrad import MAX_K, pcgrad_weights


def _gram(k: int, n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    j = randn(k, n, dtype=torch.float64, seed=seed)
    return j, j @ j.T


def _torch_weights(gram, orders, reduction="sum", weights=None):
    coeffs, conflicts = pcgrad_coefficients(gram, orders)
    k = gram.shape[0]
    scale = torch.ones(k, dtype=gram.dtype, device=gram.device) if weights is None else weights.to(gram.dtype)
    if reduction == "mean":
        scale = scale / scale.sum()
    return scale @ coeffs, conflicts


@pytest.mark.parametrize("k", KS + (MAX_K,))
@pytest.mark.parametrize("shuffle", [False, True], ids=["ascending", "shuffled"])
@pytest.mark.parametrize("reduction,weighted", [("sum", False), ("mean", False), ("sum", True), ("mean", True)])
def test_matches_the_torch_loop(k, shuffle, reduction, weighted):
    _, g = _gram(k, seed=k)
    orders = draw_orders(k, shuffle=shuffle, generator=torch.Generator().manual_seed(k), device=torch.device("cpu"))
    weights = torch.rand(k, generator=torch.Generator().manual_seed(1), dtype=torch.float64) if weighted else None
    expected_w, expected_conflicts = _torch_weights(g.cpu(), orders, reduction, weights)
    w, conflicts = pcgrad_weights(
        g,
        orders.to(DEVICE) if shuffle else None,
        reduction=reduction,
        weights=None if weights is None else weights.to(DEVICE),
    )
    assert w.dtype == g.dtype and w.device == g.device and conflicts.dtype == torch.int64
    torch.testing.assert_close(w.cpu(), expected_w, rtol=1e-12, atol=1e-12 * float(expected_w.abs().max()))
    assert int(conflicts) == int(expected_conflicts)


@pytest.mark.parametrize("k", [2, 3, 8])
def test_weights_reproduce_the_literal_algorithm(k):
    j, g = _gram(k, n=30, seed=10 + k)
    w, conflicts = pcgrad_weights(g)
    expected = pcgrad_reference(j, ascending_orders(k))
    torch.testing.assert_close((w @ j).cpu(), expected, rtol=1e-10, atol=1e-10)
    assert int(conflicts) > 0 or k == 1


def test_strided_orders_and_gram():
    k = 6
    _, g = _gram(k, seed=3)
    wide = torch.zeros(k, 2 * k, dtype=torch.float64, device=DEVICE)
    wide[:, ::2] = g
    g_strided = wide[:, ::2]
    orders = draw_orders(k, shuffle=True, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    padded = torch.zeros(k, k, dtype=torch.int64, device=DEVICE)
    padded[:, : k - 1] = orders
    strided_orders = padded[:, : k - 1]
    assert not strided_orders.is_contiguous() and not g_strided.is_contiguous()
    expected, _ = _torch_weights(g.cpu(), orders)
    w, _ = pcgrad_weights(g_strided, strided_orders)
    torch.testing.assert_close(w.cpu(), expected, rtol=1e-12, atol=1e-12)


def test_float32_gram():
    _, g = _gram(5, seed=2)
    expected, _ = _torch_weights(g.cpu(), draw_orders(5, shuffle=False, generator=None, device=torch.device("cpu")))
    w, _ = pcgrad_weights(g.to(torch.float32))
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.cpu().double(), expected, rtol=1e-5, atol=1e-5)


def test_zero_rows_are_never_projected_against():
    j = randn(3, 20, dtype=torch.float64)
    j[1] = 0
    w, _ = pcgrad_weights(j @ j.T)
    assert torch.isfinite(w).all()


def test_bad_inputs_are_named():
    _, g = _gram(3)
    with pytest.raises(ValueError, match="square"):
        pcgrad_weights(g[:2])
    with pytest.raises(ValueError, match=f"1 to {MAX_K}"):
        pcgrad_weights(torch.zeros(MAX_K + 1, MAX_K + 1, dtype=torch.float64, device=DEVICE))
    with pytest.raises(TypeError, match="float32 or float64"):
        pcgrad_weights(g.to(torch.float16))
    with pytest.raises(ValueError, match="reduction"):
        pcgrad_weights(g, reduction="max")
    with pytest.raises(ValueError, match="orders"):
        pcgrad_weights(g, torch.zeros(3, 3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="weights"):
        pcgrad_weights(g, weights=torch.ones(2, dtype=torch.float64, device=DEVICE))
