"""DualProj: the averaged gradient projected onto the dual cone of the gradients, in Gram space.

d = pi_J(J^T p): the preference-weighted combination (the mean by default), projected onto
{d : g_j . d >= 0 for every j}, the nearest direction that conflicts with no source. This is the
solution of Equation 11 of Lopez-Paz & Ranzato (2017, GEM), as TorchJD's DualProj defines it. By
Proposition 1 of Quinton & Rey (2024) it is J^T v with v = argmin_{v >= p} v^T G v, one QP on the
K x K Gram matrix, solved on the device by :mod:`tolaria.aggregation._qp`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ._gramian import pref_repr, preference_on, preference_vector, solve_if_finite
from ._qp import DEFAULT_MAX_ITERS, DEFAULT_TOL, check_solver_budget, project_onto_dual_cone
from ._weights import check_weight_count
from .aggregator import Aggregator
from .engine import Weights


class DualProj(Aggregator):
    """The preference-weighted gradient (default: the mean) projected onto the dual cone.

    Args:
        pref_vector: the K preference weights p (default: 1/K each).
        max_iters, tol: beyond 10 sources, the interior point's fixed iteration budget and
            tolerance (see :mod:`tolaria.aggregation._qp`); up to 10, no iteration runs.
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.

    ``conflicts`` in the stats counts the sources the combined gradient conflicted with before
    the projection ((G p)_j < 0): the constraints the projection had to restore.
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
        check_solver_budget(max_iters, tol, "DualProj")
        self.pref_vector = preference_vector(pref_vector, "DualProj")
        self.max_iters = max_iters
        self.tol = float(tol)

    def _check_k(self, k: int) -> None:
        if self.pref_vector is not None:
            check_weight_count(self.pref_vector, k, "DualProj")

    def weighting(self, gram: Tensor) -> Weights:
        pref = preference_on(self.pref_vector, gram)
        weights = solve_if_finite(
            gram, lambda g: project_onto_dual_cone(g, pref, max_iters=self.max_iters, tol=self.tol)
        )
        return Weights(weights, ((gram @ pref) < 0).sum())

    def __repr__(self) -> str:
        return (
            f"DualProj(pref_vector={pref_repr(self.pref_vector)}, max_iters={self.max_iters}, tol={self.tol}, "
            f"backend={self.backend!r}, nonfinite={self.nonfinite!r})"
        )
