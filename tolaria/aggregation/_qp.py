"""Small quadratic programs on the K x K Gram matrix, solved on its device with a fixed budget.

Two problems recur among the conflict-aware aggregators; both are QPs in K variables on G = J J^T:

- the projection onto the dual cone {d : J d >= 0} of the rows of J (UPGrad, DualProj). By
  Proposition 1 of Quinton & Rey (2024), the projection of J^T u is J^T v with
  v = argmin_{v >= u} v^T G v;
- the min-norm point of the convex hull of the rows (MGDA): w = argmin_{w >= 0, sum w = 1} w^T G w.

Both are solved by one batched primal-dual interior-point method (Mehrotra's predictor-corrector)
with a fixed number of iterations, then polished: on the active set the iterate identifies, the
optimality conditions are solved exactly, and the exact point is kept wherever it checks out (on
every non-degenerate problem, so the answer is exact to rounding there). Every step is a handful of
tensor operations on K x K matrices (one LU factorisation of G + diag(z / s); not Cholesky, whose
CPU kernel enters the thread pool even for one 8 x 8 matrix and stalls on a busy machine), with no
data-dependent control flow: a converged element of the batch is frozen by a zero step, so nothing
is read on the host and a CUDA device is never synchronised. G only needs to be positive
semi-definite: zero, duplicate or linearly dependent rows are fine.

Tolerance: an element is frozen once its mean complementarity s_i z_i falls below ``tol`` (default
1e-20) on the normalised problem. The default budget of 30 iterations is a bound, not a target:
random and degenerate problems up to K = 32 (zero, duplicate, nearly opposite and low-rank rows,
norms spread over six orders of magnitude) need at most 25 before the polish makes them exact to
about 1e-10, and the tests check the answers against scipy.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_MAX_ITERS = 30
DEFAULT_TOL = 1e-20
# Tikhonov term added to the normalised G. Where G is singular the optimal weights are not unique
# (only J^T v is), and without it the barrier pushes the iterates off to infinity along the flat
# directions; with it the problem is strictly convex and the solver returns (up to this term) the
# minimum-norm optimal weights. Its effect on J^T v is of order 1e-12 relative.
_REGULARIZATION = 1e-12


def check_solver_budget(max_iters: int, tol: float, owner: str) -> None:
    """Raises naming ``owner`` when the iteration budget or tolerance cannot work."""
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"{owner} max_iters must be a positive integer, got {max_iters!r}")
    if not (isinstance(tol, (int, float)) and 0 < float(tol) < 1):
        raise ValueError(f"{owner} tolerance must be a number in (0, 1), got {tol!r}")


def normalized_gram(gram: Tensor) -> Tensor:
    """G divided by its trace (the squared Frobenius norm of J); an all-zero G stays zero."""
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    safe = torch.where(trace > 0, trace, torch.ones_like(trace))
    return gram / safe[..., None, None]


def project_onto_dual_cone(
    gram: Tensor, u: Tensor, *, max_iters: int = DEFAULT_MAX_ITERS, tol: float = DEFAULT_TOL
) -> Tensor:
    """Weights v of the projection of J^T u onto the dual cone of the rows of J: J^T v = pi_J(J^T u).

    ``gram`` is G = J J^T (K x K); ``u`` holds one or more weight vectors (..., K). Returns v of u's
    shape, v = argmin_{v >= u} v^T G v (Quinton & Rey 2024, Proposition 1).

    The dual cone does not change when a row is scaled by a positive number, so the problem is
    solved on unit rows (G becomes the cosine matrix): gradients whose norms differ by orders of
    magnitude then condition it no worse than equal ones. A zero row constrains nothing; its weight
    is returned as given in ``u`` (it multiplies a zero gradient). The projection is positively
    homogeneous, so each u is also solved at unit scale and scaled back.
    """
    k = gram.shape[-1]
    batch_shape = u.shape[:-1]
    norms = gram.diagonal().clamp_min(0).sqrt()
    nonzero = norms > 0
    inv = torch.where(nonzero, 1 / torch.where(nonzero, norms, 1.0), 0.0)
    cosine = gram * inv[:, None] * inv[None, :]
    lower = u.reshape(-1, k) * norms
    scale = lower.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    unit = _interior_point(cosine, lower / scale, simplex=False, max_iters=max_iters, tol=tol) * scale
    v = torch.where(nonzero, unit * inv, u.reshape(-1, k))
    return v.reshape(*batch_shape, k)


def min_norm_convex_weights(
    gram: Tensor, *, max_iters: int = DEFAULT_MAX_ITERS, tol: float = DEFAULT_TOL
) -> Tensor:
    """w = argmin_{w >= 0, sum w = 1} w^T G w: the min-norm point J^T w of the rows' convex hull."""
    k = gram.shape[-1]
    lower = torch.zeros((1, k), dtype=gram.dtype, device=gram.device)
    return _interior_point(normalized_gram(gram), lower, simplex=True, max_iters=max_iters, tol=tol)[0]


