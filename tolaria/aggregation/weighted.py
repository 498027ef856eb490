"""Fixed-weight aggregators: ``Weighted``, ``Mean`` and ``Sum``.

They need no Gram matrix to decide their weights: a call without stats reads J once (the combine
pass) and checks finiteness on the result; with stats, the Gram pass runs too and feeds them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._weights import DeviceCopies, as_weight_vector, check_weight_count
from .aggregator import Aggregator
from .engine import Weights


def _weight_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # as the engine's K x K work


def _no_conflicts(gram: Tensor) -> Tensor:
    return torch.zeros((), dtype=torch.int64, device=gram.device)


class Weighted(Aggregator):
    """out = sum_k weights[k] * g_k, with weights fixed at construction (one per source)."""

    def __init__(self, weights: Sequence[float] | Tensor, *, backend: str = "auto", nonfinite: str = "raise"):
        super().__init__(backend=backend, nonfinite=nonfinite)
        self.weights = as_weight_vector(weights, "Weighted")
        self._copies = DeviceCopies(self.weights)

    def _check_k(self, k: int) -> None:
        check_weight_count(self.weights, k, "Weighted")

    def weighting(self, gram: Tensor) -> Weights:
        return Weights(self._copies.like(gram), _no_conflicts(gram))

    def _fixed_weights(self, k: int, device: torch.device) -> Tensor:
        return self._copies.like(torch.empty(0, dtype=_weight_dtype(device), device=device))

    def __repr__(self) -> str:
        return f"Weighted(weights={self.weights.tolist()}, backend={self.backend!r}, nonfinite={self.nonfinite!r})"


class Mean(Aggregator):
    """out = (1 / K) sum_k g_k."""

    def weighting(self, gram: Tensor) -> Weights:
        k = gram.shape[0]
        return Weights(torch.full((k,), 1.0 / k, dtype=gram.dtype, device=gram.device), _no_conflicts(gram))

    def _fixed_weights(self, k: int, device: torch.device) -> Tensor:
        return torch.full((k,), 1.0 / k, dtype=_weight_dtype(device), device=device)


class Sum(Aggregator):
    """out = sum_k g_k."""

    def weighting(self, gram: Tensor) -> Weights:
        k = gram.shape[0]
        return Weights(torch.ones(k, dtype=gram.dtype, device=gram.device), _no_conflicts(gram))

    def _fixed_weights(self, k: int, device: torch.device) -> Tensor:
        return torch.ones(k, dtype=_weight_dtype(device), device=device)
