"""The peak tensor memory of a piece of work, on the CPU as on CUDA.

CUDA has the caching allocator's counters (``torch.cuda.max_memory_allocated``). The CPU has none,
so there the work runs under ``torch.profiler`` with ``profile_memory=True``: every tensor
allocation and free becomes one memory event (bytes, signed) with a timestamp, and the peak is the
largest running sum of those events in time order. It counts what was allocated (and not yet
freed) since the measurement began: build the model, optimizer and buffers inside the measured
function to count them too. The profiler slows the work down: time it separately.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

_MEMORY_EVENT = "[memory]"


def _cpu_peak(prof: torch.profiler.profile) -> int:
    # The raw event list: the FunctionEvent view attributes allocations to enclosing ops (counted
    # once per nesting level) and frees to no op, so its sums are not the live bytes.
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is None:
        raise RuntimeError(
            f"torch {torch.__version__}'s profiler has no kineto_results, so the CPU peak memory cannot be read; "
            "measure on CUDA (torch.cuda.max_memory_allocated) or update tolaria.trainer.peak_memory"
        )
    events = sorted(
        ((e.start_ns(), e.nbytes()) for e in results.events() if e.name() == _MEMORY_EVENT), key=lambda t: t[0]
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure_peak_memory(fn: Callable[[], T], device: torch.device | str = "cpu") -> tuple[T, int]:
    """Runs ``fn()``; returns its result and the peak bytes of tensor memory allocated during it
    on ``device`` (beyond what was live when it started)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - base
    if device.type != "cpu":
        raise ValueError(f"peak memory is measured on cpu or cuda devices, not {device}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    return result, _cpu_peak(prof)


__all__ = ["measure_peak_memory"]
