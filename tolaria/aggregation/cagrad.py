"""CAGrad (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning"), in Gram space.

CAGrad looks for the direction d that maximises the worst improvement min_i g_i . d within a ball
around the mean gradient g0, ||d - g0|| <= c ||g0||. Its dual (Algorithm 1 of the paper) is a
problem in the K weights alone:

    w = argmin_{w >= 0, sum w = 1}  g_w . g0 + c ||g0|| ||g_w||,    g_w = J^T w,

and then d = g0 + (c ||g0|| / ||g_w||) g_w, i.e. the weights 1/K + (c ||g0|| / ||g_w||) w. As in
TorchJD's CAGrad, the result is the paper's d without the optional 1/(1 + c^2) rescaling of the
authors' code, and it is zero when ||g_w|| falls below ``norm_eps`` (on G scaled to unit trace): the
sources are then Pareto-stationary and no conflict-averse direction exists.

Every quantity is a function of G: g_w . g0 = w^T G 1/K and ||g_w||^2 = w^T G w. The dual is a
second-order cone program in K + 1 variables (w and a bound tau >= ||g_w||), solved on the device by
a log-barrier method with damped Newton steps: the barrier is self-concordant, so the step
1 / (1 + Newton decrement) never leaves the feasible set and needs no line search, and the barrier
weight follows a fixed schedule. No step reads a value on the host.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._gramian import conflicting_pairs, solve_if_finite
from ._qp import normalized_gram
from .aggregator import Aggregator
from .engine import Weights

DEFAULT_NEWTON_STEPS = 30
# Barrier weight schedule: t starts at 1 and grows tenfold every third Newton step up to T_END,
# then the steps re-centre. Beyond about 1e8 the cone's slack tau^2 - ||g_w||^2 is lost to rounding;
# the polish below takes the answer from there to full precision.
T_END = 1e6
GROWTH = 10.0
INNER = 3
# Candidate step sizes of the line search: 1, 1/2, ..., 2^-(_LINE_SEARCH - 1).
_LINE_SEARCH = 16
# Tikhonov term on the normalised G for the polish's linear solves (as in _qp).
_REGULARIZATION = 1e-12


def _barrier_solve(g: Tensor, b: Tensor, radius: Tensor, steps: int) -> Tensor:
    """An approximate minimiser w of b^T w + radius ||g_w|| on the simplex (see the module)."""
    k = g.shape[-1]
    dtype, device = g.dtype, g.device
    w = torch.full((k,), 1.0 / k, dtype=dtype, device=device)
    tau = 2 * (w @ b).clamp_min(0).sqrt() + 1  # strictly above ||g_w|| = ||g0||
    eq = torch.cat((torch.ones(k, dtype=dtype, device=device), torch.zeros(1, dtype=dtype, device=device)))
    alphas = 0.5 ** torch.arange(_LINE_SEARCH, dtype=dtype, device=device)
    tiny = torch.finfo(dtype).tiny
    t = 1.0
    for index in range(steps):
        gw = g @ w
        slack = tau * tau - w @ gw
        # Gradient and Hessian of t (b^T w + radius tau) - sum log w - log(tau^2 - w^T G w).
        grad = torch.cat((t * b - 1 / w + 2 * gw / slack, (t * radius - 2 * tau / slack).reshape(1)))
        outer = torch.cat((-2 * gw, (2 * tau).reshape(1)))  # the gradient of the slack
        hess = torch.outer(outer, outer) / (slack * slack)
        hess[:k, :k] += 2 * g / slack + torch.diag(1 / (w * w))
        hess[k, k] -= 2 / slack
        lu, pivots, _ = torch.linalg.lu_factor_ex(hess)
        both = torch.linalg.lu_solve(lu, pivots, torch.stack((-grad, eq), dim=-1))
        a, e = both[:, 0], both[:, 1]
        step = a - (eq @ a) / (eq @ e) * e  # the Newton step that keeps sum w = 1
        # Line search on a grid, all candidates at once (no host read): the feasible point with
        # the lowest barrier value among w + alpha step, alpha = 1, 1/2, ..., 2^-(len - 1).
        cand_w = w + alphas[:, None] * step[:k]
        cand_tau = tau + alphas * step[k]
        cand_slack = cand_tau * cand_tau - ((cand_w @ g) * cand_w).sum(-1)
        feasible = (cand_w > 0).all(-1) & (cand_tau > 0) & (cand_slack > 0)  # tau > 0: the right nappe
        value = (
            t * (cand_w @ b + radius * cand_tau)
            - cand_w.clamp_min(tiny).log().sum(-1)
            - cand_slack.clamp_min(tiny).log()
        )
        best = torch.where(feasible, value, torch.inf).argmin()
        ok = feasible[best] & torch.isfinite(value[best])
        w = torch.where(ok, cand_w[best], w)
        tau = torch.where(ok, cand_tau[best], tau)
        if index % INNER == INNER - 1:
            t = min(t * GROWTH, T_END)
    return w


def _polish(g: Tensor, b: Tensor, radius: Tensor, w: Tensor) -> Tensor:
    """The exact minimiser on the support the barrier iterate identified, where it checks out.

    With the zero set A fixed, the stationarity conditions on the others, I, read
    G_II w_I = lam (nu 1 - b_I) with lam = ||g_w|| / radius; with sum w = 1 their solution is
    affine in lam, w_I = p + lam r (p = G_II^-1 1 / (1^T G_II^-1 1), 1^T r = 0, so p^T G r = 0), and
    ||g_w|| = radius lam gives lam^2 = p^T G p / (radius^2 - r^T G r) in closed form. Four guesses of A
    are solved as one batch (none, w_i small, a split at the largest gap of log w, and one at the largest
    gap of the objective's gradient); the first that meets the optimality conditions replaces w.
    """
    k = g.shape[-1]
    logs = w.clamp_min(torch.finfo(w.dtype).tiny).log()
    ordered, _ = logs.sort()
    if k > 1:
        cut = ordered.diff().argmax()
        threshold = (ordered[cut] + ordered[cut + 1]) / 2
    else:
        threshold = ordered[0] - 1
    # A third guess from the gradient of the objective, b + G w / lam: equal to the multiplier on
    # the support and above it off the support; split at its largest gap.
    gw_norm = (w @ (g @ w)).clamp_min(0).sqrt()
    slope = b + radius * (g @ w) / torch.where(gw_norm > 0, gw_norm, 1.0)
    slopes, _ = slope.sort()
    if k > 1:
        jump = slopes.diff().argmax()
        slope_cut = (slopes[jump] + slopes[jump + 1]) / 2
    else:
        slope_cut = slopes[0] + 1
    nothing = torch.zeros_like(w, dtype=torch.bool)  # an interior solution: every w_i > 0
    zero = torch.stack((nothing, w < 1e-3 * w.amax(), logs < threshold, slope > slope_cut))  # 4 x K
    free = ~zero
    g_reg = g + _REGULARIZATION * torch.eye(k, dtype=g.dtype, device=g.device)
    pair = free.unsqueeze(-1) & free.unsqueeze(-2)
    matrix = torch.where(pair, g_reg, 0.0) + torch.where(zero, 1.0, 0.0).diag_embed()
    rhs = torch.stack((free.to(g.dtype), torch.where(free, b, 0.0)), dim=-1)  # 2 x K x 2
    lu, pivots, info = torch.linalg.lu_factor_ex(matrix)
    sol = torch.linalg.lu_solve(lu, pivots, rhs)
    e, f = sol[..., 0], sol[..., 1]  # G_II^-1 1 and G_II^-1 b_I, zero on A
    e_sum = e.sum(-1, keepdim=True)
    p = e / e_sum
    r = e * (f.sum(-1, keepdim=True) / e_sum) - f
    quad_p = ((p @ g_reg) * p).sum(-1, keepdim=True)
    quad_r = ((r @ g_reg) * r).sum(-1, keepdim=True)
    denom = radius * radius - quad_r
    lam = (quad_p / torch.where(denom > 0, denom, 1.0)).clamp_min(0).sqrt()
    exact = p + lam * r
    # Optimality: exact >= 0 and, on A, the gradient b + G w / lam is at least the multiplier nu.
    grad = b + (exact @ g_reg) / torch.where(lam > 0, lam, 1.0)
    nu = (grad * free).sum(-1, keepdim=True) / free.sum(-1, keepdim=True).clamp_min(1)
    slack = 1e-10 * (1 + grad.abs().amax(-1, keepdim=True))
    optimal = ((exact >= -1e-12) & (free | (grad - nu >= -slack))).all(-1, keepdim=True)
    optimal = optimal & (denom > 0) & (lam > 0) & (info == 0).unsqueeze(-1) & torch.isfinite(exact).all(-1, keepdim=True)
    exact = exact.clamp_min(0)
    result = w
    for guess in reversed(range(zero.shape[0])):  # the first guess that checks out wins
        result = torch.where(optimal[guess], exact[guess], result)
    return result


def cagrad_weights(gram: Tensor, c: float, norm_eps: float, newton_steps: int = DEFAULT_NEWTON_STEPS) -> Tensor:
    """The K CAGrad weights (see the module) from G: barrier method, then the exact polish."""
    k = gram.shape[-1]
    g = normalized_gram(gram)
    mean = torch.full((k,), 1.0 / k, dtype=g.dtype, device=g.device)
    b = g @ mean  # g_i . g0
    radius = c * (mean @ b).clamp_min(0).sqrt()  # c ||g0||
    w = _polish(g, b, radius, _barrier_solve(g, b, radius, newton_steps))
    gw_norm = (w @ (g @ w)).clamp_min(0).sqrt()
    weights = mean + radius / torch.where(gw_norm > 0, gw_norm, 1.0) * w
    return torch.where(gw_norm >= norm_eps, weights, torch.zeros_like(weights))


class CAGrad(Aggregator):
    """Conflict-averse gradient descent: the best worst-case direction near the mean gradient.

    Args:
        c: the radius of the ball around the mean gradient, relative to its norm (0 gives the mean;
            the paper uses values in [0, 1), 0.5 by default).
        norm_eps: below this norm of g_w (on G scaled to unit trace) the result is zero.
        newton_steps: the solver's fixed budget of Newton steps.
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.

    ``conflicts`` in the stats counts the pairs of sources with a negative inner product.
    """

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
