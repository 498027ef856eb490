"""IMTL-G against its definition: equal projections onto every unit gradient, weights summing to 1."""

import numpy as np
import pytest
import torch

from tolaria.aggregation import IMTLG

from .conflict_cases import cases, make_jacobian


def imtlg_reference(j: torch.Tensor) -> torch.Tensor:
    """Quinton & Rey's generalisation, plainly in numpy: v = pinv(G) sqrt(diag G), w = v / sum v."""
    g = (j @ j.T).numpy()
    v = np.linalg.pinv(g, hermitian=True) @ np.sqrt(np.diag(g))
    w = v / v.sum() if abs(v.sum() * g.trace()) >= 1e-12 else np.zeros_like(v)
    return j.T @ torch.from_numpy(w)


@pytest.mark.parametrize("kind,k,n", cases(kinds=("random", "conflicting", "scaled", "duplicate", "zero_row")))
def test_matches_the_reference(kind, k, n):
    j = make_jacobian(kind, k, n, seed=41)
    d = IMTLG()(j)
    ref = imtlg_reference(j)
    assert (d - ref).norm() <= 1e-9 * max(ref.norm(), j.norm(dim=1).max())


@pytest.mark.parametrize("kind,k", [("random", 2), ("random", 5), ("conflicting", 4), ("scaled", 6)])
def test_equal_projections_onto_unit_gradients(kind, k):
    j = make_jacobian(kind, k, 80, seed=42)
    d, stats = IMTLG()(j, return_stats=True)
    projections = (j @ d) / j.norm(dim=1)
    torch.testing.assert_close(projections, projections.mean().expand(k), rtol=1e-9, atol=1e-12)
    assert abs(float(stats.weights.sum()) - 1) < 1e-12


def test_agrees_with_torchjd():
    tjd = pytest.importorskip("torchjd.aggregation")
    for kind in ("random", "conflicting", "duplicate", "zero_row", "low_rank"):
        j = make_jacobian(kind, 5, 60, seed=43)
        ref = tjd.IMTLG()(j)
        assert (IMTLG()(j) - ref).norm() <= 1e-9 * max(ref.norm(), 1.0)
