"""UPGrad against its definition (Quinton & Rey 2024): the mean of the projections onto the dual cone."""

import numpy as np
import pytest
import scipy.optimize
import torch

from tolaria.aggregation import UPGrad

from .conflict_cases import BEYOND_ENUMERATION, cases, make_jacobian


def project_onto_dual_cone_reference(j: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """argmin ||d - g|| s.t. J d >= 0, via its dual: d = g + J^T x with x = argmin_{x >= 0} ||g + J^T x||."""
    x, _ = scipy.optimize.nnls(j.T.numpy(), -g.numpy(), maxiter=100 * j.shape[0])
    return g + j.T @ torch.from_numpy(x)


def upgrad_reference(j: torch.Tensor, pref: torch.Tensor | None = None) -> torch.Tensor:
    k = j.shape[0]
    pref = torch.full((k,), 1.0 / k, dtype=torch.float64) if pref is None else pref
    return sum(project_onto_dual_cone_reference(j, pref[i] * j[i]) for i in range(k))


def primal_projection(j: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The same projection straight from its definition, by SLSQP: a check of the reference itself."""
    res = scipy.optimize.minimize(
        lambda d: ((d - g.numpy()) ** 2).sum(),
        g.numpy(),
        jac=lambda d: 2 * (d - g.numpy()),
        constraints=[{"type": "ineq", "fun": lambda d: j.numpy() @ d, "jac": lambda d: j.numpy()}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return torch.from_numpy(res.x)


def test_reference_is_the_primal_projection():
    j = make_jacobian("conflicting", 4, 12, seed=1)
    g = j[0]
    torch.testing.assert_close(project_onto_dual_cone_reference(j, g), primal_projection(j, g), rtol=1e-6, atol=1e-6)


def _check_matches_the_reference(j: torch.Tensor, d: torch.Tensor) -> None:
    assert (d - upgrad_reference(j)).norm() <= 1e-7 * j.norm(dim=1).max()


def _check_in_the_dual_cone(j: torch.Tensor, d: torch.Tensor) -> None:
    norms = j.norm(dim=1)
    assert ((j @ d) >= -1e-9 * norms * norms.max()).all()


@pytest.mark.parametrize("kind,k,n", cases())
def test_matches_the_reference(kind, k, n):
    j = make_jacobian(kind, k, n, seed=21)
    _check_matches_the_reference(j, UPGrad()(j))


@pytest.mark.parametrize("kind,k,n", cases() + [("random", 6, 3), ("conflicting", 8, 5)])
def test_result_lies_in_the_dual_cone(kind, k, n):
    j = make_jacobian(kind, k, n, seed=22)
    _check_in_the_dual_cone(j, UPGrad()(j))


@pytest.mark.parametrize("kind,k,n", BEYOND_ENUMERATION)
def test_matches_the_reference_beyond_enumeration(kind, k, n):
    j = make_jacobian(kind, k, n, seed=24)
    d = UPGrad()(j)
    _check_matches_the_reference(j, d)
    _check_in_the_dual_cone(j, d)


def test_pref_vector_weights_the_projections():
    j = make_jacobian("conflicting", 3, 40, seed=23)
    pref = torch.tensor([0.2, 0.5, 1.3], dtype=torch.float64)
    d = UPGrad(pref_vector=pref)(j)
    assert (d - upgrad_reference(j, pref)).norm() <= 1e-7 * j.norm(dim=1).max()


def test_non_conflicting_gradients_are_averaged():
    j = torch.tensor([[1.0, 0.2, 0.0], [0.5, 1.0, 0.1]], dtype=torch.float64)
    torch.testing.assert_close(UPGrad()(j), j.mean(0), rtol=1e-12, atol=1e-12)


def _scipy_projector():
    from torchjd._linalg import DualConeProjector

    class ScipyProjector(DualConeProjector):
        """TorchJD's projector interface, solved exactly by NNLS on the Gram matrix's square root."""

        def __call__(self, u, g):
            vals, vecs = torch.linalg.eigh(g)
            root = (vecs * vals.clamp_min(0).sqrt()).T  # root^T root = G
            out = []
            for row in u.reshape(-1, u.shape[-1]):
                x, _ = scipy.optimize.nnls(root.numpy(), -(root @ row).numpy(), maxiter=1000)
                out.append(row + torch.from_numpy(x))
            return torch.stack(out).reshape(u.shape)

    return ScipyProjector()


def test_agrees_with_torchjd():
    tjd = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("torchjd._linalg")
    for seed in range(3):
        j = make_jacobian("conflicting", 5, 300, seed=seed)
        exact = tjd.UPGrad(projector=_scipy_projector())(j)  # TorchJD's UPGrad, solved exactly
        assert (UPGrad()(j) - exact).norm() <= 1e-7 * exact.norm()


def test_agrees_with_torchjd_default_solver():
    tjd = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("quadprog")
    pytest.importorskip("qpsolvers")
    j = make_jacobian("conflicting", 5, 300, seed=4)
    ref = tjd.UPGrad()(j)  # quadprog on a Gram matrix regularised by 1e-4: close, not exact
    assert (UPGrad()(j) - ref).norm() <= 1e-3 * ref.norm()
    assert np.isfinite(ref.numpy()).all()
