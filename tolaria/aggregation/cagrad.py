"""CAGrad (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning"), in Gram space.

CAGrad looks for the direction d that maximises the worst improvement min_i g_i . d within a ball
around the mean gradient g0, ||d - g0|| <= c ||g0||. Its dual (Algorithm 1 of the paper) is a
problem in the K weights alone:

    w = argmin_{w >= 0, sum w = 1}  g_w . g0 + c ||g0|| ||g_w||,    g_w = J^T w,

and then d = g0 + (c ||g0|| / ||g_w||) g_w, i.e. the weights 1/K + (c ||g0|| / ||g_w||) w. As in
TorchJD's CAGrad, the result is the paper's d without the optional 1/(1 + c^2) rescaling of the
authors' code, and it is zero when ||g_w|| falls below ``norm_eps`` (on G scaled to unit trace): the
sources are then Pareto-stationary and no conflict-averse direction exists. A ball of radius 0
(c = 0, or g0 = 0) leaves only d = g0: the weights are then 1/K.

Every quantity is a function of G: with b = G 1/K (b_i = g_i . g0) and r = c ||g0||, the objective
is f(w) = b^T w + r sqrt(w^T G w). It is convex, and on a given support S (the w_i > 0) its
stationary point is in closed form: the conditions b_S + (r / ||g_w||) (G w)_S = nu 1 and
sum w = 1 make w_S = x + lam y affine in lam = ||g_w|| / r, where [[G_SS, 1], [1^T, 0]] gives
x (the min-norm point of the face) and y (1^T y = 0, so x^T G y = 0), and ||g_w|| = r lam is then
lam^2 = x^T G x / (r^2 - y^T G y). So the machinery of :mod:`tolaria.aggregation._qp` applies: up
to ``ENUMERATION_MAX_K`` sources every support is a candidate, solved as one batch, and the one
that best satisfies the optimality conditions of the whole problem (w >= 0; the gradient
b + r G w / ||g_w|| equal to nu on S and at least nu off it) is the answer, exact to rounding on
every input (K > N, rank-deficient G, nearly opposite gradients, zero or duplicate rows). When no
candidate satisfies them, the optimum sits where g_w = 0 (no smooth stationary point exists):
the sources are Pareto-stationary and the result is zero.

Beyond ``ENUMERATION_MAX_K`` sources the optimum is found through the quadratic programs it also
solves (see ``_search``): two batches of eight, each by the interior point of ``_qp`` with a fixed
budget of ``newton_steps`` iterations, locate the optimal support, whose candidates are scored as
above. No step reads a value on the host.

Resolution: ||g_w|| is a square root of a combination of G's entries, so optima with ||g_w|| below
about 1e-6 (on G scaled to unit trace) are not resolved exactly, and below ``NORM_FLOOR`` (1e-7)
they count as g_w = 0. The default ``norm_eps`` (1e-4) sends all of them to zero anyway.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ._gramian import conflicting_pairs, solve_if_finite
from ._qp import (
    ACCEPT_TOL,
    DEFAULT_TOL,
    ENUMERATION_MAX_K,
    Supports,
    every_support,
    interior_point,
    kkt_violation,
    normalized_gram,
    pick_best,
    simplex_solve,
    supports_from,
    supports_near,
    times,
)
from .aggregator import Aggregator
from .engine import Weights

__all__ = ["DEFAULT_NEWTON_STEPS", "STATIONARY_TOL", "NORM_FLOOR", "cagrad_weights", "CAGrad"]

DEFAULT_NEWTON_STEPS = 30
# Beyond this violation of the optimality conditions (on G scaled to unit trace, where they are
# O(1)) no candidate is a smooth optimum: the optimum is at g_w = 0.
STATIONARY_TOL = 1e-7
# Beyond enumeration: the points of each grid of s (each point one quadratic program, the grid one
# batch), and the uncertain variables near each solution whose every value is a candidate.
_GRID_POINTS = 8
_PARAMETRIC_BITS = 4
# ||g_w|| (on G scaled to unit trace) below which the Gram matrix does not resolve it (its square
# is at the rounding level of G's entries): the optimum counts as g_w = 0, the result as zero.
NORM_FLOOR = 1e-7


class _Faces(NamedTuple):
    """The two solutions that every stationary point on a support S is made of (see the module).

    x minimises w^T G w and y minimises 1/2 y^T G y + b^T y on S, with sum x = 1 and sum y = 0 (both
    zero off S): G x = -p 1 and G y = -q 1 - b on S, so x^T G y = 0, x^T G x = -p and
    y^T G y = -b^T y.
    """

    free: Tensor  # S x K
    x: Tensor  # S x K
    y: Tensor  # S x K
    p: Tensor  # S
    q: Tensor  # S


def _faces(g: Tensor, b: Tensor, supports: Supports) -> _Faces:
    """x, y, p and q (see :class:`_Faces`) of every support, from one batch of solves.

    With M = (G + a 1 1^T)_SS (:func:`~tolaria.aggregation._qp.simplex_solve`), M z = 1 and
    M u = b give x = z / sum z, p = a - 1 / sum z, and y = -u - q z with q = -sum u / sum z.
    Irregular supports (dependent gradients) get NaN, which their scores turn into inf.
    """
    solution, scale, regular = simplex_solve(g, torch.stack((torch.ones_like(b), b), dim=-1), supports)
    solution = torch.where(regular.reshape(-1, 1, 1), solution, torch.nan)
    z, u = solution[..., 0], solution[..., 1]
    z_sum = z.sum(-1)
    q = -u.sum(-1) / z_sum
    x, y = z / z_sum.unsqueeze(-1), -torch.addcmul(u, q.unsqueeze(-1), z)
    return _Faces(supports.free, x, y, scale.squeeze(-1) - 1 / z_sum, q)


def _sqrt(x: Tensor) -> Tensor:
    """sqrt(x) as 1 / rsqrt(x) (0 at 0, NaN below): torch's CPU sqrt of a few hundred values goes
    through MKL's vector library, which enters the thread pool (see ``_qp.SERIAL_ELEMENTS``)."""
    return x.rsqrt().reciprocal()


