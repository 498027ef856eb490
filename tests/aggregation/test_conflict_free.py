"""ConFIG against its definition (Liu et al. 2024, Equation 2), written on the gradients themselves."""

import pytest
import torch

from tolaria.aggregation import ConFIG

from .reference import assert_close_to_reference


def config_reference(j: torch.Tensor, pref: torch.Tensor | None = None) -> torch.Tensor:
    g = j.to(torch.float64)
    p = torch.ones(g.shape[0], dtype=torch.float64) if pref is None else pref.to(torch.float64)
    units = torch.nan_to_num(g / g.norm(dim=1, keepdim=True), 0.0)
    direction = torch.linalg.pinv(units) @ p
    unit = direction / direction.norm()
    return (g @ unit).sum() * unit


@pytest.mark.parametrize("k,n", [(2, 10), (3, 5), (5, 200), (8, 8), (12, 300)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matches_the_definition(k, n, dtype):
    gen = torch.Generator().manual_seed(k * n)
    j = torch.randn(k, n, generator=gen, dtype=torch.float64).to(dtype)
    assert_close_to_reference(ConFIG()(j), config_reference(j), dtype)
    pref = torch.rand(k, generator=gen, dtype=torch.float64) + 0.5
    assert_close_to_reference(ConFIG(pref)(j), config_reference(j, pref), dtype)


def test_equal_cosine_with_every_gradient():
    gen = torch.Generator().manual_seed(1)
    j = torch.randn(4, 50, generator=gen, dtype=torch.float64)
    j[1] = -0.5 * j[0] + 0.3 * j[1]  # a conflict
    d = ConFIG()(j)
    cosines = (j @ d) / (j.norm(dim=1) * d.norm())
    torch.testing.assert_close(cosines, cosines.mean().expand(4), rtol=0, atol=1e-10)
    assert (cosines > 0).all()


def test_zero_gradient_gets_no_weight():
    j = torch.randn(3, 20, dtype=torch.float64)
    j[2] = 0
    _, stats = ConFIG()(j, return_stats=True)
    assert stats.weights[2] == 0
    assert_close_to_reference(ConFIG()(j), config_reference(j), torch.float64)


def test_agrees_with_torchjd():
    tjd = pytest.importorskip("torchjd.aggregation")
    gen = torch.Generator().manual_seed(7)
    for k in (2, 5, 9):
        j = torch.randn(k, 80, generator=gen, dtype=torch.float64)
        reference = tjd.ConFIG()(j)
        assert (ConFIG()(j) - reference).norm() <= 1e-12 * reference.norm()


def test_pref_vector_length_must_match():
    with pytest.raises(ValueError):
        ConFIG([1.0, 2.0])(torch.randn(3, 10))
