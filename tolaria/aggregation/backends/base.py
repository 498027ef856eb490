"""The seam every backend implements: one pass for the Gram matrix, one pass to combine."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from .._sources import Sources

__all__ = ["Backend", "accumulation_dtype"]


class Backend(ABC):
    """Computes the two passes over the K x N matrix J of an aggregation.

    ``gram`` returns G = J J^T (K x K, float32 or wider accumulation, on the sources' device);
    ``combine`` returns out = w^T J as a flat N-tensor in the sources' dtype, written into ``out``
    when given, accumulated in float32 for 16/32-bit sources, or in float64 and rounded once with
    ``wide=True`` (for weights whose terms cancel: see ``Aggregator.wide_combine``). Neither reads a
    value back to the host.
    """

    name: str

    @abstractmethod
    def supports(self, sources: Sources) -> str | None:
        """None when this backend can run on ``sources``; otherwise the reason it cannot."""

    @abstractmethod
    def gram(self, sources: Sources) -> Tensor: ...

    @abstractmethod
    def combine(self, sources: Sources, weights: Tensor, out: Tensor | None, *, wide: bool = False) -> Tensor: ...

    def combine_checked(
        self, sources: Sources, weights: Tensor, out: Tensor | None, *, wide: bool = False
    ) -> tuple[Tensor, bool]:
        """``combine``, and whether every element of the result is finite (read on the host)."""
        flat = self.combine(sources, weights, out, wide=wide)
        return flat, bool(torch.isfinite(flat).all())


def accumulation_dtype(dtype: torch.dtype, wide: bool = False) -> torch.dtype:
    """float64 stays float64 (and ``wide`` asks for it); every narrower dtype accumulates in float32."""
    return torch.float64 if wide or dtype == torch.float64 else torch.float32
