"""SDMGrad (Xiao, Ban & Ji 2023, "Direction-oriented Multi-objective Learning: Simple and Provable
Stochastic Algorithms", NeurIPS 2023, Algorithm 1), in Gram space.

SDMGrad looks for the direction d = J^T (w + lambda w~) / (1 + lambda) closest to the preference
direction J^T w~ (the mean gradient by default) among those that improve every objective: the
weights w on the simplex minimise 1/2 |J^T (w + lambda w~)|^2, whose gradient in w is
J J^T (w + lambda w~). Each call runs ``n_iter`` projected stochastic gradient steps on w, from the
w the previous call ended at (uniform at first):

    v <- momentum v + A (w + lambda w~),   w <- P_simplex(w - lr v),

with A the matrix scaled by the square of the mean gradient norm (A = M / (s^2 + 1e-8),
s = mean_i sqrt(max(M_ii, 0)); section 6.1 of the paper and its code), so that ``lr`` does not
depend on the gradients' scale; the momentum buffer starts anew at each call. This is TorchJD's
``SDMGradWeighting``, with its argument names and defaults.

The paper takes M = J_1 J_2^T from two independent samples of the gradients; the engine has one
sample, so a call uses its Gram matrix G = J J^T. :meth:`SDMGrad.weights_from_cross` takes the
two-sample matrix J_1 J_2^T instead and advances the same state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._gramian import pref_repr, preference_on, preference_vector
from ._simplex import project_onto_simplex
from ._stateful import SimplexStateAggregator
from ._weights import DeviceCopies, check_weight_count

__all__ = ["SDMGrad"]

# Added to the squared scale before dividing by it (TorchJD's and the authors' constant): all-zero
# gradients leave A = 0.
SCALE_EPS = 1e-8


def _number(value: object, name: str, low: float, high: float, closed_low: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = ok and (low <= float(value) if closed_low else low < float(value)) and float(value) < high
    if not ok:
        bounds = f"in [{low}, {high})" if high < float("inf") else f"{'>=' if closed_low else '>'} {low} and finite"
        raise ValueError(f"SDMGrad {name} must be a number {bounds}, got {value!r}")
    return float(value)


class SDMGrad(SimplexStateAggregator):
    """Stochastic direction-oriented multi-objective gradient: the direction nearest the preferred
    one that improves every objective, its weights found by a few warm-started projected steps.

    Args:
        lr: the step size of the inner projected gradient steps, > 0.
        momentum: the inner steps' momentum, in [0, 1).
        n_iter: the number of inner steps per call, a positive integer.
        lambda_: how far the direction is pulled towards the preference direction, >= 0 (0: the
            MGDA direction, approached by the inner steps; large: the preference direction).
        pref_vector: the preference weights w~, one per source (default: 1/K each, the mean).
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.

    The defaults are TorchJD's (lr 10, momentum 0.5, 20 steps, lambda_ 0.3). The weights,
    (w + lambda_ w~) / (1 + lambda_), sum to 1 when w~ does.

    Stateful: ``state_dict()`` holds the w the last call ended at (``{"w": K float64 CPU tensor or
    None}``); :meth:`reset` returns to uniform; a call with another number of sources warns and
    starts from uniform (TorchJD starts afresh silently). A call on a non-finite Gram matrix
    (``nonfinite="propagate"``) gives NaN weights and leaves the state as it was. ``conflicts`` in
    the stats counts the pairs of sources with a negative inner product.
    """

    promises = frozenset({"permutation"})

    _state_key = "w"

    def __init__(
        self,
        lr: float = 10.0,
        momentum: float = 0.5,
        n_iter: int = 20,
        lambda_: float = 0.3,
        pref_vector: Sequence[float] | Tensor | None = None,
        *,
        backend: str = "auto",
        nonfinite: str = "raise",
    ):
        super().__init__(backend=backend, nonfinite=nonfinite)
        inf = float("inf")
        self.lr = _number(lr, "lr", 0.0, inf, closed_low=False)
        self.momentum = _number(momentum, "momentum", 0.0, 1.0, closed_low=True)
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
            raise ValueError(f"SDMGrad n_iter must be a positive integer, got {n_iter!r}")
        self.n_iter = n_iter
        self.lambda_ = _number(lambda_, "lambda_", 0.0, inf, closed_low=True)
        try:
            self.pref_vector = preference_vector(pref_vector, "SDMGrad")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"SDMGrad pref_vector must be one finite number per source: {exc}") from None
        self._pref = None if self.pref_vector is None else DeviceCopies(self.pref_vector)

    def _check_k(self, k: int) -> None:
        if self.pref_vector is not None:
            check_weight_count(self.pref_vector, k, "SDMGrad pref_vector")

    def _update(self, matrix: Tensor, current: Tensor) -> tuple[Tensor, Tensor]:
        pull = self.lambda_ * preference_on(self._pref, matrix)
        scale = matrix.diagonal().clamp_min(0.0).sqrt().mean()
        a = matrix / (scale**2 + SCALE_EPS)
        w = current
        velocity = torch.zeros_like(current)
        for _ in range(self.n_iter):
            # The first step's buffer is its gradient alone (0 * 0 + g): torch.optim.SGD's momentum.
            velocity = self.momentum * velocity + a @ (w + pull)
            w = project_onto_simplex(w - self.lr * velocity)
        return w, (w + pull) / (1.0 + self.lambda_)

    def __repr__(self) -> str:
        return (
            f"SDMGrad(lr={self.lr}, momentum={self.momentum}, n_iter={self.n_iter}, lambda_={self.lambda_}, "
            f"pref_vector={pref_repr(self.pref_vector)}, backend={self.backend!r}, nonfinite={self.nonfinite!r})"
        )
