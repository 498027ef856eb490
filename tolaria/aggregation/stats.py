"""What an aggregation reports about its sources, read off the Gram matrix at no extra pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AggregationStats:
    """Per-step statistics of the gradient sources; all tensors, on the inputs' device.

    Nothing here is read on the host, so asking for stats never synchronises the device.

    Attributes:
        weights: the K combination weights applied to the original sources (out = weights @ J).
        norms: the K per-source gradient norms.
        cosine: the K x K cosine-similarity matrix (0 where a source has zero norm).
        conflicts: the number of conflicting projections applied (int64 scalar; 0 for plain sums).
        gram: the K x K Gram matrix G = J J^T the weights were computed from.
    """

    weights: Tensor
    norms: Tensor
    cosine: Tensor
    conflicts: Tensor
    gram: Tensor


def stats_from_gram(gram: Tensor, weights: Tensor, conflicts: Tensor) -> AggregationStats:
    norms = gram.diagonal().clamp_min(0).sqrt()
    outer = norms[:, None] * norms[None, :]
    cosine = torch.where(outer > 0, gram / torch.where(outer > 0, outer, 1), 0)
    return AggregationStats(weights=weights, norms=norms, cosine=cosine, conflicts=conflicts, gram=gram)
