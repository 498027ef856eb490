"""The compiled CPU backend (``csrc/aggregation``): vectorised, cache-blocked, on every core.

torch's BLAS product is shaped badly for K x N x K and a separate ``isfinite`` pass costs a whole
read of J; the compiled passes read J exactly twice, reduce in float32 lanes folded into float64,
and leave non-finite values to show on the Gram diagonal.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _sources
from .._sources import Sources
from .base import Backend

try:
    from tolaria import _aggregation_cpu as _ext
except ImportError as exc:  # a broken install must be visible, not a silent slowdown
    _ext = None
    _IMPORT_ERROR: str | None = f"the compiled extension tolaria._aggregation_cpu did not load: {exc}"
else:
    _IMPORT_ERROR = None

_DTYPE_CODES = (
    {
        torch.float32: _ext.FLOAT32,
        torch.float64: _ext.FLOAT64,
        torch.bfloat16: _ext.BFLOAT16,
        torch.float16: _ext.FLOAT16,
    }
    if _ext is not None
    else {}
)


def _contiguous_rows(sources: Sources) -> list[Tensor]:
    # Each row must be contiguous in itself; rows may sit anywhere (strided matrix or separate tensors).
    return [r if r.is_contiguous() else r.contiguous() for r in sources.rows]


class CompiledCpuBackend(Backend):
    name = "cpu"

    def supports(self, sources: Sources) -> str | None:
        if _ext is None:
            return _IMPORT_ERROR
        if sources.device.type != "cpu":
            return f"the compiled CPU backend needs CPU tensors, got {sources.device}"
        if sources.dtype not in _DTYPE_CODES:
            return f"the compiled CPU backend does not handle {sources.dtype}"
        return None

    def gram(self, sources: Sources) -> Tensor:
        rows = _contiguous_rows(sources)
        g = torch.empty((sources.k, sources.k), dtype=torch.float64)
        _ext.gram(
            [r.data_ptr() for r in rows],
            sources.n,
            _DTYPE_CODES[sources.dtype],
            g.data_ptr(),
            torch.get_num_threads(),
        )
        return g

    def combine(self, sources: Sources, weights: Tensor, out: Tensor | None) -> Tensor:
        return self.combine_checked(sources, weights, out)[0]

    def combine_checked(self, sources: Sources, weights: Tensor, out: Tensor | None) -> tuple[Tensor, bool]:
        # The pass itself reports whether every sum was finite: no second read of the output.
        rows = _contiguous_rows(sources)
        w = weights.to(device="cpu", dtype=torch.float64).contiguous()
        if w.shape != (sources.k,):
            raise ValueError(f"combine needs {sources.k} weights, got shape {tuple(w.shape)}")
        if out is None:
            out = torch.empty(sources.n, dtype=sources.dtype)
        else:
            _sources.check_out(out, sources)
        finite = _ext.combine(
            [r.data_ptr() for r in rows],
            sources.n,
            _DTYPE_CODES[sources.dtype],
            w.data_ptr(),
            out.data_ptr(),
            torch.get_num_threads(),
        )
        return out.view(-1), bool(finite)
