"""Aligned-MTL against Algorithm 1 of Senushkin et al. (2023), as TorchJD defines it."""

import numpy as np
import pytest
import torch

from tolaria.aggregation import AlignedMTL

from .conflict_cases import cases, make_jacobian


def aligned_mtl_reference(j: torch.Tensor, pref=None, scale_mode: str = "min") -> torch.Tensor:
    """Plainly in numpy: B = sqrt(lambda_scale) V_r diag(lambda_r)^-1/2 V_r^T, d = J^T B p."""
    g = (j @ j.T).numpy()
    k = g.shape[0]
    pref = np.full(k, 1.0 / k) if pref is None else np.asarray(pref, dtype=np.float64)
    lam, vec = np.linalg.eigh(g)
    keep = lam > lam.max() * k * np.finfo(np.float64).eps
    if not keep.any():
        return j.T @ torch.from_numpy(pref)
    lam_r, vec_r = lam[keep], vec[:, keep]
    scale = {"min": lam_r.min(), "median": np.sort(lam_r)[(len(lam_r) - 1) // 2], "rmse": lam_r.mean()}[scale_mode]
    balance = np.sqrt(scale) * vec_r @ np.diag(1 / np.sqrt(lam_r)) @ vec_r.T
    return j.T @ torch.from_numpy(balance @ pref)


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("kind,k,n", cases(kinds=("random", "conflicting", "duplicate", "zero_row", "scaled")))
def test_matches_the_reference(kind, k, n, scale_mode):
    j = make_jacobian(kind, k, n, seed=51)
    d = AlignedMTL(scale_mode=scale_mode)(j)
    ref = aligned_mtl_reference(j, scale_mode=scale_mode)
    assert (d - ref).norm() <= 1e-9 * ref.norm()


def test_full_rank_gradients_are_aligned():
    # With full rank and scale "min", B G B = lambda_min I: the transformed gradients J^T B are
    # orthogonal with equal norms (condition number 1), the point of the method.
    j = make_jacobian("conflicting", 4, 50, seed=52)
    g = j @ j.T
    _, stats = AlignedMTL()(j, return_stats=True)
    balance = stats.weights[:, None]  # B p; rebuild B from the definition to test B G B
    lam, vec = torch.linalg.eigh(g)
    b = lam.min().sqrt() * vec @ torch.diag(lam.rsqrt()) @ vec.T
    torch.testing.assert_close(b @ g @ b, lam.min() * torch.eye(4, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(balance[:, 0], b @ torch.full((4,), 0.25, dtype=torch.float64))


def test_pref_vector():
    j = make_jacobian("random", 3, 30, seed=53)
    pref = [0.5, 0.3, 0.2]
    assert (AlignedMTL(pref_vector=pref)(j) - aligned_mtl_reference(j, pref)).norm() <= 1e-9 * j.norm()


def test_agrees_with_torchjd():
    tjd = pytest.importorskip("torchjd.aggregation")
    for kind in ("random", "conflicting", "duplicate", "zero_row"):
        for mode in ("min", "median", "rmse"):
            j = make_jacobian(kind, 5, 60, seed=54)
            ref = tjd.AlignedMTL(scale_mode=mode)(j)
            assert (AlignedMTL(scale_mode=mode)(j) - ref).norm() <= 1e-9 * ref.norm()
