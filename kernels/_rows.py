"""How K gradient rows sit in memory, as the kernels address them, and per-device launch facts.

A kernel sees one base pointer and, for row r, an element offset from it: either ``r * row_stride``
(one K x N matrix, rows at any stride) or ``table[r] * align`` (K separate tensors anywhere in
memory; ``table`` is a small int64 tensor on the rows' device). Either way nothing is stacked or
copied. Element ``c`` of a row sits ``c * col_stride`` further on; ``col_stride == 1`` is passed to
the kernels as a compile-time flag so their loads are vectorised. The kernels share this addressing
through Triton helpers: ``row_offsets`` (rows to offsets), ``load_row`` (one row's columns) and
``load_row_at`` (row r's columns in the accumulator's dtype, J passed as two tuples: the
runtime ``src`` and the constexpr ``LAYOUT``, two arguments instead of eight). The kernels take
``LAYOUT`` = (USE_TABLE, ALIGN, COL_CONTIGUOUS) as one constexpr argument (``Rows.layout()``); ``n``
stays a scalar argument of its own, so its specialisation (or ``do_not_specialize``) is unchanged.

Row tables are built without synchronising the device (a pinned host tensor, copied with
``non_blocking=True``) and cached per set of row offsets, so a training loop that aggregates the
same tensors every step builds its table once. A CUDA graph captures the cached table's address:
a table used during capture is kept for the life of the process (never evicted), and a table that
does not exist yet cannot be built during capture (one eager call first, as for any warm-up).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "accumulator_dtype",
    "check_block_n",
    "interpreted",
    "INTERPRETED",
    "device_problem",
    "check_device",
    "multiprocessor_count",
    "row_offsets",
    "load_row",
    "widen",
    "load_row_at",
    "block_columns",
    "Rows",
    "as_rows",
]

_TABLE_CACHE_SIZE = 32
_tables: OrderedDict[tuple, Tensor] = OrderedDict()
_captured_tables: dict[tuple, Tensor] = {}
_tables_lock = threading.Lock()


# Triton decides at decoration time whether a kernel is compiled or interpreted; the kernel modules
# report which happened through this.
def interpreted() -> bool:
    """True when the kernels were decorated under ``TRITON_INTERPRET=1`` (they then run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    @triton.jit
    def _probe():
        pass

    return isinstance(_probe, InterpretedFunction)


INTERPRETED = interpreted()


def device_problem(device: torch.device, what: str) -> str | None:
    """Why the kernels cannot run on ``device`` in this process (``what`` names its tensors), or None."""
    if INTERPRETED:
        if device.type != "cpu":
            return (
                f"{what} is on {device}, but the Triton kernels were loaded under TRITON_INTERPRET=1, "
                "where they run on CPU tensors only; unset TRITON_INTERPRET to run them on the GPU"
            )
    elif device.type != "cuda":
        return (
            f"{what} is on {device}; the Triton kernels run on CUDA tensors (or on CPU tensors when "
            "TRITON_INTERPRET=1 is set before tolaria.kernels is imported)"
        )
    return None


def check_block_n(block_n: int) -> int:
    """A kernel's column block: a power of two >= 16 (the tile shapes assume it)."""
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    return block_n


def accumulator_dtype(dtype: torch.dtype, *, wide: bool = False) -> Any:
    """The kernels' accumulator: float64 for float64 rows (or ``wide``), float32 otherwise."""
    return tl.float64 if wide or dtype == torch.float64 else tl.float32


def check_device(device: torch.device, what: str) -> None:
    """Raises unless ``device`` is one the kernels can run on in this process."""
    problem = device_problem(device, what)
    if problem is not None:
        raise ValueError(problem)


@cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small fixed number under the interpreter)."""
    if device.type != "cuda":
        return 2
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def row_offsets(table_ptr, rows, mask, row_stride, USE_TABLE: tl.constexpr, ALIGN: tl.constexpr):
    """Element offsets of ``rows`` from the base pointer (int64), known multiples of ALIGN."""
    if USE_TABLE:
        return tl.load(table_ptr + rows, mask=mask, other=0) * ALIGN
    else:
        return tl.cast(rows, tl.int64) * row_stride * ALIGN


@triton.jit
def load_row(row_ptr, cols, col_stride, n, COL_CONTIGUOUS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Elements ``cols`` of the row starting at ``row_ptr`` (zeros past ``n`` when MASK_COLS)."""
    if COL_CONTIGUOUS:
        ptrs = row_ptr + cols
    else:
        ptrs = row_ptr + cols * col_stride
    if MASK_COLS:
        return tl.load(ptrs, mask=cols < n, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def widen(x, ACC_DTYPE: tl.constexpr):
    """``x`` in the accumulator's dtype; 16-bit values reach a float64 accumulator through float32 (exact)."""
    if tl.float64 == ACC_DTYPE and x.dtype != tl.float64:
        return x.to(tl.float32).to(ACC_DTYPE)
    return x.to(ACC_DTYPE)


@triton.jit
def block_columns(BLOCK_N: tl.constexpr):
    """(start, cols): program p's BLOCK_N columns from ``start = p * BLOCK_N``, in int64 (N may pass 2^31)."""
    start = tl.cast(tl.program_id(0), tl.int64) * BLOCK_N
    return start, start + tl.arange(0, BLOCK_N)


@triton.jit
def load_row_at(src, LAYOUT: tl.constexpr, row, cols, MASK_COLS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Elements ``cols`` of row ``row`` in ACC_DTYPE (zeros past n when MASK_COLS), J given as a kernel
    passes it: ``src`` = (base_ptr, table_ptr, row_stride, col_stride, n) and ``LAYOUT`` = (USE_TABLE,
    ALIGN, COL_CONTIGUOUS), a constexpr tuple so that the helpers stay specialised on it."""
    base_ptr, table_ptr, row_stride, col_stride, n = src
    USE_TABLE: tl.constexpr = LAYOUT[0]
    ALIGN: tl.constexpr = LAYOUT[1]
    COL_CONTIGUOUS: tl.constexpr = LAYOUT[2]
    off = row_offsets(table_ptr, row, True, row_stride, USE_TABLE, ALIGN)
    return widen(load_row(base_ptr + off, cols, col_stride, n, COL_CONTIGUOUS, MASK_COLS), ACC_DTYPE)


@dataclass(frozen=True)
class Rows:
    """K rows of N elements as the kernels address them (see the module docstring).

    Row r starts at ``base + r * row_stride`` (``table`` None) or at ``base + table[r] * align``;
    ``align`` (a power of two up to 16) divides every row offset, in elements, and is passed to the
    kernels as a constant so that they know rows stay 16-byte aligned when they do. ``keep`` holds
    every tensor the kernels will read, so none is freed while in use.
    """

    base: Tensor
    k: int
    n: int
    row_stride: int
    col_stride: int
    table: Tensor | None
    align: int
    keep: tuple[Tensor, ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    def kernel_args(self) -> tuple:
        """(base, table, row_stride / align, col_stride) for a launch; the table slot holds base when unused."""
        if self.table is not None:
            return (self.base, self.table, 0, self.col_stride)
        return (self.base, self.base, self.row_stride // self.align, self.col_stride)

    def layout(self) -> dict[str, Any]:
        """The kernels' compile-time flags for these rows as their one constexpr argument:
        ``LAYOUT`` = (USE_TABLE, ALIGN, COL_CONTIGUOUS)."""
        return dict(LAYOUT=(self.table is not None, self.align, self.col_stride == 1))

    def output(self, out: Tensor | None) -> Tensor:
        """A fresh N-tensor in the rows' dtype on their device, or ``out`` once checked to be one (contiguous)."""
        if out is None:
            return torch.empty(self.n, dtype=self.dtype, device=self.device)
        if out.numel() != self.n or out.dtype != self.dtype or out.device != self.device or not out.is_contiguous():
            raise ValueError(
                f"out must be a contiguous {self.n} x {self.dtype} tensor on {self.device}, got "
                f"{out.numel()} x {out.dtype} on {out.device}"
            )
        return out


def _alignment(offsets: Sequence[int]) -> int:
    """The largest power of two up to 16 dividing every offset (in elements)."""
    g = 0
    for o in offsets:
        g = math.gcd(g, o)
    if g == 0:
        return 16
    return min(16, g & -g)


def _row_table(offsets: tuple[int, ...], device: torch.device) -> Tensor:
    key = (str(device), offsets)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    with _tables_lock:
        table = _captured_tables.get(key)
        if table is None:
            table = _tables.get(key)
            if table is not None:
                _tables.move_to_end(key)
        if table is not None:
            if capturing:  # the graph keeps this address: never evict it
                _tables.pop(key, None)
                _captured_tables[key] = table
            return table
    if capturing:
        raise RuntimeError(
            "the Triton kernels got separate row tensors during CUDA-graph capture at addresses they have "
            "not seen before; run the same call once eagerly before capturing (it builds the row table "
            "the graph will use), or pass one K x N tensor"
        )
    if device.type == "cuda":
        host = torch.tensor(offsets, dtype=torch.int64, pin_memory=True)
        table = host.to(device, non_blocking=True)  # no sync: the pinned block outlives the copy
    else:
        table = torch.tensor(offsets, dtype=torch.int64)
    with _tables_lock:
        _tables[key] = table
        while len(_tables) > _TABLE_CACHE_SIZE:
            _tables.popitem(last=False)
    return table


def as_rows(x: Tensor | Sequence[Tensor], what: str = "the gradients") -> Rows:
    """Describes ``x`` (a K x N tensor, or K tensors of N elements each) for the kernels; copies nothing
    unless one of K separate rows has a column stride different from the others (that row is made
    contiguous)."""
    if isinstance(x, Tensor):
        if x.dim() != 2:
            raise ValueError(f"{what} must be a K x N tensor, got shape {tuple(x.shape)}")
        k, n = x.shape
        if k == 0 or n == 0:
            raise ValueError(f"{what} are empty: shape {tuple(x.shape)}")
        check_device(x.device, what)
        row_stride = x.stride(0) if k > 1 else 0
        return Rows(
            base=x,
            k=k,
            n=n,
            row_stride=row_stride,
            col_stride=x.stride(1) if n > 1 else 1,
            table=None,
            align=_alignment([row_stride]),
            keep=(x,),
        )
    rows = [r.reshape(-1) for r in x]
    if not rows:
        raise ValueError(f"{what}: no rows (K = 0)")
    first = rows[0]
    n = first.numel()
    if n == 0:
        raise ValueError(f"{what} are empty: row 0 has no elements")
    check_device(first.device, what)
    for i, r in enumerate(rows[1:], start=1):
        if r.numel() != n or r.dtype != first.dtype or r.device != first.device:
            raise ValueError(
                f"{what}: row {i} is {r.numel()} x {r.dtype} on {r.device}, "
                f"but row 0 is {n} x {first.dtype} on {first.device}"
            )
    strides = {r.stride(0) for r in rows} if n > 1 else {1}
    if len(strides) > 1:  # one column stride for all rows: mixed ones are rare, copy the odd rows
        rows = [r if r.stride(0) == 1 else r.contiguous() for r in rows]
        strides = {1}
    col_stride = strides.pop()
    size = first.element_size()
    base = rows[0]
    byte_offsets = [r.data_ptr() - base.data_ptr() for r in rows]
    bad = [i for i, b in enumerate(byte_offsets) if b % size]
    if bad:
        raise ValueError(f"{what}: row(s) {bad} are not aligned to their {size}-byte elements")
    offsets = [b // size for b in byte_offsets]
    k = len(rows)
    step = offsets[1] if k > 1 else 0
    if all(o == i * step for i, o in enumerate(offsets)):  # evenly spaced (e.g. views of one buffer)
        return Rows(base, k, n, step, col_stride, None, _alignment([step]), tuple(rows))
    align = _alignment(offsets)
    table = _row_table(tuple(o // align for o in offsets), base.device)
    return Rows(base, k, n, 0, col_stride, table, align, tuple(rows) + (table,))
