"""Aligned-MTL (Senushkin et al. 2023, "Independent Component Alignment for Multi-Task Learning").

Algorithm 1 of the paper aligns the principal components of the gradients: with the eigen-
decomposition G = V diag(lambda) V^T (rank r), the balance transformation
B = sqrt(lambda_scale) V_r diag(lambda_r)^(-1/2) V_r^T makes the combined gradients' system
condition number 1, and the weights are w = B p for the preference vector p (1/K each by default).
This follows TorchJD's AlignedMTL: eigenvalues at or below max(lambda) x K x epsilon count as zero,
``scale_mode`` picks lambda_scale among the kept ones ("min", the paper's; "median"; "rmse", their
mean, as in the original code), and an all-zero G gives B = I. The K x K eigendecomposition runs
on the device (see :mod:`tolaria.aggregation._eigh`); ranks are masks, never host reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._eigh import symmetric_eig
from ._gramian import conflicting_pairs, pref_repr, preference_on, preference_vector, solve_if_finite
from ._weights import DeviceCopies, check_weight_count
from .aggregator import Aggregator
from .engine import Weights

__all__ = ["SCALE_MODES", "balance_transformation", "AlignedMTL"]

SCALE_MODES = ("min", "median", "rmse")


def balance_transformation(gram: Tensor, scale_mode: str = "min", *, eig_method: str = "auto") -> Tensor:
    """The K x K balance transformation B of Aligned-MTL (Algorithm 1), from G alone."""
    k = gram.shape[-1]
    values, vectors = symmetric_eig(gram, method=eig_method)  # ascending
    kept = values > values[-1] * k * torch.finfo(gram.dtype).eps
    rank = kept.sum()
    inv_sqrt = torch.where(kept, torch.where(kept, values, 1.0).rsqrt(), 0.0)
    if scale_mode == "min":
        scale = torch.where(kept, values, torch.inf).amin()
    elif scale_mode == "median":
        # torch.median's convention (the lower middle) over the kept eigenvalues, which are the
        # last ``rank`` of the ascending list: index K - rank + (rank - 1) // 2.
        index = (k - rank + torch.div(rank - 1, 2, rounding_mode="floor")).clamp(0, k - 1)
        scale = values[index]
    elif scale_mode == "rmse":
        scale = torch.where(kept, values, 0.0).sum() / rank.clamp(min=1)
    else:
        raise ValueError(f"unknown scale_mode {scale_mode!r}; valid modes are {', '.join(SCALE_MODES)}")
    balance = scale.clamp(min=0).sqrt() * (vectors * inv_sqrt) @ vectors.mT
    identity = torch.eye(k, dtype=gram.dtype, device=gram.device)
    return torch.where(rank > 0, balance, identity)


class AlignedMTL(Aggregator):
    """Aligned-MTL: weights B p from the balance transformation of the Gram eigendecomposition.

    Args:
        pref_vector: the K preference weights p (default: 1/K each, as in TorchJD).
        scale_mode: ``"min"`` (default, the paper's), ``"median"`` or ``"rmse"`` (see the module).
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.

    ``conflicts`` in the stats counts the pairs of sources with a negative inner product.
    """

    promises = frozenset({"permutation"})

    def __init__(
        self,
        pref_vector: Sequence[float] | Tensor | None = None,
        scale_mode: str = "min",
        *,
        backend: str = "auto",
        nonfinite: str = "raise",
    ):
        super().__init__(backend=backend, nonfinite=nonfinite)
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"unknown scale_mode {scale_mode!r}; valid modes are {', '.join(SCALE_MODES)}")
        self.pref_vector = preference_vector(pref_vector, "AlignedMTL")
        self._pref = None if self.pref_vector is None else DeviceCopies(self.pref_vector)
        self.scale_mode = scale_mode
        self.eig_method = "auto"

    def _check_k(self, k: int) -> None:
        if self.pref_vector is not None:
            check_weight_count(self.pref_vector, k, "AlignedMTL")

    def weighting(self, gram: Tensor) -> Weights:
        def solve(g: Tensor) -> Tensor:
            balance = balance_transformation(g, self.scale_mode, eig_method=self.eig_method)
            return balance @ preference_on(self._pref, g)

        return Weights(solve_if_finite(gram, solve), conflicting_pairs(gram))

    def __repr__(self) -> str:
        return (
            f"AlignedMTL(pref_vector={pref_repr(self.pref_vector)}, scale_mode={self.scale_mode!r}, "
            f"backend={self.backend!r}, nonfinite={self.nonfinite!r})"
        )
