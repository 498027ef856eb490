"""UPGrad (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization"), in Gram space.

Each gradient, scaled by its preference weight, is projected onto the dual cone of all the
gradients, {d : g_j . d >= 0 for every j}, and the projections are summed:
d = sum_i pi_J(p_i g_i). Every projection lies in the dual cone, so d does too: it conflicts with no
source. By Proposition 1 of the paper, pi_J(J^T u) = J^T v with v = argmin_{v >= u} v^T G v, a QP on
the K x K Gram matrix; the K of them (u = p_i e_i) are solved as one batch on the device by
:mod:`tolaria.aggregation._qp`, and the weights are sum_i v_i.
"""

from __future__ import annotations

from torch import Tensor

from ._canonical import project_each_onto_dual_cone
from ._gramian import DualConeAggregator, conflicting_pairs, preference_on, solve_if_finite
from .engine import Weights

__all__ = ["UPGrad"]


class UPGrad(DualConeAggregator):
    """Unconflicting projection of gradients: the sum of each gradient's projection onto the dual cone.

    Args:
        pref_vector: the K preference weights p (default: 1/K each, so that d is the mean of the
            projections, as in TorchJD).
        max_iters, tol: beyond 10 sources, the interior point's fixed iteration budget and
            tolerance (see :mod:`tolaria.aggregation._qp`); up to 10, no iteration runs.
        reg_eps, norm_eps: TorchJD's regularisation of the problem (H = G / trace(G) + reg_eps I,
            and G / trace(G) taken as 0 below ``norm_eps``). The default, 0 each, is the exact
            projection; ``reg_eps=1e-4, norm_eps=1e-4`` (TorchJD's defaults) reproduces TorchJD.
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.

    The weights are the minimum-norm optimum of each projection's QP (unique and permutation-
    equivariant where G is singular), and the combine accumulates in float64 (``wide_combine``),
    so the result conflicts with no source to within the dtype's rounding.

    ``conflicts`` in the stats counts the pairs of sources with a negative inner product.
    """

    promises = frozenset({"linear", "non_conflicting", "permutation", "strongly_stationary", "zero_if_stationary"})

    def weighting(self, gram: Tensor) -> Weights:
        def solve(g: Tensor) -> Tensor:
            # The K projections of p_i g_i, one batch.
            pref = preference_on(self._pref, g)
            return project_each_onto_dual_cone(
                g, pref, max_iters=self.max_iters, tol=self.tol, reg_eps=self.reg_eps, norm_eps=self.norm_eps
            ).sum(dim=0)

        return Weights(solve_if_finite(gram, solve), conflicting_pairs(gram))
