"""What an aggregation reports about its sources, read off the Gram matrix at no extra pass."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["AggregationStats", "stats_from_gram"]


class AggregationStats:
    """Per-step statistics of the gradient sources; all tensors, on the inputs' device.

    Nothing here is read on the host, so asking for stats never synchronises the device. ``norms``
    and ``cosine`` are derived from ``gram`` when first read (a few tiny ops that a caller who only
    wants the weights does not pay for).

    Attributes:
        weights: the K combination weights applied to the original sources (out = weights @ J).
        norms: the K per-source gradient norms.
        cosine: the K x K cosine-similarity matrix (0 where a source has zero norm).
        conflicts: the number of conflicting projections applied (int64 scalar; 0 for plain sums).
        gram: the K x K Gram matrix G = J J^T the weights were computed from.
    """

    __slots__ = ("weights", "conflicts", "gram", "_norms", "_cosine")

    def __init__(self, weights: Tensor, conflicts: Tensor, gram: Tensor):
        self.weights = weights
        self.conflicts = conflicts
        self.gram = gram
        self._norms: Tensor | None = None
        self._cosine: Tensor | None = None

    @property
    def norms(self) -> Tensor:
        if self._norms is None:
            self._norms = self.gram.diagonal().clamp_min(0).sqrt()
        return self._norms

    @property
    def cosine(self) -> Tensor:
        if self._cosine is None:
            norms = self.norms
            outer = norms[:, None] * norms[None, :]
            self._cosine = torch.where(outer > 0, self.gram / torch.where(outer > 0, outer, 1), 0)
        return self._cosine

    def __repr__(self) -> str:
        return f"AggregationStats(weights={self.weights}, conflicts={self.conflicts}, gram={self.gram})"


def stats_from_gram(gram: Tensor, weights: Tensor, conflicts: Tensor) -> AggregationStats:
    return AggregationStats(weights=weights, conflicts=conflicts, gram=gram)
