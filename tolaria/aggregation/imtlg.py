"""IMTL-G (Liu et al. 2021, "Towards Impartial Multi-task Learning"), in Gram space.

IMTL-G combines the gradients so that the result has the same projection onto every unit
gradient, d . g_i / ||g_i|| equal for all i, with weights summing to 1. Its closed form is the
generalisation of Quinton & Rey (2024), which also covers linearly dependent gradients:
v = pinv(G) sqrt(diag G), w = v / sum(v) (w = 0 where sum(v) vanishes: no impartial direction).
The pseudo-inverse comes from the eigendecomposition of G (see :mod:`tolaria.aggregation._eigh`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._eigh import METHODS, symmetric_eig
from ._gramian import conflicting_pairs, solve_if_finite
from ._qp import normalized_gram
from .aggregator import Aggregator
from .engine import Weights

# |sum(v)| below this (on G scaled to unit trace) means the impartial direction does not exist.
SUM_EPS = 1e-12


def imtlg_weights(gram: Tensor, *, rtol: float | None = None, eig_method: str = "auto") -> Tensor:
    """w = pinv(G) sqrt(diag G) / its sum; eigenvalues below ``rtol`` x the largest count as zero.

    ``rtol`` defaults to K x float64 epsilon, the cut-off of ``torch.linalg.pinv``.
    """
    k = gram.shape[-1]
    unit = normalized_gram(gram)  # w is scale-free; this makes SUM_EPS scale-free too
    values, vectors = symmetric_eig(unit, method=eig_method)
    cutoff = values[-1] * (k * torch.finfo(unit.dtype).eps if rtol is None else rtol)
    kept = values > cutoff
    inverse = torch.where(kept, 1 / torch.where(kept, values, 1.0), 0.0)
    v = vectors @ (inverse * (vectors.mT @ unit.diagonal().clamp_min(0).sqrt()))
    total = v.sum()
    return torch.where(total.abs() >= SUM_EPS, v / torch.where(total != 0, total, 1.0), torch.zeros_like(v))


class IMTLG(Aggregator):
    """Impartial multi-task learning (gradient part): equal projections onto every unit gradient.

    Args:
        rtol: eigenvalues of G below ``rtol`` times the largest are treated as zero in the
            pseudo-inverse (default: K x float64 epsilon, as ``torch.linalg.pinv``). Raise it (e.g.
            to 1e-6) for float32 gradients with exactly dependent rows, whose Gram matrix carries
            float32 rounding.
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.

    ``conflicts`` in the stats counts the pairs of sources with a negative inner product.
    """

    promises = frozenset({"permutation"})

    def __init__(self, rtol: float | None = None, *, backend: str = "auto", nonfinite: str = "raise"):
        super().__init__(backend=backend, nonfinite=nonfinite)
        if rtol is not None and not (isinstance(rtol, (int, float)) and 0 <= rtol < 1):
            raise ValueError(f"IMTLG rtol must be a number in [0, 1) or None, got {rtol!r}")
        self.rtol = None if rtol is None else float(rtol)
        self.eig_method = "auto"

    def weighting(self, gram: Tensor) -> Weights:
        weights = solve_if_finite(gram, lambda g: imtlg_weights(g, rtol=self.rtol, eig_method=self.eig_method))
        return Weights(weights, conflicting_pairs(gram))

    def __repr__(self) -> str:
        return f"IMTLG(rtol={self.rtol}, backend={self.backend!r}, nonfinite={self.nonfinite!r})"


__all__ = ["IMTLG", "METHODS", "imtlg_weights"]
