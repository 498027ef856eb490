"""PCD, Priority-Constrained Descent ("Not All Objectives Are Born Equal: Priority-Constrained Descent for
Hierarchical Multi-Objective Optimization", TMLR 2026, arXiv:2606.29521), in Gram space.

Source 0 is the primary objective, sources 1..K-1 the secondary ones. Each gradient is normalised,
g~_i = s_i g_i with s_i = 1 / sqrt(v^_i + eps), v^_i the bias-corrected exponential moving average (decay
beta) of |g_i|^2 over the calls. The direction is the paper's quadratic program

    d~ = argmin_d 1/2 |d - g~_0|^2   subject to   g~_j . d >= tau_j |g~_j|^2   (j = 1..K-1),

which keeps each secondary objective's first-order progress at least a fraction tau_j of what its own
normalised step would give, while following the primary gradient as closely as possible; the result is
d~ rescaled to |g_0|. Special cases: g_0 = 0 gives 0; infeasible constraints (possible from K = 3,
e.g. two opposite secondary gradients) are dropped, and the result is g_0; a d~ that is zero up to
the rounding of G gives 0.

By stationarity d~ = g~_0 + sum_j mu_j g~_j, with mu >= 0 the constraints' multipliers, so the weights
are w = s * [1, mu] * |g_0| / |d~| and every quantity comes from G: the constraint slacks are
(H mu - b)_j with H the secondary block of G~ = diag(s) G diag(s) and b_j = tau_j G~_jj - G~_j0.
The program is solved exactly (to float64 rounding) by the dual active-set method of Goldfarb & Idnani
(1983) for an identity Hessian: constraints enter one at a time (the most violated first), each step
keeping d~ = g~_0 + sum_j mu_j g~_j; a constraint whose gradient depends on the active ones' (its
component off their span below ``DEPENDENCE_TOL`` of its norm) can only enter by dropping one, and
where none can be dropped the program is infeasible. The final multipliers are solved again directly
on the final active set. The paper's reference code enumerates the active sets instead (Appendix B.2);
the minimiser is the same. The program is K x K: it runs in float64 on the host, so on an accelerator
each call reads G back (one synchronisation).

TorchJD's PCD (0.18) solves the same program with the same method and tolerances. Differences: when K
changes the moving average restarts with a warning (TorchJD restarts silently); and the zero-direction
test uses the rounding of the float64 G that Tolaria always computes (TorchJD uses the rounding of the
input dtype's Gram matrix, 10 float32 ulps for float32 inputs), so a float32 d~ shorter than about 1e-3
|g~|, which TorchJD zeroes, is kept here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._stateful import check_count, check_state_keys, state_for_k
from .aggregator import Aggregator
from .engine import Weights

__all__ = ["PCD"]

# A constraint counts as met when violated by at most this times the largest diagonal entry of G~.
FEASIBILITY_TOL = 1e-9
# A gradient counts as dependent on the active ones when its component off their span has a squared
# norm of at most this times its own: above the float64 rounding of G~, so that rounding does not
# make dependent gradients look independent (with huge multipliers).
DEPENDENCE_TOL = 1e-9
# A direction whose squared norm is at most this times the scale of its rounding error is zero.
ZERO_DIRECTION_TOL = 10 * torch.finfo(torch.float64).eps


def _taus(tau: object) -> float | Tensor:
    if isinstance(tau, (Tensor, Sequence)) and not isinstance(tau, str):
        try:
            vector = torch.as_tensor(tau, dtype=torch.float64).detach().to("cpu").clone()
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"PCD tau must be a number in [0, 1] or a vector of them, got {tau!r}") from None
        if vector.dim() != 1:
            raise ValueError(f"PCD tau must be a number or a 1-D vector (one per secondary source), got {tau!r}")
        if not bool(((vector >= 0) & (vector <= 1)).all()):
            raise ValueError(f"PCD tau must hold numbers in [0, 1], got {vector.tolist()}")
        return vector
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= float(tau) <= 1.0:
        raise ValueError(f"PCD tau must be a number in [0, 1] or a vector of them, got {tau!r}")
    return float(tau)


def solve_pcd_program(gram: np.ndarray, taus: np.ndarray, max_iters: int | None = None) -> np.ndarray | None:
    """The weights [1, mu] with d = sum_i w_i g_i the minimiser of 1/2 |d - g_0|^2 subject to
    g_j . d >= taus[j - 1] |g_j|^2, from the K x K Gram matrix of g_0..g_{K-1} (float64); None where the
    constraints are infeasible. ``max_iters`` (default 10 K) only guards against cycling on rounding:
    when reached, the current multipliers are returned."""
    k = gram.shape[0]
    weights = np.zeros(k)
    weights[0] = 1.0
    if k == 1:
        return weights
    h = gram[1:, 1:]
    b = taus * np.diagonal(h) - gram[1:, 0]  # b_j > 0: g_0 alone violates constraint j
    diag = np.diagonal(h)
    mu = np.zeros(k - 1)
    tol = FEASIBILITY_TOL * max(float(np.diagonal(gram).max()), np.finfo(np.float64).tiny)
    active: list[int] = []
    budget = 10 * k if max_iters is None else max_iters
    converged = False
    while budget > 0:
        slacks = h @ mu - b
        slacks[active] = 0.0  # equalities, up to rounding
        entering = int(np.argmin(slacks))
        if slacks[entering] >= -tol:
            converged = True
            break
        slack = slacks[entering]
        while budget > 0:
            budget -= 1
            # Raising mu_entering by t moves d along z = g_entering - sum_a r_a g_a, its component off
            # the active gradients' span (which keeps their slacks), and the active mu by -t r.
            if active:
                r = np.linalg.solve(h[np.ix_(active, active)], h[active, entering])
                off_span = diag[entering] - h[entering, active] @ r
                ratios = np.full(len(active), np.inf)
                positive = r > 0
                ratios[positive] = mu[active][positive] / r[positive]
                blocking = int(np.argmin(ratios))
                partial = float(ratios[blocking])
            else:
                r = np.zeros(0)
                off_span = diag[entering]
                blocking, partial = -1, np.inf
            full = -slack / off_span if off_span > DEPENDENCE_TOL * diag[entering] else np.inf
            step = min(partial, full)
            if step == np.inf:
                return None
            mu[active] -= step * r
            mu[entering] += step
            if full <= partial:
                active.append(entering)
                break
            mu[active[blocking]] = 0.0  # its multiplier reached 0: it leaves, and entering tries again
            del active[blocking]
            slack = h[entering] @ mu - b[entering]
    if converged and active:
        # The same active set, solved in one go: the multipliers without the steps' accumulated rounding.
        direct = np.linalg.solve(h[np.ix_(active, active)], b[active])
        if np.all(np.isfinite(direct)) and np.all(direct >= 0):
            mu[active] = direct
    weights[1:] = np.maximum(mu, 0.0)
    return weights


class PCD(Aggregator):
    """Priority-Constrained Descent: follow source 0, guaranteeing each other source a share of progress.

    Args:
        tau: the fraction in [0, 1] of normalised first-order progress guaranteed to each secondary
            source: a number shared by all, or a vector with one per secondary source (K - 1 values).
        beta: the decay in [0, 1) of the moving average of the squared gradient norms.
        eps: a number >= 0 added to the moving average before its inverse square root.
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.

    (TorchJD's names and defaults.) Source 0 is the primary objective: the order of the sources
    matters. Stateful: the moving average and the number of calls are kept and saved by
    ``state_dict()``; ``reset()`` clears them. Where G holds NaN or inf (``nonfinite="propagate"``) the
    weights are NaN and the moving average is left unchanged. ``conflicts`` in the stats counts the
    secondary sources whose guarantee the primary gradient alone would break.
    """

    # Source 0 is the primary one (no permutation invariance); where the other sources' guarantees cannot all be met
    # it returns g_0, which may conflict with them.
    promises = frozenset()

    stateful = True

    def __init__(
        self,
        tau: float | Sequence[float] | Tensor = 0.02,
        beta: float = 0.999,
        eps: float = 1e-8,
        *,
        backend: str = "auto",
        nonfinite: str = "raise",
    ):
        super().__init__(backend=backend, nonfinite=nonfinite)
        self.tau = _taus(tau)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"PCD beta must be a number in [0, 1), got {beta!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= float(eps) < float("inf"):
            raise ValueError(f"PCD eps must be a finite number >= 0, got {eps!r}")
        self.beta = float(beta)
        self.eps = float(eps)
        self._sq_norm_ema: Tensor | None = None
        self._steps = 0

    def _check_k(self, k: int) -> None:
        if isinstance(self.tau, Tensor) and self.tau.shape[0] != k - 1:
            raise ValueError(
                f"PCD tau has {self.tau.shape[0]} values, one per secondary source, but {k} sources "
                f"(so {k - 1} secondary ones) were given"
            )

    def _scales(self, sq_norms: Tensor) -> Tensor:
        """Updates the moving average with this call's squared norms; the normalising scales s."""
        k = sq_norms.shape[0]
        restarts = "its moving average of the squared norms restarts"
        self._sq_norm_ema = state_for_k(self._sq_norm_ema, k, "PCD", restarts)
        if self._sq_norm_ema is None:
            self._sq_norm_ema = torch.zeros(k, dtype=torch.float64)
            self._steps = 0
        self._sq_norm_ema = self.beta * self._sq_norm_ema + (1.0 - self.beta) * sq_norms
        self._steps += 1
        debiased = self._sq_norm_ema / (1.0 - self.beta**self._steps)
        denominators = (debiased + self.eps).sqrt()
        # A zero average: the gradient has always been zero, and its scale does not matter.
        return torch.where(denominators > 0, 1.0 / torch.where(denominators > 0, denominators, 1.0), 0.0)

    def weighting(self, gram: Tensor) -> Weights:
        k = gram.shape[0]
        self._check_k(k)
        g = gram.detach().to("cpu", torch.float64)
        no_conflict = torch.zeros((), dtype=torch.int64, device=gram.device)
        if not bool(torch.isfinite(g).all()):
            return Weights(torch.full((k,), torch.nan, dtype=gram.dtype, device=gram.device), no_conflict)
        sq_norms = g.diagonal().clamp_min(0)
        scales = self._scales(sq_norms)
        taus = self.tau.numpy() if isinstance(self.tau, Tensor) else np.full(k - 1, self.tau)
        weights = np.zeros(k)
        conflicts = 0
        if sq_norms[0] > 0:
            normalized = (g * torch.outer(scales, scales)).numpy()
            conflicts = int(np.sum(taus * np.diagonal(normalized)[1:] - normalized[1:, 0] > 0))
            w = solve_pcd_program(normalized, taus)
            if w is None:  # infeasible: the constraints are dropped, and the direction is g~_0
                w = np.zeros(k)
                w[0] = 1.0
            sq_norm = float(w @ normalized @ w)
            rounding_scale = float(np.abs(w) @ np.sqrt(np.maximum(np.diagonal(normalized), 0.0))) ** 2
            if sq_norm > ZERO_DIRECTION_TOL * rounding_scale:
                weights = w * scales.numpy() * np.sqrt(float(sq_norms[0]) / sq_norm)
        return Weights(
            torch.tensor(weights, dtype=gram.dtype, device=gram.device),
            torch.tensor(conflicts, dtype=torch.int64, device=gram.device),
        )

    def state_dict(self) -> dict[str, Any]:
        """The moving average of the squared norms (a K float64 CPU tensor, None before the first call)
        and the number of calls it has seen."""
        ema = None if self._sq_norm_ema is None else self._sq_norm_ema.clone()
        return {"sq_norm_ema": ema, "steps": self._steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = check_state_keys(state, "PCD", ["sq_norm_ema", "steps"])
        ema, steps = state["sq_norm_ema"], check_count(state["steps"], "PCD", "steps")
        if ema is None:
            if steps != 0:
                raise ValueError(f"PCD state has no moving average but 'steps' = {steps}")
        elif not isinstance(ema, Tensor) or ema.dim() != 1 or not ema.is_floating_point() or steps < 1:
            raise ValueError(
                f"PCD state 'sq_norm_ema' must be None or a 1-D float tensor (with 'steps' >= 1), got {ema!r} "
                f"with steps={steps!r}"
            )
        self._sq_norm_ema = None if ema is None else ema.detach().to("cpu", torch.float64).clone()
        self._steps = steps

    def reset(self) -> None:
        """Forgets the moving average: the next call starts as the first did."""
        self._sq_norm_ema = None
        self._steps = 0

    def __repr__(self) -> str:
        tau = self.tau.tolist() if isinstance(self.tau, Tensor) else self.tau
        return (
            f"PCD(tau={tau!r}, beta={self.beta}, eps={self.eps}, backend={self.backend!r}, "
            f"nonfinite={self.nonfinite!r})"
        )
