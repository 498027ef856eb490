"""The compiled CPU backend (``csrc/aggregation``): vectorised, cache-blocked, on torch's threads.

torch's BLAS product is shaped badly for K x N x K and a separate ``isfinite`` pass costs a whole
read of J; the compiled passes read J exactly twice, reduce in float32 lanes folded into float64,
and leave non-finite values to show on the Gram diagonal.

The kernels are compiled once per CPU ISA level (``avx512``, ``avx2``, ``baseline`` on x86-64;
``neon`` and ``baseline`` on aarch64), each with its own vector width; the widest level the CPU
supports runs, unless the environment variable ``TOLARIA_CPU_ISA`` (read at import) or
:func:`set_cpu_isa` forces another. They run on torch's intra-op OpenMP team and follow
``torch.set_num_threads``.
"""

from __future__ import annotations

import os

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

__all__ = ["CPU_ISA_ENV", "CompiledCpuBackend", "cpu_isa", "set_cpu_isa", "supported_cpu_isas"]

CPU_ISA_ENV = "TOLARIA_CPU_ISA"


def supported_cpu_isas() -> tuple[str, ...]:
    """The compiled ISA levels this CPU can run, widest first (empty without the compiled extension)."""
    return tuple(_ext.supported_isa_levels()) if _ext is not None else ()


def cpu_isa() -> str | None:
    """The ISA level the compiled CPU passes run now (``"avx512"``, ``"avx2"``, ``"baseline"``,
    ``"neon"``), or ``None`` when the compiled extension did not load (then only the torch backend runs)."""
    return _ext.isa() if _ext is not None else None


def set_cpu_isa(level: str) -> None:
    """Runs the compiled CPU passes at ``level`` from now on, in this process (as ``TOLARIA_CPU_ISA``
    does at import). Raises ``ValueError`` naming the valid levels if ``level`` is unknown or this CPU
    cannot run it, and ``RuntimeError`` if the compiled extension did not load."""
    if _ext is None:
        raise RuntimeError(f"cannot select a CPU ISA level: {_IMPORT_ERROR}")
    if not isinstance(level, str):
        raise TypeError(f"the CPU ISA level must be a string, got {type(level).__name__}")
    name = level.strip().lower()
    if name not in _ext.compiled_isa_levels():
        raise ValueError(
            f"unknown CPU ISA level {level!r}; valid levels are {', '.join(_ext.compiled_isa_levels())}"
            f" (this CPU runs {', '.join(supported_cpu_isas())})"
        )
    _ext.set_isa(name)  # raises ValueError naming the supported ones if the CPU lacks it


def _apply_isa_from_environment() -> None:
    requested = os.environ.get(CPU_ISA_ENV, "").strip()
    if not requested:
        return
    try:
        set_cpu_isa(requested)
    except (ValueError, RuntimeError) as exc:
        raise type(exc)(f"{CPU_ISA_ENV}={requested!r}: {exc}; unset it to use the widest supported level") from None


_apply_isa_from_environment()

if _ext is not None and not _ext.openmp_runtime():
    # torch without OpenMP (a native or TBB thread pool): the passes cannot join its team and will not
    # start threads of their own.
    import warnings

    warnings.warn(
        "tolaria: no OpenMP runtime is loaded in this process (torch was built without one), so the "
        "compiled CPU aggregation passes run on one thread",
        RuntimeWarning,
        stacklevel=2,
    )

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
    available = _ext is not None  # False: the extension did not load (see _IMPORT_ERROR)

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

    def combine(self, sources: Sources, weights: Tensor, out: Tensor | None, *, wide: bool = False) -> Tensor:
        return self.combine_checked(sources, weights, out, wide=wide)[0]

    def combine_checked(
        self, sources: Sources, weights: Tensor, out: Tensor | None, *, wide: bool = False
    ) -> tuple[Tensor, bool]:
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
            wide,
        )
        return out.view(-1), bool(finite)
