"""Nash-MTL (Navon et al. 2022, "Multi-Task Learning as a Bargaining Game", Section 3 and Algorithm 1),
in Gram space, solved on the device.

The update d = J^T w is the Nash bargaining solution of the sources: Theorem 3.2 characterises it by
(G w)_i = 1 / w_i with w > 0 (Equation 2 of the paper, G = J J^T), i.e. every source's progress
g_i . d is the inverse of its weight. That is FairGrad's alpha-fair equation at alpha = 1
(proportional fairness), so the weights come from FairGrad's damped Newton solver
(:func:`~tolaria.aggregation.fairgrad.alpha_fair_weights`): the solution is unique where it exists,
and it is found to rounding rather than approximated.

Algorithm 1 then bounds the update: where |d| = sqrt(w^T G w) exceeds ``max_norm`` the weights are
scaled down to it (at the solution w^T G w = sum_i w_i (G w)_i = K, so |d| = sqrt(K) before the
scaling), and the weights are solved anew only every ``update_weights_every`` calls, the calls in
between reusing the last solution (rescaled against their own G).

TorchJD (after the paper's code) solves the same equation by sequential convex approximations with
cvxpy and ECOS, 20 of them at most, each warm-started from the last call's weights. On well-conditioned
inputs the two agree to about 1e-7 relative (ECOS's own tolerance). Where the gradients' norms span
orders of magnitude (e.g. 0.1 to 10 with a conflicting pair), ECOS stops at its 100-iteration cap
("optimal_inaccurate"), the approximations wander rather than converge, and TorchJD's weights end
tens of percent or more off the solution, with products w_i (G w)_i of 40 or 50 instead of 1; ours
satisfy the equation to rounding there too. Since the solution does not depend on a starting point,
none is carried between calls: the state is the call counter and the weights reused between updates.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ._gramian import conflicting_pairs, solve_if_finite
from ._stateful import check_count, check_state_keys
from .aggregator import Aggregator
from .engine import Weights
from .fairgrad import alpha_fair_weights

__all__ = ["NashMTL"]

# Damped Newton steps per TorchJD iteration (``optim_niter``): its default 20 gives FairGrad's 40 steps,
# which reach the solution to rounding where gradient norms span up to 1e8 (20 steps: up to about 1e3).
NEWTON_STEPS_PER_ITER = 2


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"NashMTL {name} must be a positive integer, got {value!r}")
    return value


class NashMTL(Aggregator):
    """The Nash bargaining solution of the sources: (G w)_i = 1 / w_i, w > 0, then |J^T w| <= max_norm.

    Args:
        n_tasks: the number of sources K (TorchJD's argument, required there); ``None`` takes K from
            the first call. A call with another K raises ``ValueError`` when it was given.
        max_norm: the largest norm of the update J^T w; ``0`` disables the scaling. At the solution
            |J^T w| = sqrt(K), so the default 1 scales every solved update with K >= 2.
        update_weights_every: solve for new weights every this many calls; the calls in between
            reuse the last solution (then scaled to ``max_norm`` against their own gradients).
        optim_niter: TorchJD's iteration budget: here ``2 * optim_niter`` damped Newton steps (a fixed
            budget on accelerators; the CPU stops once the equation holds to rounding).
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.

    Every source progresses where a solution exists: g_i . d = 1 / w_i > 0 before the scaling. It
    exists exactly where 0 is not in the gradients' convex hull; elsewhere the weights are where the
    Newton budget ends, as FairGrad's. All-zero gradients get uniform weights (the result is zero).
    Under ``nonfinite="propagate"`` a call on non-finite gradients returns NaN weights but keeps the
    last finite solution for the calls that reuse it. ``conflicts`` in the stats counts the pairs of
    sources with a negative inner product.

    Stateful: the call counter and the last solution are in :meth:`state_dict`; :meth:`reset` starts
    over (the next call solves anew).
    """

    # FairGrad's equation at alpha = 1.
    promises = frozenset({"solvable:non_conflicting", "solvable:permutation"})

    stateful = True

    def __init__(
        self,
        n_tasks: int | None = None,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        optim_niter: int = 20,
        *,
        backend: str = "auto",
        nonfinite: str = "raise",
    ):
        super().__init__(backend=backend, nonfinite=nonfinite)
        self.n_tasks = None if n_tasks is None else _positive_int(n_tasks, "n_tasks")
        if (
            isinstance(max_norm, bool)
            or not isinstance(max_norm, (int, float))
            or not 0 <= float(max_norm) < float("inf")
        ):
            raise ValueError(f"NashMTL max_norm must be a finite number >= 0 (0: no scaling), got {max_norm!r}")
        self.max_norm = float(max_norm)
        self.update_weights_every = _positive_int(update_weights_every, "update_weights_every")
        self.optim_niter = _positive_int(optim_niter, "optim_niter")
        self._step = 0
        self._solution: Tensor | None = None  # the last solved weights, before the max_norm scaling

    def _check_k(self, k: int) -> None:
        if self.n_tasks is not None and k != self.n_tasks:
            raise ValueError(f"NashMTL(n_tasks={self.n_tasks}) was given {k} gradient sources")

    def weighting(self, gram: Tensor) -> Weights:
        k = gram.shape[-1]
        self._check_k(k)
        if self._solution is not None and self._solution.shape[0] != k:
            warnings.warn(
                f"NashMTL was given {k} sources after {self._solution.shape[0]}: its state starts over",
                stacklevel=3,
            )
            self.reset()
        if self._step % self.update_weights_every == 0:
            weights = solve_if_finite(gram, self._solve)
            # A non-finite G (nonfinite="propagate") gives NaN weights for this call only: the calls
            # that reuse the solution keep the last finite one (ones before any, TorchJD's start).
            kept = torch.ones_like(weights) if self._solution is None else self._solution.to(weights)
            self._solution = torch.where(torch.isfinite(weights).all(), weights, kept)
        else:
            self._solution = self._solution.to(device=gram.device, dtype=gram.dtype)
            weights = self._solution
        self._step += 1
        if self.max_norm > 0:
            norm = (weights @ gram @ weights).clamp_min(0).sqrt()
            weights = weights * torch.where(norm > self.max_norm, self.max_norm / norm, 1.0)
        return Weights(weights, conflicting_pairs(gram))

    def _solve(self, gram: Tensor) -> Tensor:
        return alpha_fair_weights(gram, 1.0, NEWTON_STEPS_PER_ITER * self.optim_niter)

    def state_dict(self) -> dict[str, Any]:
        """The call counter and the last solved weights (a CPU float tensor, or None before any)."""
        solution = None if self._solution is None else self._solution.detach().to("cpu", copy=True)
        return {"step": self._step, "weights": solution}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = check_state_keys(state, "NashMTL", ["step", "weights"])
        step, weights = check_count(state["step"], "NashMTL", "step"), state["weights"]
        if weights is None:
            if step != 0:
                raise ValueError(f"NashMTL state has step {step} but no weights: only a fresh state (step 0) has none")
        else:
            if not isinstance(weights, Tensor) or weights.dim() != 1 or not weights.is_floating_point():
                raise ValueError(f"NashMTL state 'weights' must be a 1-d float tensor or None, got {weights!r}")
            if weights.numel() == 0 or (self.n_tasks is not None and weights.numel() != self.n_tasks):
                raise ValueError(f"NashMTL(n_tasks={self.n_tasks}) cannot load a state with {weights.numel()} weights")
            if not bool(torch.isfinite(weights).all()):
                raise ValueError("NashMTL state 'weights' holds NaN or inf")
            weights = weights.detach().clone()  # moved to the gradients' device by the next call
        self._step, self._solution = step, weights

    def reset(self) -> None:
        """Forgets the call counter and the last solution: the next call solves anew."""
        self._step = 0
        self._solution = None

    def __repr__(self) -> str:
        return (
            f"NashMTL(n_tasks={self.n_tasks}, max_norm={self.max_norm}, update_weights_every="
            f"{self.update_weights_every}, optim_niter={self.optim_niter}, backend={self.backend!r}, "
            f"nonfinite={self.nonfinite!r})"
        )
