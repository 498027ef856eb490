"""Helpers shared by the weightings that solve something on the Gram matrix.

They keep the weightings free of host reads: a non-finite Gram matrix (``nonfinite="propagate"``)
is replaced by zeros for the solve and the weights are set to NaN afterwards, so a solver never
meets NaN (LAPACK may raise on it) and the NaN still propagates to the result as documented.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._qp import DEFAULT_MAX_ITERS, DEFAULT_TOL, check_solver_budget
from ._weights import DeviceCopies, as_weight_vector, check_weight_count
from .aggregator import Aggregator

__all__ = [
    "solve_if_finite",
    "conflicting_pairs",
    "preference_vector",
    "preference_on",
    "pref_repr",
    "DualConeAggregator",
]


def solve_if_finite(gram: Tensor, solve: Callable[[Tensor], Tensor]) -> Tensor:
    """``solve(gram)`` when every entry of G is finite, else NaN weights; never reads on the host."""
    finite = torch.isfinite(gram).all()
    weights = solve(torch.where(finite, gram, torch.zeros_like(gram)))
    return torch.where(finite, weights, torch.full_like(weights, torch.nan))


def conflicting_pairs(gram: Tensor) -> Tensor:
    """The number of pairs i < j of sources whose gradients conflict (G_ij < 0), as an int64 scalar.

    Counted on G + G^T, symmetric to the bit, so a backend's rounding cannot count a pair once.
    """
    return torch.div(((gram + gram.mT) < 0).sum(), 2, rounding_mode="floor")


def preference_vector(pref_vector: Sequence[float] | Tensor | None, owner: str) -> Tensor | None:
    """Validates a user preference vector (one weight per source) once, at construction."""
    return None if pref_vector is None else as_weight_vector(pref_vector, owner)


def preference_on(pref: DeviceCopies | None, gram: Tensor) -> Tensor:
    """The preference vector on G's device and dtype; the mean (1/K each) when none was given."""
    k = gram.shape[-1]
    if pref is None:
        return torch.full((k,), 1.0 / k, dtype=gram.dtype, device=gram.device)
    return pref.like(gram)


def pref_repr(pref_vector: Tensor | None) -> str:
    return "None" if pref_vector is None else repr(pref_vector.tolist())


class DualConeAggregator(Aggregator):
    """What UPGrad and DualProj share: a preference vector and the dual-cone solver's budget.

    Their result lies in the dual cone (it conflicts with no source), which float32 accumulation
    cannot keep where the weights cancel: the combine accumulates in float64 (``wide_combine``).
    """

    wide_combine = True

    def __init__(
        self,
        pref_vector: Sequence[float] | Tensor | None = None,
        *,
        max_iters: int = DEFAULT_MAX_ITERS,
        tol: float = DEFAULT_TOL,
        reg_eps: float = 0.0,
        norm_eps: float = 0.0,
        backend: str = "auto",
        nonfinite: str = "raise",
    ):
        super().__init__(backend=backend, nonfinite=nonfinite)
        name = type(self).__name__
        check_solver_budget(max_iters, tol, name)
        for label, value in (("reg_eps", reg_eps), ("norm_eps", norm_eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= float(value) < float("inf"):
                raise ValueError(f"{name} {label} must be a finite number >= 0 (0: exact), got {value!r}")
        self.reg_eps = float(reg_eps)
        self.norm_eps = float(norm_eps)
        self.pref_vector = preference_vector(pref_vector, name)
        self._pref = None if self.pref_vector is None else DeviceCopies(self.pref_vector)
        self.max_iters = max_iters
        self.tol = float(tol)

    def _check_k(self, k: int) -> None:
        if self.pref_vector is not None:
            check_weight_count(self.pref_vector, k, type(self).__name__)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(pref_vector={pref_repr(self.pref_vector)}, max_iters={self.max_iters}, "
            f"tol={self.tol}, reg_eps={self.reg_eps}, norm_eps={self.norm_eps}, backend={self.backend!r}, "
            f"nonfinite={self.nonfinite!r})"
        )
