"""FairGrad (Ban & Ji 2024, "Fair Resource Allocation in Multi-Task Learning", Equation 4), in Gram
space, solved on the device.

The weights solve (G w)_i = w_i^(-1/alpha) with w > 0: each source's share of the progress, g_i . d
with d = J^T w, is the alpha-fair allocation. That equation is the stationarity condition of
F(w) = 1/2 w^T G w - sum_i phi(w_i), phi(w) = w^(1 - 1/alpha) / (1 - 1/alpha) (log w for alpha = 1),
which is strictly convex on w > 0: the solution is unique, also where G is singular. It is found by
Newton's method (a step kept inside w > 0, and the best of four step lengths by F; a fixed budget
on accelerators, until convergence on the CPU), on G scaled to unit trace (the solution then scales back
exactly: w = c w' with c = trace^(-alpha / (1 + alpha))). TorchJD solves the same equation with SciPy's least squares on
the host; the results agree to its tolerance.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._gramian import conflicting_pairs, solve_if_finite
from .aggregator import Aggregator
from .engine import Weights

__all__ = ["FairGrad"]

NEWTON_STEPS = 40
# Relative residual of (G w)_i w_i^(1/alpha) = 1 at which the CPU loop stops.
CONVERGED = 1e-13
_STEP_FRACTIONS = (1.0, 0.5, 0.25, 0.0625)


def alpha_fair_weights(gram: Tensor, alpha: float, max_iters: int = NEWTON_STEPS) -> Tensor:
    """The w > 0 with (G w)_i = w_i^(-1/alpha) for a finite K x K Gram matrix, by damped Newton on F
    (see the module docstring); uniform for an all-zero G. Shared with NashMTL (alpha = 1)."""
    k = gram.shape[-1]
    uniform = torch.full((k,), 1.0 / k, dtype=gram.dtype, device=gram.device)
    if alpha == 0:  # the alpha-fair allocation at alpha = 0 is linear scalarisation
        return uniform
    trace = gram.diagonal().sum()
    positive = trace > 0
    h = gram / torch.where(positive, trace, 1.0)
    p = 1.0 / alpha
    w = uniform.clone()
    # On the CPU the loop ends once the equation holds to rounding (Newton: about ten steps);
    # on an accelerator it runs its whole budget, so that nothing is read back to the host.
    early_exit = gram.device.type == "cpu" and not torch.compiler.is_compiling()
    for _ in range(max_iters):
        w = _newton_step(h, w, p)
        if early_exit and bool(((h @ w) * w**p - 1).abs().max() <= CONVERGED):
            break
    scale = torch.where(positive, trace, 1.0) ** (-alpha / (1 + alpha))
    return torch.where(positive, w * scale, uniform)


def _objective(h: Tensor, w: Tensor, p: float) -> Tensor:
    quadratic = 0.5 * ((w @ h) * w).sum(-1)
    if p == 1.0:
        return quadratic - w.log().sum(-1)
    return quadratic - (w ** (1 - p)).sum(-1) / (1 - p)


def _newton_step(h: Tensor, w: Tensor, p: float) -> Tensor:
    gradient = h @ w - w ** (-p)
    hessian = h + torch.diag(p * w ** (-p - 1))
    # Without a solution (weakly stationary sources) w grows along G's null space until the
    # Hessian is singular to rounding: the step then stops, it does not raise.
    step, info = torch.linalg.solve_ex(hessian, gradient)
    direction = torch.where((info == 0) & torch.isfinite(step).all(), -step, torch.zeros_like(step))
    # The longest step that keeps w > 0 (scaled by 0.99), then the best of a few fractions of it.
    limit = torch.where(direction < 0, -w / torch.where(direction < 0, direction, -1.0), torch.inf).amin()
    longest = torch.clamp(0.99 * limit, max=1.0)
    steps = longest * torch.tensor(_STEP_FRACTIONS, dtype=w.dtype, device=w.device)
    candidates = w + steps[:, None] * direction
    values = _objective(h, candidates.clamp_min(torch.finfo(w.dtype).tiny), p)
    best = candidates[values.argmin()]
    return torch.where(_objective(h, best, p) <= _objective(h, w, p), best, w)


class FairGrad(Aggregator):
    """Alpha-fair weights: (G w)_i = w_i^(-1/alpha), w > 0.

    Args:
        alpha: the fairness parameter, >= 0 (TorchJD's argument). 0 is the mean; 1 is proportional
            fairness; larger values favour the sources that progress least.
        max_iters: Newton steps (a fixed budget: nothing is read on the host).
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.

    Where a solution exists, every source progresses: g_i . d = w_i^(-1/alpha) > 0. It exists
    exactly where 0 is not in the gradients' convex hull; elsewhere (weakly stationary sources, e.g.
    more sources than independent directions that cancel) F has no minimum, and the weights are
    where ``max_iters`` Newton steps towards it end (TorchJD returns where its least squares stops).
    All-zero gradients get uniform weights (their result is zero anyway). ``conflicts`` in the
    stats counts the pairs of sources with a negative inner product.
    """

    # Its equation has a solution only where 0 is not in the gradients' convex hull.
    promises = frozenset({"solvable:non_conflicting", "solvable:permutation"})

    def __init__(
        self, alpha: float = 1.0, max_iters: int = NEWTON_STEPS, *, backend: str = "auto", nonfinite: str = "raise"
    ):
        super().__init__(backend=backend, nonfinite=nonfinite)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= float(alpha) < float("inf"):
            raise ValueError(f"FairGrad alpha must be a finite number >= 0, got {alpha!r}")
        if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
            raise ValueError(f"FairGrad max_iters must be a positive integer, got {max_iters!r}")
        self.alpha = float(alpha)
        self.max_iters = max_iters

    def weighting(self, gram: Tensor) -> Weights:
        return Weights(solve_if_finite(gram, self._solve), conflicting_pairs(gram))

    def _solve(self, gram: Tensor) -> Tensor:
        return alpha_fair_weights(gram, self.alpha, self.max_iters)

    def __repr__(self) -> str:
        return (
            f"FairGrad(alpha={self.alpha}, max_iters={self.max_iters}, backend={self.backend!r}, "
            f"nonfinite={self.nonfinite!r})"
        )
