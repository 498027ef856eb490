"""DualProj: the averaged gradient projected onto the dual cone of the gradients, in Gram space.

d = pi_J(J^T p): the preference-weighted combination (the mean by default), projected onto
{d : g_j . d >= 0 for every j}, the nearest direction that conflicts with no source. This is the
solution of Equation 11 of Lopez-Paz & Ranzato (2017, GEM), as TorchJD's DualProj defines it. By
Proposition 1 of Quinton & Rey (2024) it is J^T v with v = argmin_{v >= p} v^T G v, one QP on the
K x K Gram matrix, solved on the device by :mod:`tolaria.aggregation._qp`.
"""

from __future__ import annotations

from torch import Tensor

from ._canonical import project_onto_dual_cone
from ._gramian import DualConeAggregator, preference_on, solve_if_finite
from .engine import Weights

__all__ = ["DualProj"]


class DualProj(DualConeAggregator):
    """The preference-weighted gradient (default: the mean) projected onto the dual cone.

    Args:
        pref_vector: the K preference weights p (default: 1/K each).
        max_iters, tol: beyond 10 sources, the interior point's fixed iteration budget and
            tolerance (see :mod:`tolaria.aggregation._qp`); up to 10, no iteration runs.
        reg_eps, norm_eps: TorchJD's regularisation (see :class:`~tolaria.aggregation.UPGrad`);
            0 each (default) is the exact projection.
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.

    The weights are the minimum-norm optimum (unique where G is singular), and the combine
    accumulates in float64 (``wide_combine``).

    ``conflicts`` in the stats counts the sources the combined gradient conflicted with before
    the projection ((G p)_j < 0): the constraints the projection had to restore.
    """

    promises = frozenset({"non_conflicting", "permutation", "zero_if_stationary"})

    def weighting(self, gram: Tensor) -> Weights:
        pref = preference_on(self._pref, gram)
        weights = solve_if_finite(
            gram,
            lambda g: project_onto_dual_cone(
                g, pref, max_iters=self.max_iters, tol=self.tol, reg_eps=self.reg_eps, norm_eps=self.norm_eps
            ),
        )
        return Weights(weights, ((gram @ pref) < 0).sum())
