"""Validation of user-given per-source weights, done once at construction on the host."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["as_weight_vector", "check_weight_count", "DeviceCopies"]


def as_weight_vector(weights: Sequence[float] | Tensor, owner: str) -> Tensor:
    """Returns ``weights`` as a 1-D float64 CPU tensor; raises on a bad shape, value or sum."""
    if isinstance(weights, Tensor):
        w = weights.detach().to(device="cpu", dtype=torch.float64)
    elif isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"{owner} weights must be a sequence of numbers or a tensor, got {type(weights).__name__}")
    else:
        for i, x in enumerate(weights):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise TypeError(f"{owner} weight {i} is a {type(x).__name__}, not a number")
        w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if w.dim() != 1 or w.numel() == 0:
        raise ValueError(f"{owner} weights must be a non-empty 1-D sequence, got shape {tuple(w.shape)}")
    bad = (~torch.isfinite(w)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{owner} weight(s) for source(s) {', '.join(map(str, bad))} are not finite")
    total = float(w.sum())
    if total < 0:
        raise ValueError(f"{owner} weights sum to {total}; the sum must not be negative")
    return w


def check_weight_count(weights: Tensor, k: int, owner: str) -> None:
    if weights.numel() != k:
        raise ValueError(f"{owner} has {weights.numel()} weights but got {k} gradient sources")


class DeviceCopies:
    """A host tensor with one copy per (device, dtype), made on first use.

    Copying from the host on every step would synchronise the device and could not be recorded into
    a CUDA graph; after the first call, a weighting only reads its cached copy.
    """

    def __init__(self, tensor: Tensor):
        self.tensor = tensor
        self._copies: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def get(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The copy on ``device`` in ``dtype``, made on the first call for that pair."""
        key = (device, dtype)
        copy = self._copies.get(key)
        if copy is None:
            copy = self._copies[key] = self.tensor.to(device=device, dtype=dtype)
        return copy

    def like(self, ref: Tensor) -> Tensor:
        """The copy on ``ref``'s device and dtype."""
        return self.get(ref.device, ref.dtype)
