"""MGDA: the minimum-norm point of the convex hull of the gradients, solved on the Gram matrix.

The multiple-gradient descent algorithm (Désidéri 2012) steps along d = J^T w with
w = argmin_{w >= 0, sum w = 1} ||J^T w||^2 (as in Sener & Koltun 2018): the one direction of the
convex hull closest to the origin. It has a non-negative inner product with every gradient
(g_i . d >= ||d||^2), and d = 0 exactly when the sources are Pareto-stationary (0 is in the hull).
The QP has K variables and needs G = J J^T only: it is solved exactly on the device by
:mod:`tolaria.aggregation._qp` (every support up to 10 sources, an interior point beyond), rather
than approached by Frank-Wolfe.
"""

from __future__ import annotations

from torch import Tensor

from ._canonical import min_norm_convex_weights
from ._gramian import conflicting_pairs, solve_if_finite
from ._qp import DEFAULT_MAX_ITERS, DEFAULT_TOL, check_solver_budget
from .aggregator import Aggregator
from .engine import Weights

__all__ = ["MGDA"]


class MGDA(Aggregator):
    """Multiple-gradient descent: the min-norm convex combination of the gradients.

    The weights sum to 1 and the result is the point of the gradients' convex hull nearest the
    origin. Where it is not unique in w (duplicate or dependent gradients), the weights are one
    optimal choice, on affinely independent gradients up to 10 sources; the result itself is
    always unique.

    Args:
        epsilon: beyond 10 sources, the stopping tolerance of the solver (as in TorchJD, whose
            Frank-Wolfe solver stops on it): the interior point stops once its duality gap, which
            bounds how far w^T G w lies above the optimum, is at most ``epsilon`` times w^T G w, so
            the objective is within a factor 1 + epsilon of the optimum at any epsilon. The exact
            solve on the support it identifies replaces it wherever that solve is optimal. Up to
            10 sources the solve is exact whatever its value.
        max_iters: beyond 10 sources, the interior point's fixed iteration budget (no host read
            decides when to stop). Up to 10 sources no iteration runs (see
            :mod:`tolaria.aggregation._qp`).
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.

    ``conflicts`` in the stats counts the pairs of sources with a negative inner product. The
    combine accumulates in float64 and rounds once (``wide_combine``): near a Pareto-stationary
    point the weights cancel, and float32 accumulation would lose the non-conflicting property.
    """

    promises = frozenset({"non_conflicting", "permutation", "zero_if_stationary"})

    wide_combine = True

    def __init__(
        self,
        epsilon: float = DEFAULT_TOL,
        max_iters: int = DEFAULT_MAX_ITERS,
        *,
        backend: str = "auto",
        nonfinite: str = "raise",
    ):
        super().__init__(backend=backend, nonfinite=nonfinite)
        check_solver_budget(max_iters, epsilon, "MGDA")
        self.epsilon = float(epsilon)
        self.max_iters = max_iters

    def weighting(self, gram: Tensor) -> Weights:
        weights = solve_if_finite(
            gram, lambda g: min_norm_convex_weights(g, max_iters=self.max_iters, tol=self.epsilon)
        )
        return Weights(weights, conflicting_pairs(gram))

    def __repr__(self) -> str:
        return (
            f"MGDA(epsilon={self.epsilon}, max_iters={self.max_iters}, "
            f"backend={self.backend!r}, nonfinite={self.nonfinite!r})"
        )
