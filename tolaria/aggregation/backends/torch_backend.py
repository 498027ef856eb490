"""The plain-PyTorch backend: the reference path, and the fallback for any device and layout.

It stacks separate rows into one matrix (a copy) and widens bf16/fp16 to float32 (another copy);
the compiled CPU and Triton backends avoid both.
"""

from __future__ import annotations

from torch import Tensor

from .._sources import Sources
from .base import Backend, accumulation_dtype


class TorchBackend(Backend):
    name = "torch"

    def supports(self, sources: Sources) -> str | None:
        return None

    def gram(self, sources: Sources) -> Tensor:
        j = sources.stacked().to(accumulation_dtype(sources.dtype))
        return j @ j.T

    def combine(self, sources: Sources, weights: Tensor, out: Tensor | None) -> Tensor:
        acc = accumulation_dtype(sources.dtype)
        j = sources.stacked().to(acc)
        result = weights.to(device=j.device, dtype=acc) @ j
        if out is None:
            return result.to(sources.dtype)
        return out.view(-1).copy_(result)
