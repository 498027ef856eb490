"""Krum against its definition (Blanchard et al. 2017), written literally on the gradients."""

import pytest
import torch

from tolaria.aggregation import Krum

from .reference import assert_close_to_reference


def krum_reference(j: torch.Tensor, f: int, m: int) -> torch.Tensor:
    """Score each gradient by the sum of its distances to its K - f - 2 nearest others (TorchJD's
    reading of the paper's squared distances), and average the m best (Multi-Krum)."""
    g = j.to(torch.float64)
    k = g.shape[0]
    scores = []
    for i in range(k):
        others = sorted(float((g[i] - g[o]).norm()) for o in range(k) if o != i)
        scores.append(sum(others[: k - f - 2]))
    best = sorted(range(k), key=lambda i: (scores[i], i))[:m]
    return sum(g[i] for i in best) / m


@pytest.mark.parametrize("k,f,m", [(3, 0, 1), (5, 1, 1), (7, 2, 3), (10, 3, 4), (12, 0, 12)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matches_the_definition(k, f, m, dtype):
    gen = torch.Generator().manual_seed(k)
    j = torch.randn(k, 40, generator=gen, dtype=torch.float64)
    j[:f] += 25.0  # the Byzantine ones: far from the rest
    j = j.to(dtype)
    out = Krum(n_byzantine=f, n_selected=m)(j)
    assert_close_to_reference(out, krum_reference(j, f, m), dtype)


def test_outliers_are_never_selected():
    gen = torch.Generator().manual_seed(0)
    j = torch.randn(8, 100, generator=gen, dtype=torch.float64) * 0.1 + 1.0
    j[2] = -50.0
    j[5] = 80.0
    _, stats = Krum(n_byzantine=2, n_selected=3)(j, return_stats=True)
    assert stats.weights[2] == 0 and stats.weights[5] == 0
    assert torch.isclose(stats.weights.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_agrees_with_torchjd():
    tjd = pytest.importorskip("torchjd.aggregation")
    gen = torch.Generator().manual_seed(3)
    for k, f, m in [(4, 1, 1), (9, 2, 4), (15, 5, 2)]:
        j = torch.randn(k, 60, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(Krum(f, m)(j), tjd.Krum(n_byzantine=f, n_selected=m)(j), rtol=0, atol=1e-14)


@pytest.mark.parametrize("kwargs", [{"n_byzantine": -1}, {"n_byzantine": 1.5}, {"n_selected": 0}, {"n_selected": True}])
def test_bad_arguments_are_refused_by_name(kwargs):
    with pytest.raises(ValueError, match=f"Krum {next(iter(kwargs))} must be an integer"):
        Krum(**kwargs)


def test_too_few_sources_say_how_many_are_needed():
    with pytest.raises(ValueError, match=r"needs at least 5 sources \(n_byzantine \+ 3, and n_selected\), got 4"):
        Krum(n_byzantine=2)(torch.randn(4, 10))