def _step_to_boundary(value: Tensor, step: Tensor) -> Tensor:
    """min(1, the largest a with value + a * step >= 0), per batch row (B x 1); value > 0."""
    return (-step / value).amax(dim=-1, keepdim=True).clamp(min=1.0).reciprocal()


def _interior_point(h: Tensor, lower: Tensor, *, simplex: bool, max_iters: int, tol: float) -> Tensor:
    """Solves min 1/2 x^T H x s.t. x >= lower (and sum x = 1 if ``simplex``) for each row of ``lower``.

    Primal-dual path following with Mehrotra's predictor-corrector, on the slack s = x - lower and
    the multipliers z >= 0 of the bounds (nu for the equality). H is K x K positive semi-definite,
    scaled to O(1) entries; ``lower`` is B x K. The loop is written for few tensor operations: on
    K x K problems each one costs its dispatch, not its arithmetic.
    """
    b, k = lower.shape
    dtype, device = h.dtype, h.device
    h = h + _REGULARIZATION * torch.eye(k, dtype=dtype, device=device)
    s = torch.full((b, k), 1.0 / k if simplex else 1.0, dtype=dtype, device=device)
    x = lower + s
    z = torch.ones((b, k), dtype=dtype, device=device)
    nu = torch.zeros((b, 1), dtype=dtype, device=device)
    ones = torch.ones((b, k, 1), dtype=dtype, device=device)
    block_mask = torch.eye(b, dtype=dtype, device=device)[:, None, :, None]  # B x 1 x B x 1

    for _ in range(max_iters):
        # The Newton system for (dx, dnu) once dz = (t - z dx) / s is eliminated, for a target t of
        # the complementarity s z: (H + diag(z / s)) dx - dnu 1 = nu 1 - H x + t / s (the stationarity
        # residual H x - z - nu 1 with z moved into t / s), and 1^T dx = 1 - 1^T x.
        grad = nu - x @ h
        sz = s * z
        mu = sz.mean(dim=-1, keepdim=True)
        # The B systems as one block-diagonal matrix: one LAPACK call, where a batch of B would
        # loop over a thread pool (and stall on a busy CPU).
        blocks = torch.diag_embed(z / s) + h
        lu, pivots, _ = torch.linalg.lu_factor_ex((blocks.unsqueeze(2) * block_mask).reshape(b * k, b * k))
        if simplex:
            gap = 1 - x.sum(dim=-1, keepdim=True)
            base = torch.linalg.lu_solve(lu, pivots, ones.reshape(b * k, 1)).reshape(b, k, 1)  # M^-1 1
            base_sum = base.sum(dim=1)

        def solve(rhs: Tensor) -> tuple[Tensor, Tensor]:
            a = torch.linalg.lu_solve(lu, pivots, rhs.reshape(b * k, 1)).reshape(b, k)
            if not simplex:
                return a, nu
            d_nu = (gap - a.sum(dim=-1, keepdim=True)) / base_sum
            return torch.addcmul(a, d_nu, base.squeeze(-1)), d_nu

        # Predictor: the affine-scaling direction (target s z = 0).
        dx_aff, _ = solve(grad)
        dz_aff = -torch.addcmul(z, z / s, dx_aff)
        a_aff = torch.minimum(_step_to_boundary(s, dx_aff), _step_to_boundary(z, dz_aff))
        mu_aff = ((s + a_aff * dx_aff) * (z + a_aff * dz_aff)).mean(dim=-1, keepdim=True)
        sigma = (mu_aff / mu).clamp(0, 1) ** 3
        # Corrector: centring plus the second-order term of the complementarity.
        target = sigma * mu - sz - dx_aff * dz_aff
        dx, d_nu = solve(grad + z + target / s)
        dz = (target - z * dx) / s
        # The step fraction tends to 1 as mu falls (a fast end game); a row with mu <= tol is frozen.
        fraction = 1 - mu.clamp(1e-8, 1e-2)
        step = fraction * torch.minimum(_step_to_boundary(s, dx), _step_to_boundary(z, dz)) * (mu > tol)
        move = step * dx
        x = x + move
        s = s + move
        z = torch.addcmul(z, step, dz)
        if simplex:
            nu = torch.addcmul(nu, step, d_nu)
    return _polish(h, lower, x, s, z, simplex=simplex)


