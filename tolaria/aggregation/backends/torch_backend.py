"""The plain-PyTorch backend: the reference path, and the fallback for any device and layout.

It stacks separate rows into one matrix (a copy) and widens bf16/fp16 to float32 (another copy);
the compiled CPU and Triton backends avoid both.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._sources import Sources
from .base import Backend, accumulation_dtype

__all__ = ["TorchBackend"]


# Columns converted to float64 at a time by the Gram pass and the wide combine: a few hundred KiB
# per row chunk.
_FLOAT64_CHUNK = 1 << 14


class TorchBackend(Backend):
    name = "torch"

    def supports(self, sources: Sources) -> str | None:
        return None

    def gram(self, sources: Sources) -> Tensor:
        # The reference path: products and sums in float64 whatever the dtype (a float32 product of a
        # K x N matrix loses the accuracy ill-conditioned weightings need, e.g. near-opposite sources),
        # converted a column chunk at a time so that no float64 copy of J is ever made.
        j = sources.stacked()
        if j.dtype == torch.float64:
            return j @ j.T
        g = torch.zeros((j.shape[0], j.shape[0]), dtype=torch.float64, device=j.device)
        for start in range(0, j.shape[1], _FLOAT64_CHUNK):
            chunk = j[:, start : start + _FLOAT64_CHUNK].to(torch.float64)
            g.addmm_(chunk, chunk.T)
        return g

    def combine(self, sources: Sources, weights: Tensor, out: Tensor | None, *, wide: bool = False) -> Tensor:
        acc = accumulation_dtype(sources.dtype, wide)
        j = sources.stacked()
        w = weights.to(device=j.device, dtype=acc)
        if acc == j.dtype or acc == torch.float32:  # float32 lanes as before: one product
            result = w @ j.to(acc)
            if out is None:
                return result.to(sources.dtype)
            return out.view(-1).copy_(result)
        # Wide: float64 a column chunk at a time, each rounded once into the output.
        flat = torch.empty(j.shape[1], dtype=sources.dtype, device=j.device) if out is None else out.view(-1)
        for start in range(0, j.shape[1], _FLOAT64_CHUNK):
            flat[start : start + _FLOAT64_CHUNK] = w @ j[:, start : start + _FLOAT64_CHUNK].to(acc)
        return flat
