"""Canonical solutions of the Gram-space QPs: among all optimal weights, the minimum-norm one.

Where G is singular (more sources than independent directions, duplicate or dependent gradients),
the QPs of :mod:`tolaria.aggregation._qp` have many optimal weight vectors, all giving the same
aggregate J^T v. Picking any of them made the weights depend on the order of the rows, and could
pick an enormous one whose terms cancel. Here the weights are the minimum-norm optimum: unique,
permutation-equivariant, and bounded by the geometry of G. The norm is the one of the problem's
unit-scale coordinates: for the dual-cone projections (solved on unit rows) the least
sum_i v_i^2 |g_i|^2, the squared norms of the contributions v_i g_i, which does not depend on how
each gradient is scaled; for MGDA (solved on G / trace G) the least sum_i w_i^2.

How: the minimum-norm optimum is the limit of the Tikhonov-regularised problem (G + eps I) as eps
falls to 0, and for small eps it has the same support. So the candidates of every support are
scored on G + ``TIKHONOV`` I, where the optimum is unique; on the support of the best one, the
system of the unregularised G is solved in the least-squares minimum-norm sense (an eigen-
decomposition, eigenvalues below ``PINV_RCOND`` of the largest treated as zero): on a support of
dependent rows that is exactly the minimum-norm optimum. It is kept where it meets the optimality
conditions of the exact problem to ``ACCEPT_TOL``; elsewhere (a degenerate support) the exact
solution of the unregularised enumeration is returned, as before. No host reads, no branches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._qp import (
    ACCEPT_TOL,
    DEFAULT_MAX_ITERS,
    DEFAULT_TOL,
    ENUMERATION_MAX_K,
    Supports,
    _box_candidates,
    _simplex_candidates,
    every_support,
    interior_point,
    kkt_violation,
    normalized_gram,
    pick_best,
    supports_from,
    supports_near,
    times,
)

__all__ = [
    "PINV_RCOND",
    "TIKHONOV",
    "min_norm_convex_weights",
    "project_each_onto_dual_cone",
    "project_onto_dual_cone",
]

# Added to the unit-scale matrix to score the candidates: the regularised optimum is unique and has
# the minimum-norm optimum's support, as long as eps stays below the problem's own scale of detail.
TIKHONOV = 1e-9
# Eigenvalues of a support's system below this fraction of its largest one are rounding: the rows
# are dependent there, and the minimum-norm solution gives that direction no weight.
PINV_RCOND = 1e-11


def _chosen_support(supports: Supports, scores: Tensor) -> Tensor:
    """The support (B x K bool) of each problem's best candidate."""
    best = scores.argmin(dim=-1)  # B
    if supports.free.dim() == 2:  # shared by every problem
        return supports.free[best]
    return supports.free.take_along_dim(best[:, None, None], dim=-2).squeeze(-2)


def _pinv_solve(matrix: Tensor, rhs: Tensor) -> Tensor:
    """The minimum-norm least-squares solution of matrix x = rhs (B x K x K symmetric PSD, B x K)."""
    values, vectors = torch.linalg.eigh(matrix)
    cutoff = PINV_RCOND * values.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(values > cutoff, 1 / torch.where(values > cutoff, values, 1.0), 0.0)
    coefficients = (vectors.mT @ rhs.unsqueeze(-1)).squeeze(-1) * inverse
    return (vectors @ coefficients.unsqueeze(-1)).squeeze(-1)


def _min_norm_box(h: Tensor, lower: Tensor, free: Tensor) -> Tensor:
    """argmin |v| over the solutions of H_FF v_F = -H_FA lower_A, v_A = lower_A (B x K)."""
    pair = free.unsqueeze(-1) & free.unsqueeze(-2)
    fixed = torch.where(free, 0.0, lower)
    rhs = torch.where(free, -times(fixed, h), 0.0)
    v = _pinv_solve(torch.where(pair, h, 0.0), rhs)
    return torch.where(free, v, lower)


def _where_accepted(accept: Tensor, refined: Tensor, exact: Callable[[], Tensor]) -> Tensor:
    """``refined`` where accepted, else ``exact()``. On the CPU the exact solve runs only when some
    refinement was rejected (rare: a degenerate support); on an accelerator it always runs, so that
    no value is read back to the host."""
    if refined.device.type == "cpu" and not torch.compiler.is_compiling() and bool(accept.all()):
        return refined
    return torch.where(accept, refined, exact())


