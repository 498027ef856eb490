"""Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
Descent"), in Gram space.

Each source is scored by the sum of its distances to its K - f - 2 nearest other sources (f: the
number of Byzantine sources tolerated); the ``n_selected`` sources of lowest score are averaged
(Multi-Krum; one source by default). Distances come from G alone:
|g_i - g_j|^2 = G_ii + G_jj - 2 G_ij.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._gramian import solve_if_finite
from .aggregator import Aggregator
from .engine import Weights

__all__ = ["Krum"]


def _count(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Krum {name} must be an integer >= {minimum}, got {value!r}")
    return value


class Krum(Aggregator):
    """The mean of the ``n_selected`` sources closest to their K - n_byzantine - 2 nearest others.

    Args:
        n_byzantine: the number f of sources that may be arbitrary (TorchJD's argument; it has no
            default there). Needs K >= f + 3 sources.
        n_selected: how many of the best-scored sources are averaged (1: Krum; more: Multi-Krum).
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.

    Ties in the scores go to the lower source index, as ``torch.topk`` orders them. ``conflicts`` in
    the stats counts the sources left out.
    """

    # Ties (two sources nearest each other score alike) go to the lower index.
    promises = frozenset()

    def __init__(self, n_byzantine: int = 0, n_selected: int = 1, *, backend: str = "auto", nonfinite: str = "raise"):
        super().__init__(backend=backend, nonfinite=nonfinite)
        self.n_byzantine = _count(n_byzantine, "n_byzantine", 0)
        self.n_selected = _count(n_selected, "n_selected", 1)

    def _check_k(self, k: int) -> None:
        needed = max(self.n_byzantine + 3, self.n_selected)
        if k < needed:
            raise ValueError(
                f"Krum(n_byzantine={self.n_byzantine}, n_selected={self.n_selected}) needs at least {needed} "
                f"sources (n_byzantine + 3, and n_selected), got {k}"
            )

    def weighting(self, gram: Tensor) -> Weights:
        k = gram.shape[-1]
        self._check_k(k)
        weights = solve_if_finite(gram, self._select)
        return Weights(weights, torch.tensor(k - self.n_selected, dtype=torch.int64, device=gram.device))

    def _select(self, gram: Tensor) -> Tensor:
        k = gram.shape[-1]
        squares = gram.diagonal()
        distances = (squares[:, None] + squares[None, :] - 2 * gram).clamp_min(0).sqrt()
        # The nearest K - f - 2 others: the K - f - 1 smallest distances of a row, less the 0 to itself.
        nearest = torch.topk(distances, k=k - self.n_byzantine - 1, dim=1, largest=False).values[:, 1:]
        selected = torch.topk(nearest.sum(dim=1), k=self.n_selected, largest=False).indices
        weights = torch.zeros(k, dtype=gram.dtype, device=gram.device)
        return weights.index_fill(0, selected, 1.0 / self.n_selected)

    def __repr__(self) -> str:
        return (
            f"Krum(n_byzantine={self.n_byzantine}, n_selected={self.n_selected}, backend={self.backend!r}, "
            f"nonfinite={self.nonfinite!r})"
        )