def _candidates(g: Tensor, b: Tensor, radius: Tensor, faces: _Faces) -> tuple[Tensor, Tensor]:
    """The stationary point of f on each support and its optimality score (see the module).

    Returns the weights (S x K) and the worst violation of the optimality conditions (S), inf where
    the support has no stationary point with g_w != 0 or the solve failed.
    """
    x, y, p, q = faces.x, faces.y, faces.p, faces.q
    denom = radius * radius + (y * b).sum(-1)  # r^2 - y^T G y
    valid = (denom > 0) & (p < 0)  # x^T G x = -p > 0
    lam = _sqrt(-p / denom)
    w = torch.addcmul(x, lam.unsqueeze(-1), y)
    # The gradient b + r G w / ||g_w|| minus nu = -(p / lam + q), from w itself: where the solve
    # is inexact (nearly dependent rows on S) the identities fail and this shows it.
    gw = times(w, g)
    norm = _sqrt((gw * w).sum(-1, keepdim=True))
    diff = b + radius * gw / norm + (p / lam + q).unsqueeze(-1)
    return w, torch.where(valid, kkt_violation(faces.free, -w, diff), torch.inf)


def _qp_solutions(g: Tensor, b: Tensor, faces: _Faces, s: Tensor, approx: Tensor) -> Tensor:
    """The minimiser of QP(s_j) = 1/2 w^T G w + s_j b^T w on the simplex for each s_j (B): the best of
    problem j's share of the supports (B S_j in all, in order; w = x + s_j y on S) where it satisfies
    the optimality conditions, else the interior-point iterate ``approx`` (B x K)."""
    count, k = s.shape[0], g.shape[-1]
    shape = (count, -1, k)
    scale = s.reshape(count, 1, 1)
    w = faces.x.reshape(shape) + scale * faces.y.reshape(shape)
    diff = times(w, g) + scale * b + (faces.p.reshape(count, -1, 1) + scale * faces.q.reshape(count, -1, 1))
    best, score = pick_best(w, kkt_violation(faces.free.reshape(shape), -w, diff))
    return torch.where((score <= ACCEPT_TOL * (1 + s)).unsqueeze(-1), best, approx)