def canonical_box(
    h: Tensor, lower: Tensor, supports: Supports, *, diagonal: bool, exact: Callable[[], Tensor]
) -> Tensor:
    """The minimum-norm minimiser of v^T H v over v >= lower (B x K), or ``exact()`` where the
    refinement does not meet the optimality conditions (see the module docstring)."""
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    _, scores = _box_candidates(h + TIKHONOV * eye, lower, supports, diagonal=diagonal)
    free = _chosen_support(supports, scores)
    refined = _min_norm_box(h, lower, free)
    violation = kkt_violation(free, lower - refined, times(refined, h))
    accept = violation <= ACCEPT_TOL * refined.abs().amax(dim=-1).clamp_min(1)
    # A variable of the support whose optimum sits on its bound comes out a rounding below it:
    # put it back (within the tolerance just accepted), so that v >= lower holds exactly.
    return _where_accepted(accept.unsqueeze(-1), torch.maximum(refined, lower), exact)


def canonical_simplex(h: Tensor, supports: Supports, *, exact: Callable[[], Tensor]) -> Tensor:
    """The minimum-norm minimiser of w^T H w on the simplex (K), or ``exact()`` where the refinement
    does not meet the optimality conditions."""
    k = h.shape[-1]
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    _, scores = _simplex_candidates(h + TIKHONOV * h.diagonal().amax().clamp_min(1e-300) * eye, supports)
    free = _chosen_support(supports, scores.unsqueeze(0))[0]
    # On S: (H + a 1 1^T)_SS z = 1 and w = z / sum z (see _qp.simplex_solve); every solution z has
    # the same sum, so the minimum-norm z gives the minimum-norm w.
    scale = torch.where(free, h.diagonal(), 0.0).amax().clamp_min(0)
    scale = torch.where(scale > 0, scale, 1.0)
    pair = free.unsqueeze(-1) & free.unsqueeze(-2)
    z = _pinv_solve(torch.where(pair, h + scale, 0.0).unsqueeze(0), free.to(h.dtype).unsqueeze(0))[0]
    total = z.sum()
    w = z / torch.where(total != 0, total, 1.0)
    hw = times(w, h)
    violation = kkt_violation(free, -w, hw - (w * hw).sum())
    accept = (violation <= ACCEPT_TOL) & (total != 0)
    # As in canonical_box: a weight a rounding below 0 goes back to 0, and the sum back to 1.
    w = w.clamp_min(0)
    w = w / torch.where(w.sum() > 0, w.sum(), 1.0)
    return _where_accepted(accept, w, exact)


def project_each_onto_dual_cone(
    gram: Tensor,
    weights: Tensor,
    *,
    max_iters: int = DEFAULT_MAX_ITERS,
    tol: float = DEFAULT_TOL,
    reg_eps: float = 0.0,
    norm_eps: float = 0.0,
) -> Tensor:
    """:func:`project_onto_dual_cone` of the K vectors u_i = weights_i e_i (row i of the result):
    the projection of each weighted gradient, as UPGrad needs, with the diagonal u exploited."""
    return project_onto_dual_cone(
        gram, torch.diag(weights), max_iters=max_iters, tol=tol, diagonal=True, reg_eps=reg_eps, norm_eps=norm_eps
    )


