"""The defining properties of aggregators, as assertions (one function per property).

Every tolerance is relative to the problem's own scale (the largest gradient norm), so one
assertion serves inputs from 1e-7 to 1e10; ``TOL`` holds the per-dtype factor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "ROUNDING",
    "TOL",
    "WEIGHT_NOISE",
    "assert_dual_cone_kkt",
    "assert_expected_structure",
    "assert_linear_under_scaling",
    "assert_min_norm_kkt",
    "assert_non_conflicting",
    "assert_nonzero_unless_strongly_stationary",
    "assert_permutation_invariant",
    "assert_zero",
]

Aggregate = Callable[[Tensor], Tensor]

# Relative tolerances per dtype: a few roundings of the inputs, times the conditioning a property
# can amplify (float32: 2^-23 ~ 1.2e-7).
TOL = {torch.float64: 1e-9, torch.float32: 2e-4}
# One rounding of the result to the dtype, with room for the sums of the test's own check.
ROUNDING = {torch.float64: 1e-13, torch.float32: 1e-6}
# The weights are solved in float64 from the Gram matrix, which the backends accumulate from the
# dtype's values in float32 lanes for 16/32-bit inputs: the aggregate can then point off the dual
# cone by about this fraction of the largest gradient (in float64: the solver's own rounding).
# The failures this suite exists for were 2% to 50%.
WEIGHT_NOISE = {torch.float64: 1e-9, torch.float32: 1e-4}


def _scale(matrix: Tensor) -> float:
    return float(matrix.to(torch.float64).norm(dim=1).max()) if matrix.numel() else 0.0


def assert_expected_structure(aggregate: Aggregate, matrix: Tensor) -> Tensor:
    out = aggregate(matrix)
    assert out.shape == matrix.shape[1:] and out.dtype == matrix.dtype and out.device == matrix.device
    assert torch.isfinite(out).all(), "the aggregate holds NaN or inf for finite inputs"
    return out


def assert_non_conflicting(aggregate: Aggregate, matrix: Tensor) -> None:
    """J d >= 0: the aggregate conflicts with no source, to one rounding of d to the dtype (times
    |g_i| |d|) and the float64 noise of the weights (times |g_i| and the largest |g_j|)."""
    d = aggregate(matrix).to(torch.float64)
    j = matrix.to(torch.float64)
    products = j @ d
    bound = j.norm(dim=1) * (ROUNDING[matrix.dtype] * d.norm() + WEIGHT_NOISE[matrix.dtype] * _scale(matrix))
    worst = (-products - bound).max().item() if products.numel() else 0.0
    assert worst <= 0, f"conflicts with a source: min (J d)_i = {products.min().item():.3g}, |d| = {d.norm():.3g}"


def assert_permutation_invariant(aggregate: Aggregate, matrix: Tensor, permutations: int = 3) -> None:
    out = aggregate(matrix).to(torch.float64)
    gen = torch.Generator().manual_seed(matrix.shape[0] * 31 + matrix.shape[1])
    tol = TOL[matrix.dtype] * max(_scale(matrix), 1e-300) * matrix.shape[0]
    for _ in range(permutations):
        order = torch.randperm(matrix.shape[0], generator=gen)
        permuted = aggregate(matrix[order]).to(torch.float64)
        gap = (permuted - out).abs().max().item() if out.numel() else 0.0
        assert gap <= tol, f"permuting the rows moved the aggregate by {gap:.3g} (scale {_scale(matrix):.3g})"


def assert_linear_under_scaling(aggregate: Aggregate, matrix: Tensor) -> None:
    """A(diag(a c1 + b c2) J) = a A(diag(c1) J) + b A(diag(c2) J) for positive c1, c2, a, b."""
    gen = torch.Generator().manual_seed(matrix.shape[0] + 7)
    k = matrix.shape[0]
    c1, c2 = (torch.rand(k, generator=gen, dtype=torch.float64) + 0.1 for _ in range(2))
    a, b = 0.7, 1.3

    def scaled(c: Tensor) -> Tensor:
        return aggregate((c[:, None] * matrix.to(torch.float64)).to(matrix.dtype)).to(torch.float64)

    expected = a * scaled(c1) + b * scaled(c2)
    gap = (scaled(a * c1 + b * c2) - expected).abs().max().item() if expected.numel() else 0.0
    tol = TOL[matrix.dtype] * max(_scale(matrix), 1e-300) * k * 10
    assert gap <= tol, f"not linear under scaling: off by {gap:.3g} (scale {_scale(matrix):.3g})"


def assert_zero(aggregate: Aggregate, matrix: Tensor) -> None:
    """The aggregate vanishes (on strongly stationary inputs: no direction improves every source)."""
    out = aggregate(matrix).to(torch.float64)
    tol = TOL[matrix.dtype] * max(_scale(matrix), 1e-300) * matrix.shape[0] * 10
    assert out.norm().item() <= tol, f"|A(J)| = {out.norm().item():.3g} on a strongly stationary J"


def assert_nonzero_unless_strongly_stationary(aggregate: Aggregate, matrix: Tensor) -> None:
    """Strong stationarity: A(J) = 0 only if J is strongly stationary, so on the others |A(J)| > 0."""
    out = aggregate(matrix).to(torch.float64)
    assert out.norm().item() > 1e-3 * _scale(matrix), f"|A(J)| = {out.norm().item():.3g} on a non-stationary J"


def assert_dual_cone_kkt(weights: Tensor, gram: Tensor, lower: Tensor, dtype: torch.dtype) -> None:
    """v = argmin_{v >= lower} v^T G v: v >= lower, G v >= 0, and (G v)_i = 0 where v_i > lower_i."""
    v, g, u = weights.to(torch.float64), gram.to(torch.float64), lower.to(torch.float64)
    scale = g.diagonal().clamp_min(0).sqrt()
    gv = g @ v
    tol = TOL[dtype] * (1 + v.abs().max().item())
    norm_v = (v.abs() * scale).sum() + 1e-300
    assert (v - u >= -tol * (1 + u.abs())).all(), f"bound violated: min v - lower = {(v - u).min().item():.3g}"
    assert (gv >= -tol * scale * norm_v).all(), f"dual infeasible: min G v = {gv.min().item():.3g}"
    slack = ((v - u).clamp_min(0) * gv.clamp_min(0)).max().item()
    assert slack <= tol * (scale.max() * norm_v * (1 + v.abs().max())).item(), f"complementarity: {slack:.3g}"


def assert_min_norm_kkt(weights: Tensor, gram: Tensor, dtype: torch.dtype) -> None:
    """w = argmin_{w >= 0, sum w = 1} w^T G w: (G w)_i >= w^T G w, with equality where w_i > 0."""
    w, g = weights.to(torch.float64), gram.to(torch.float64)
    assert (w >= -TOL[dtype]).all() and abs(w.sum().item() - 1) <= TOL[dtype] * w.numel()
    gw = g @ w
    value = w @ gw
    tol = TOL[dtype] * g.diagonal().max().clamp_min(1e-300).item() * 10
    assert (gw >= value - tol).all(), f"KKT: min (G w)_i = {gw.min().item():.6g} < w'Gw = {value.item():.6g}"
    on_support = w > 1e-6
    assert ((gw - value).abs()[on_support] <= tol).all(), "KKT: (G w)_i != w'Gw on the support"
