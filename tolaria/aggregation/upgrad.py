"""UPGrad (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization"), in Gram space.

Each gradient, scaled by its preference weight, is projected onto the dual cone of all the
gradients, {d : g_j . d >= 0 for every j}, and the projections are summed:
d = sum_i pi_J(p_i g_i). Every projection lies in the dual cone, so d does too: it conflicts with no
source. By Proposition 1 of the paper, pi_J(J^T u) = J^T v with v = argmin_{v >= u} v^T G v, a QP on
the K x K Gram matrix; the K of them (u = p_i e_i) are solved as one batch on the device by
:mod:`tolaria.aggregation._qp`, and the weights are sum_i v_i.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ._gramian import conflicting_pairs, pref_repr, preference_on, preference_vector, solve_if_finite
from ._qp import DEFAULT_MAX_ITERS, DEFAULT_TOL, check_solver_budget, project_each_onto_dual_cone
from ._weights import check_weight_count
from .aggregator import Aggregator
from .engine import Weights


class UPGrad(Aggregator):
    """Unconflicting projection of gradients: the sum of each gradient's projection onto the dual cone.

    Args:
        pref_vector: the K preference weights p (default: 1/K each, so that d is the mean of the
            projections, as in TorchJD).
        max_iters, tol: beyond 10 sources, the interior point's fixed iteration budget and
            tolerance (see :mod:`tolaria.aggregation._qp`); up to 10, no iteration runs.
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.

    ``conflicts`` in the stats counts the pairs of sources with a negative inner product.
    """

    def __init__(
        self,
        pref_vector: Sequence[float] | Tensor | None = None,
        *,
        max_iters: int = DEFAULT_MAX_ITERS,
        tol: float = DEFAULT_TOL,
        backend: str = "auto",
        nonfinite: str = "raise",
    ):
        super().__init__(backend=backend, nonfinite=nonfinite)
        check_solver_budget(max_iters, tol, "UPGrad")
        self.pref_vector = preference_vector(pref_vector, "UPGrad")
        self.max_iters = max_iters
        self.tol = float(tol)

    def _check_k(self, k: int) -> None:
        if self.pref_vector is not None:
            check_weight_count(self.pref_vector, k, "UPGrad")

    def weighting(self, gram: Tensor) -> Weights:
        def solve(g: Tensor) -> Tensor:
            # The K projections of p_i g_i, one batch.
            pref = preference_on(self.pref_vector, g)
            return project_each_onto_dual_cone(g, pref, max_iters=self.max_iters, tol=self.tol).sum(dim=0)

        return Weights(solve_if_finite(gram, solve), conflicting_pairs(gram))

    def __repr__(self) -> str:
        return (
            f"UPGrad(pref_vector={pref_repr(self.pref_vector)}, max_iters={self.max_iters}, tol={self.tol}, "
            f"backend={self.backend!r}, nonfinite={self.nonfinite!r})"
        )