def project_onto_dual_cone(
    gram: Tensor,
    u: Tensor,
    *,
    max_iters: int = DEFAULT_MAX_ITERS,
    tol: float = DEFAULT_TOL,
    diagonal: bool = False,
    reg_eps: float = 0.0,
    norm_eps: float = 0.0,
) -> Tensor:
    """Weights v of the projection of J^T u onto the dual cone of the rows of J: J^T v = pi_J(J^T u).

    ``gram`` is G = J J^T (K x K); ``u`` holds one or more weight vectors (..., K). Returns v of u's
    shape: the minimum-norm v among the minimisers of v^T G v over v >= u (Quinton & Rey 2024,
    Proposition 1). ``max_iters`` and ``tol`` bound the interior point, used only beyond
    ``ENUMERATION_MAX_K`` sources. ``diagonal`` says that u is a K x K diagonal matrix (see
    :func:`project_each_onto_dual_cone`).

    ``reg_eps`` and ``norm_eps`` have TorchJD's meaning: v minimises v^T H v over v >= u with
    H = G / trace(G) + reg_eps I (G / trace(G) taken as 0 where trace(G) < norm_eps). Both 0 (the
    default) is the exact projection; TorchJD's defaults (1e-4 each) reproduce its values.

    The exact projection's dual cone does not change when a row is scaled by a positive number, so
    it is solved on unit rows (G becomes the cosine matrix): gradients whose norms differ by orders
    of magnitude then condition it no worse than equal ones. A zero row constrains nothing; its
    weight is returned as given in ``u`` (it multiplies a zero gradient). The projection is
    positively homogeneous, so each u is also solved at unit scale and scaled back.
    """
    k = gram.shape[-1]
    batch_shape = u.shape[:-1]
    if reg_eps > 0 or norm_eps > 0:
        trace = gram.diagonal().sum()
        h = torch.where(trace >= norm_eps, gram / torch.where(trace > 0, trace, 1.0), 0.0)
        h = h + reg_eps * torch.eye(k, dtype=gram.dtype, device=gram.device)
        lower, scale = _unit_scale(u.reshape(-1, k))
        v = _solve_box(h, lower, diagonal=diagonal, max_iters=max_iters, tol=tol) * scale
        return v.reshape(*batch_shape, k)
    norms = gram.diagonal().clamp_min(0).sqrt()
    nonzero = norms > 0
    inv = torch.where(nonzero, 1 / torch.where(nonzero, norms, 1.0), 0.0)
    cosine = gram * inv[:, None] * inv[None, :]
    lower, scale = _unit_scale(u.reshape(-1, k) * norms)
    unit = _solve_box(cosine, lower, diagonal=diagonal, max_iters=max_iters, tol=tol)
    v = torch.where(nonzero, unit * scale * inv, u.reshape(-1, k))
    return v.reshape(*batch_shape, k)


def _unit_scale(lower: Tensor) -> tuple[Tensor, Tensor]:
    """Each row of ``lower`` divided by its largest magnitude (1 for a zero row), and that scale:
    the box problem is positively homogeneous in its bound."""
    scale = lower.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return lower / scale, scale


def _solve_box(h: Tensor, lower: Tensor, *, diagonal: bool, max_iters: int, tol: float) -> Tensor:
    """The minimum-norm minimiser of v^T H v over v >= lower (B x K) for a unit-scale H."""
    k = h.shape[-1]
    if k <= ENUMERATION_MAX_K:
        supports = every_support(k, h.device, nonempty=False)

        def exact() -> Tensor:
            return pick_best(*_box_candidates(h, lower, supports, diagonal=diagonal))[0]

    else:
        # Converging to the Tikhonov-regularised optimum (unique) puts the candidates around the
        # minimum-norm optimum's support.
        x, s, z = interior_point(h, lower, simplex=False, max_iters=max_iters, tol=tol, regularization=TIKHONOV)
        supports = supports_from(supports_near(s, z))
        diagonal = False  # the supports are per problem

        def exact() -> Tensor:
            best, score = pick_best(*_box_candidates(h, lower, supports))
            accept = score <= ACCEPT_TOL * best.abs().amax(dim=-1).clamp_min(1)  # the scores scale with v
            return torch.where(accept.unsqueeze(-1), best, x)

    return canonical_box(h, lower, supports, diagonal=diagonal, exact=exact)


def min_norm_convex_weights(gram: Tensor, *, max_iters: int = DEFAULT_MAX_ITERS, tol: float = DEFAULT_TOL) -> Tensor:
    """w = argmin_{w >= 0, sum w = 1} w^T G w: the min-norm point J^T w of the rows' convex hull;
    among optimal w, the one of minimum norm.

    ``max_iters`` and ``tol`` bound the interior point, used only beyond ``ENUMERATION_MAX_K``.
    """
    k = gram.shape[-1]
    h = normalized_gram(gram)
    if k <= ENUMERATION_MAX_K:
        # Every non-empty support (the empty one has no point of the simplex).
        supports = every_support(k, gram.device, nonempty=True)

        def exact() -> Tensor:
            return pick_best(*_simplex_candidates(h, supports))[0]

    else:
        lower = torch.zeros((1, k), dtype=gram.dtype, device=gram.device)
        x, s, z = interior_point(h, lower, simplex=True, max_iters=max_iters, tol=tol)
        supports = supports_from(supports_near(s, z)[0])

        def exact() -> Tensor:
            best, score = pick_best(*_simplex_candidates(h, supports))
            return torch.where(score <= ACCEPT_TOL, best, x[0])

    return canonical_simplex(h, supports, exact=exact)
