"""The Triton backend (``kernels/``, installed as ``tolaria.kernels``): the GPU hot path.

``gram`` reads J once and returns G in float64 straight from its reduction kernel (so the engine's
upcast is free); ``combine`` reads J once more and writes w^T J in J's dtype, into ``out`` when
given. Rows are addressed where they lie: a K x N matrix at any strides, or K separate tensors
through a small device table of row offsets; nothing is stacked or widened first. No step reads a
device value on the host, so the whole aggregation can be recorded into a CUDA graph.

Under ``TRITON_INTERPRET=1`` (set before ``tolaria.kernels`` is imported) the same kernels run on
CPU tensors, slowly; that is how CI checks them without a GPU.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from .._sources import Sources
from .base import Backend

__all__ = ["TritonBackend"]

try:
    from tolaria.kernels import _rows
    from tolaria.kernels.combine import combine as _combine
    from tolaria.kernels.gram import gram as _gram
except ImportError as exc:  # a broken install must be visible, not a silent slowdown
    _rows = None
    _IMPORT_ERROR: str | None = f"the Triton kernels (tolaria.kernels) did not load: {exc}"
else:
    _IMPORT_ERROR = None


def _operand(sources: Sources) -> Tensor | tuple[Tensor, ...]:
    return sources.matrix if sources.matrix is not None else sources.rows


class TritonBackend(Backend):
    """Gram and combine passes as Triton kernels.

    Args:
        deterministic: reduce the Gram matrix in two fixed-order stages, bitwise identical run to
            run (default); ``False`` uses float32 atomics (last-bit differences between runs).
            ``torch.use_deterministic_algorithms(True)`` forces the deterministic path. The engine
            uses :meth:`instance`; set ``TritonBackend.instance().deterministic = False`` to switch
            it to the atomic reduction.
    """

    name = "triton"
    _default: TritonBackend | None = None
    _lock = threading.Lock()

    def __init__(self, *, deterministic: bool = True):
        self.deterministic = bool(deterministic)

    @classmethod
    def instance(cls) -> TritonBackend:
        """The process-wide backend the engine uses (deterministic reductions)."""
        with cls._lock:
            if cls._default is None:
                cls._default = cls()
            return cls._default

    def supports(self, sources: Sources) -> str | None:
        return _IMPORT_ERROR or _rows.device_problem(sources.device, "the gradients")

    def _check(self, sources: Sources) -> None:
        reason = self.supports(sources)
        if reason is not None:
            raise ValueError(f"the Triton backend cannot run these gradients: {reason}")

    def gram(self, sources: Sources) -> Tensor:
        self._check(sources)
        return _gram(_operand(sources), deterministic=self.deterministic, out_dtype=torch.float64)

    def combine(self, sources: Sources, weights: Tensor, out: Tensor | None, *, wide: bool = False) -> Tensor:
        self._check(sources)
        return _combine(_operand(sources), weights, out=out, wide=wide)

    def __repr__(self) -> str:
        return f"TritonBackend(deterministic={self.deterministic})"
