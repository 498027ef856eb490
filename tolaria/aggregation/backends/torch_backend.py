"""The plain-PyTorch backend: the reference path, and the fallback for any device and layout.

It stacks separate rows into one matrix (a copy) and widens bf16/fp16 to float32 (another copy);
the compiled CPU and Triton backends avoid both.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._sources import Sources
from .base import Backend, accumulation_dtype


class TorchBackend(Backend):
    name = "torch"

    def supports(self, sources: Sources) -> str | None:
        return None

    def gram(self, sources: Sources) -> Tensor:
        # The reference path: products and sums in float64 whatever the dtype (a float32 product of a
        # K x N matrix loses the accuracy ill-conditioned weightings need, e.g. near-opposite sources).
        j = sources.stacked().to(torch.float64)
        return j @ j.T

    def combine(self, sources: Sources, weights: Tensor, out: Tensor | None, *, wide: bool = False) -> Tensor:
        acc = accumulation_dtype(sources.dtype, wide)
        j = sources.stacked().to(acc)
        result = weights.to(device=j.device, dtype=acc) @ j
        if out is None:
            return result.to(sources.dtype)
        return out.view(-1).copy_(result)
