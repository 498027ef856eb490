"""ConFIG (Liu et al. 2024, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
Networks", Equation 2), in Gram space.

With U the unit gradients (rows g_i / |g_i|) and p the preference weights (1 each by default), the
direction is u = normalise(U^+ p), whose cosine with every gradient is proportional to p_i, and its
length is the sum of the gradients' projections on it: d = (sum_i g_i . u) u. Since
U^+ p = U^T (U U^T)^+ p and U U^T = D^-1 G D^-1 (D: the gradients' norms), d = J^T w with
a = D^-1 C^+ p (C the cosine matrix) and w = a (1^T G a) / (a^T G a).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._gramian import conflicting_pairs, pref_repr, preference_vector, solve_if_finite
from ._weights import DeviceCopies, check_weight_count
from .aggregator import Aggregator
from .engine import Weights

__all__ = ["ConFIG"]

# Eigenvalues of the cosine matrix below this fraction of the largest one are those of dependent
# unit gradients: the pseudo-inverse gives them no weight. The eigenvalues are squared singular
# values of U, computed from G to about 1e-16 absolute, so the cutoff is 1e-6 on singular values
# (TorchJD's pinv of U itself cuts at about 1e-15: unit gradients independent only below 1e-6 are
# treated as dependent here, where TorchJD keeps them).
PINV_RCOND = 1e-12


class ConFIG(Aggregator):
    """Conflict-free update: equal (or ``pref_vector``-proportional) cosine with every gradient.

    Args:
        pref_vector: the K weights p (default: 1 each, as in TorchJD).
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.

    A zero gradient gets no weight. ``conflicts`` in the stats counts the pairs of sources with a
    negative inner product.
    """

    promises = frozenset({"permutation"})

    def __init__(
        self, pref_vector: Sequence[float] | Tensor | None = None, *, backend: str = "auto", nonfinite: str = "raise"
    ):
        super().__init__(backend=backend, nonfinite=nonfinite)
        self.pref_vector = preference_vector(pref_vector, "ConFIG")
        self._pref = None if self.pref_vector is None else DeviceCopies(self.pref_vector)

    def _check_k(self, k: int) -> None:
        if self.pref_vector is not None:
            check_weight_count(self.pref_vector, k, "ConFIG")

    def weighting(self, gram: Tensor) -> Weights:
        return Weights(solve_if_finite(gram, self._weights), conflicting_pairs(gram))

    def _weights(self, gram: Tensor) -> Tensor:
        k = gram.shape[-1]
        p = torch.ones(k, dtype=gram.dtype, device=gram.device) if self._pref is None else self._pref.like(gram)
        norms = gram.diagonal().clamp_min(0).sqrt()
        inv = torch.where(norms > 0, 1 / torch.where(norms > 0, norms, 1.0), 0.0)
        cosine = gram * inv[:, None] * inv[None, :]
        values, vectors = torch.linalg.eigh(cosine)
        keep = values > PINV_RCOND * values.abs().amax().clamp_min(1e-300)
        inverse = torch.where(keep, 1 / torch.where(keep, values, 1.0), 0.0)
        a = inv * (vectors @ (inverse * (vectors.T @ p)))
        square = a @ gram @ a
        length = gram.sum(dim=0) @ a  # sum_i g_i . (J^T a)
        return torch.where(square > 0, a * length / torch.where(square > 0, square, 1.0), 0.0)

    def __repr__(self) -> str:
        return (
            f"ConFIG(pref_vector={pref_repr(self.pref_vector)}, backend={self.backend!r}, nonfinite={self.nonfinite!r})"
        )
