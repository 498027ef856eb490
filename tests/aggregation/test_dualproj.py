"""DualProj against its definition: the mean gradient projected onto the dual cone."""

import pytest
import torch

from tolaria.aggregation import DualProj

from .conflict_cases import BEYOND_ENUMERATION, cases, make_jacobian
from .test_upgrad import _scipy_projector, project_onto_dual_cone_reference


def _check_matches_the_reference(j: torch.Tensor) -> None:
    d = DualProj()(j)
    ref = project_onto_dual_cone_reference(j, j.mean(0))
    assert (d - ref).norm() <= 1e-7 * j.norm(dim=1).max()


@pytest.mark.parametrize("kind,k,n", cases())
def test_matches_the_reference(kind, k, n):
    _check_matches_the_reference(make_jacobian(kind, k, n, seed=31))


@pytest.mark.parametrize("kind,k,n", cases() + [("random", 6, 3)])
def test_result_lies_in_the_dual_cone_and_is_nearest(kind, k, n):
    j = make_jacobian(kind, k, n, seed=32)
    d = DualProj()(j)
    g = j.mean(0)
    norms = j.norm(dim=1)
    assert ((j @ d) >= -1e-9 * norms * norms.max()).all()
    # Nearest: (g - d) is orthogonal to d (the projection onto a cone).
    assert abs(float((g - d) @ d)) <= 1e-8 * norms.max() ** 2


@pytest.mark.parametrize("kind,k,n", BEYOND_ENUMERATION)
def test_matches_the_reference_beyond_enumeration(kind, k, n):
    _check_matches_the_reference(make_jacobian(kind, k, n, seed=34))


def test_pref_vector_is_projected():
    j = make_jacobian("conflicting", 3, 30, seed=33)
    pref = torch.tensor([1.0, 0.1, 2.0], dtype=torch.float64)
    d = DualProj(pref_vector=pref)(j)
    assert (d - project_onto_dual_cone_reference(j, pref @ j)).norm() <= 1e-7 * j.norm(dim=1).max()


def test_agrees_with_torchjd():
    tjd = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("torchjd._linalg")
    for seed in range(3):
        j = make_jacobian("conflicting", 5, 300, seed=seed)
        exact = tjd.DualProj(projector=_scipy_projector())(j)
        assert (DualProj()(j) - exact).norm() <= 1e-7 * exact.norm()