def _active_set_guesses(s: Tensor, z: Tensor) -> Tensor:
    """Two guesses (2 x B x K, True = bound active) of the active set from the final iterate.

    The classical one, s < z; and a split at the largest gap of log(s / z), which still separates
    the bounds when the problem is degenerate (s and z both tending to 0, e.g. a zero gradient).
    """
    ratio = s.log() - z.log()
    ordered, _ = ratio.sort(dim=-1)
    if ratio.shape[-1] > 1:
        gaps = ordered.diff(dim=-1)
        cut = gaps.argmax(dim=-1, keepdim=True)
        threshold = (ordered.gather(-1, cut) + ordered.gather(-1, cut + 1)) / 2
    else:
        threshold = torch.zeros_like(ratio)
    return torch.stack((s < z, ratio < threshold))


def _polish(h: Tensor, lower: Tensor, x: Tensor, s: Tensor, z: Tensor, *, simplex: bool) -> Tensor:
    """The exact solution on the active set the interior point identified, where it is optimal.

    For each guess of the active set A (bounds with x = lower), the stationarity equations are
    solved exactly on the other variables. A polished point replaces the interior-point one only
    where it satisfies the optimality (Karush-Kuhn-Tucker) conditions, the first guess first, so
    a wrong guess costs nothing.
    """
    k = lower.shape[-1]
    active = _active_set_guesses(s, z)  # 2 x B x K
    inactive = ~active
    lower2 = lower.expand_as(active)
    pair = inactive.unsqueeze(-1) & inactive.unsqueeze(-2)
    # [[H_II, 0], [0, I]]: positive definite, one factorisation per guess and row.
    matrix = torch.where(pair, h, 0.0) + torch.where(active, 1.0, 0.0).diag_embed()
    fixed = torch.where(active, lower2, 0.0)
    rhs = torch.where(active, lower2, -(fixed @ h))
    lu, pivots, info = torch.linalg.lu_factor_ex(matrix)
    if simplex:
        free = torch.where(inactive, 1.0, 0.0)
        both = torch.linalg.lu_solve(lu, pivots, torch.stack((rhs, free), dim=-1))
        a, c = both[..., 0], both[..., 1]
        denom = c.sum(-1, keepdim=True)
        nu = (1 - a.sum(-1, keepdim=True)) / torch.where(denom != 0, denom, 1.0)
        exact = a + nu * c
        multipliers = exact @ h - nu
    else:
        exact = torch.linalg.lu_solve(lu, pivots, rhs.unsqueeze(-1)).squeeze(-1)
        multipliers = exact @ h
    # Optimal when x >= lower and the multipliers of the active bounds, (H x)_A - nu, are >= 0
    # (those of the inactive ones are 0 by construction).
    slack = 1e-12 * (1 + lower2.abs().amax(dim=-1, keepdim=True))
    optimal = ((exact >= lower2 - slack) & (inactive | (multipliers >= -slack))).all(-1)
    if simplex:
        optimal = optimal & ((exact.sum(-1) - 1).abs() <= 1e-12)
    optimal = optimal & (info == 0) & torch.isfinite(exact).all(-1)
    first, second = optimal.unsqueeze(-1).unbind(0)
    return torch.where(first, exact[0], torch.where(second, exact[1], x))
