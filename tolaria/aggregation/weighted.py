"""Fixed-weight aggregators: ``Weighted``, ``Mean`` and ``Sum``.

They need no Gram matrix to decide their weights: a call without stats reads J once (the combine
pass) and checks finiteness on the result; with stats, the Gram pass runs too and feeds them.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from ._weights import DeviceCopies, as_weight_vector, check_weight_count
from .aggregator import Aggregator
from .engine import Weights, has_float64

__all__ = ["Constant", "Mean", "Sum", "Weighted"]


def _weight_dtype(device: torch.device) -> torch.dtype:
    return torch.float64 if has_float64(device) else torch.float32  # as the engine's K x K work


class _FixedWeighting(Aggregator):
    """An aggregator whose weights ignore G: ``_fixed_weights`` alone defines it."""

    def weighting(self, gram: Tensor) -> Weights:
        weights = self._fixed_weights(gram.shape[0], gram.device).to(gram.dtype)
        return Weights(weights, torch.zeros((), dtype=torch.int64, device=gram.device))

    @abstractmethod
    def _fixed_weights(self, k: int, device: torch.device) -> Tensor:
        """The K weights, float64 on ``device`` (float32 on MPS)."""


class Weighted(_FixedWeighting):
    """out = sum_k weights[k] * g_k, with weights fixed at construction (one per source)."""

    promises = frozenset({"linear"})

    def __init__(self, weights: Sequence[float] | Tensor, *, backend: str = "auto", nonfinite: str = "raise"):
        super().__init__(backend=backend, nonfinite=nonfinite)
        self.weights = as_weight_vector(weights, "Weighted")
        self._copies = DeviceCopies(self.weights)

    def _check_k(self, k: int) -> None:
        check_weight_count(self.weights, k, "Weighted")

    def _fixed_weights(self, k: int, device: torch.device) -> Tensor:
        return self._copies.get(device, _weight_dtype(device))

    def __repr__(self) -> str:
        return f"Weighted(weights={self.weights.tolist()}, backend={self.backend!r}, nonfinite={self.nonfinite!r})"


class Constant(Weighted):
    """TorchJD's name for :class:`Weighted`: out = sum_k weights[k] * g_k, weights fixed."""

    def __repr__(self) -> str:
        return f"Constant(weights={self.weights.tolist()}, backend={self.backend!r}, nonfinite={self.nonfinite!r})"


class Mean(_FixedWeighting):
    """out = (1 / K) sum_k g_k."""

    promises = frozenset({"linear", "permutation"})

    def _fixed_weights(self, k: int, device: torch.device) -> Tensor:
        return torch.full((k,), 1.0 / k, dtype=_weight_dtype(device), device=device)


class Sum(_FixedWeighting):
    """out = sum_k g_k."""

    promises = frozenset({"linear", "permutation"})

    def _fixed_weights(self, k: int, device: torch.device) -> Tensor:
        return torch.ones(k, dtype=_weight_dtype(device), device=device)