def _parametric_solve(
    g: Tensor, b: Tensor, radius: Tensor, s: Tensor, steps: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Solves QP(s) for a batch of s (see ``_search``) and forms the candidates near their supports.

    Returns the QP solutions w(s) (B x K), phi(s) = ||g_w(s)|| - r s (B), and the CAGrad
    candidates (B S x K) with their scores.
    """
    k = g.shape[-1]
    # min 1/2 w^T G w + s b^T w, divided by 1 + s to keep the entries O(1) for the solver.
    scale = (1 / (1 + s)).unsqueeze(-1)
    lower = torch.zeros((s.shape[0], k), dtype=g.dtype, device=g.device)
    linear = (s.unsqueeze(-1) * scale) * b
    approx, slack, z = interior_point(
        g * scale.unsqueeze(-1), lower, simplex=True, max_iters=steps, tol=DEFAULT_TOL, linear=linear
    )
    faces = _faces(g, b, supports_from(supports_near(slack, z, bits=_PARAMETRIC_BITS).reshape(-1, k)))
    w = _qp_solutions(g, b, faces, s, approx)
    phi = ((w @ g) * w).sum(-1).clamp_min(0).sqrt() - radius * s
    return (w, phi, *_candidates(g, b, radius, faces))


def _search(g: Tensor, b: Tensor, radius: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """The CAGrad optimum for K beyond enumeration, through the quadratic programs it solves.

    The optimum w* also minimises QP(s) = 1/2 w^T G w + s b^T w on the simplex at s* = ||g_w*|| / r
    (compare the optimality conditions), and phi(s) = ||g_w(s)|| - r s is positive below s* and
    negative above (each root is an optimum, and the optimum is unique in g_w). So a geometric grid
    of s from s_max = max_i ||g_i|| / r (which bounds s*) down to NORM_FLOOR / r brackets s*, a
    finer grid inside the bracket lands on or near the optimal support, and the closed-form
    candidates on the supports near each QP solution's are scored. The best one is the answer
    where it satisfies the optimality conditions; else the fine grid's QP solution nearest the
    root, unless phi <= 0 on the whole coarse grid: the optimum is then at g_w = 0 (or below
    NORM_FLOOR). Returns the weights and whether the optimum is smooth (g_w != 0).
    """
    count = _GRID_POINTS
    radius_safe = torch.where(radius > 0, radius, 1.0)
    s_min = NORM_FLOOR / radius_safe
    s_max = (g.diagonal().clamp_min(0).sqrt().amax() / radius_safe).clamp_min(s_min * 10)
    steps_01 = torch.linspace(0, 1, count, dtype=g.dtype, device=g.device)
    coarse = s_min * (s_max / s_min) ** steps_01
    _, phi1, cand1, score1 = _parametric_solve(g, b, radius, coarse, steps)
    # The last grid point below s* (phi > 0) and the next one bracket it.
    positions = torch.arange(1, count + 1, device=g.device)
    below = torch.where(phi1 > 0, positions, 0).amax().clamp(1, count - 1).reshape(1)
    low, high = coarse.index_select(0, below - 1), coarse.index_select(0, below)
    fine = low * (high / low) ** steps_01
    w2, phi2, cand2, score2 = _parametric_solve(g, b, radius, fine, steps)
    best, score = pick_best(torch.cat((cand1, cand2)), torch.cat((score1, score2)))
    nearest = w2.index_select(0, phi2.abs().argmin().reshape(1)).squeeze(0)
    smooth = score <= STATIONARY_TOL
    return torch.where(smooth, best, nearest), smooth | (phi1 > 0).any()


def cagrad_weights(gram: Tensor, c: float, norm_eps: float, newton_steps: int = DEFAULT_NEWTON_STEPS) -> Tensor:
    """The K CAGrad weights (see the module) from G."""
    k = gram.shape[-1]
    g = normalized_gram(gram)
    mean = torch.full((k,), 1.0 / k, dtype=g.dtype, device=g.device)
    b = g @ mean  # g_i . g0
    radius = c * (mean @ b).clamp_min(0).sqrt()  # c ||g0||
    if k <= ENUMERATION_MAX_K:
        # Every non-empty support (the empty one has no point of the simplex).
        w, score = pick_best(*_candidates(g, b, radius, _faces(g, b, every_support(k, g.device, nonempty=True))))
        smooth = score <= STATIONARY_TOL
    else:
        w, smooth = _search(g, b, radius, newton_steps)
    gw_norm = (w @ (g @ w)).clamp_min(0).sqrt()
    weights = mean + radius / torch.where(gw_norm > 0, gw_norm, 1.0) * w
    keep = smooth & (gw_norm >= max(norm_eps, NORM_FLOOR))
    weights = torch.where(keep, weights, torch.zeros_like(weights))
    return torch.where(radius > 0, weights, mean)


class CAGrad(Aggregator):
    """Conflict-averse gradient descent: the best worst-case direction near the mean gradient.

    Args:
        c: the radius of the ball around the mean gradient, relative to its norm (0 gives the mean;
            the paper uses values in [0, 1), 0.5 by default).
        norm_eps: below this norm of g_w (on G scaled to unit trace) the result is zero (values
            below about 1e-6 are not resolved, see the module).
        newton_steps: the fixed iteration budget of the interior point that solves the batches of
            quadratic programs beyond ``ENUMERATION_MAX_K`` sources (``tolaria.aggregation._qp``; see the module).
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.

    ``conflicts`` in the stats counts the pairs of sources with a negative inner product.
    """

    promises = frozenset({"permutation"})

    def __init__(
        self,
        c: float = 0.5,
        norm_eps: float = 1e-4,
        *,
        newton_steps: int = DEFAULT_NEWTON_STEPS,
        backend: str = "auto",
        nonfinite: str = "raise",
    ):
        super().__init__(backend=backend, nonfinite=nonfinite)
        if not (isinstance(c, (int, float)) and math.isfinite(c) and c >= 0):
            raise ValueError(f"CAGrad c must be a finite number >= 0, got {c!r}")
        if not (isinstance(norm_eps, (int, float)) and math.isfinite(norm_eps) and norm_eps >= 0):
            raise ValueError(f"CAGrad norm_eps must be a finite number >= 0, got {norm_eps!r}")
        if isinstance(newton_steps, bool) or not isinstance(newton_steps, int) or newton_steps < 1:
            raise ValueError(f"CAGrad newton_steps must be a positive integer, got {newton_steps!r}")
        self.c = float(c)
        self.norm_eps = float(norm_eps)
        self.newton_steps = newton_steps

    def weighting(self, gram: Tensor) -> Weights:
        weights = solve_if_finite(gram, lambda g: cagrad_weights(g, self.c, self.norm_eps, self.newton_steps))
        return Weights(weights, conflicting_pairs(gram))

    def __repr__(self) -> str:
        return (
            f"CAGrad(c={self.c}, norm_eps={self.norm_eps}, newton_steps={self.newton_steps}, "
            f"backend={self.backend!r}, nonfinite={self.nonfinite!r})"
        )
