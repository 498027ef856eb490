"""GradDrop's combination (Chen et al. 2020, Algorithm 1 lines 10-15) in one pass (Triton kernel +
torch facade).

Each program owns BLOCK_N columns and walks the K rows twice (the second walk reads what the first
brought into cache): first s = sum_i x_i and a = sum_i |x_i|, then out = sum_i (kept ? 1 : leak_i) x_i,
where x_i is kept when x_i > 0 and s > (2u - 1) a, or x_i < 0 and s < (2u - 1) a (GradDrop's P > u,
resp. P < u, for P = (1 + s / a) / 2, with no division). Sums run in row order in float32 (float64
for float64 rows) and the result is written once in the rows' dtype. The uniform u of each column is
a counter-based hash of the column and the call's two keys, computed in registers: the same function
as the compiled CPU kernel (csrc/aggregation/coordinatewise.h) and the torch reference
(tolaria.aggregation.backends.coordinatewise.graddrop_uniforms), so every backend drops the same
entries for the same keys, and nothing random is stored. With ``check``, a one-element int32 flag
records whether some input value was NaN or inf (read it on the host only if you need it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._rows import INTERPRETED, accumulator_dtype, as_rows, block_columns, check_block_n, load_row_at


@triton.jit
def _lowbias32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _uniform(cols, key0, key1):
    """The column's uniform in [0, 1): two rounds of lowbias32, top 24 bits (exact in float32)."""
    lo = cols.to(tl.uint32)
    hi = (cols >> 32).to(tl.uint32)
    h = _lowbias32(lo ^ key0.to(tl.uint32))
    h = _lowbias32(h ^ hi ^ key1.to(tl.uint32))
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _graddrop_block(
    src,
    LAYOUT: tl.constexpr,
    k,
    drop,
    cols,
    MASK_COLS: tl.constexpr,
    USE_LEAK: tl.constexpr,
    CHECK: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    leak_ptr, flag_ptr, key0, key1 = drop
    s = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    a = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    bad = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for row in range(k):
        x = load_row_at(src, LAYOUT, row, cols, MASK_COLS, ACC_DTYPE)
        s += x
        a += tl.abs(x)
        if CHECK:
            bad += x * 0.0  # NaN where x is NaN or inf
    if CHECK:
        tl.atomic_max(flag_ptr, tl.max((bad != 0).to(tl.int32), axis=0))
    u = _uniform(cols, key0, key1).to(ACC_DTYPE)
    thr = (u * 2.0 - 1.0) * a
    up = s > thr
    down = s < thr
    acc = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for row in range(k):  # again: the rows are in cache now
        x = load_row_at(src, LAYOUT, row, cols, MASK_COLS, ACC_DTYPE)
        keep = ((x > 0.0) & up) | ((x < 0.0) & down)
        if USE_LEAK:
            lk = tl.load(leak_ptr + row).to(ACC_DTYPE)
            coef = tl.where(keep, 1.0, lk).to(ACC_DTYPE)
        else:
            coef = keep.to(ACC_DTYPE)
        acc += coef * x
    return acc


@triton.jit
def _to_output(acc, out_ty: tl.constexpr):
    if acc.dtype == tl.float64 or out_ty == tl.float32:
        return acc.to(out_ty)
    return acc.to(out_ty, fp_downcast_rounding="rtne")


@triton.jit(do_not_specialize=["n", "k", "key0", "key1"])
def _graddrop_kernel(
    base_ptr,
    table_ptr,
    row_stride,
    col_stride,
    n,
    k,
    leak_ptr,
    flag_ptr,
    key0,
    key1,
    out_ptr,
    BLOCK_N: tl.constexpr,
    LAYOUT: tl.constexpr,
    USE_LEAK: tl.constexpr,
    CHECK: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    start, cols = block_columns(BLOCK_N)
    out_ty = out_ptr.dtype.element_ty
    src = (base_ptr, table_ptr, row_stride, col_stride, n)
    drop = (leak_ptr, flag_ptr, key0, key1)  # what GradDrop adds to a weighted sum
    if start + BLOCK_N <= n:  # a full block: compiled without a column mask
        acc = _graddrop_block(src, LAYOUT, k, drop, cols, False, USE_LEAK, CHECK, ACC_DTYPE, BLOCK_N)
        tl.store(out_ptr + cols, _to_output(acc, out_ty))
    else:
        acc = _graddrop_block(src, LAYOUT, k, drop, cols, True, USE_LEAK, CHECK, ACC_DTYPE, BLOCK_N)
        tl.store(out_ptr + cols, _to_output(acc, out_ty), mask=cols < n)


def _check_keys(keys) -> tuple[int, int]:
    if (
        not isinstance(keys, (tuple, list))
        or len(keys) != 2
        or not all(isinstance(v, int) and 0 <= v < 2**31 for v in keys)
    ):
        raise ValueError(f"keys must be two integers in [0, 2^31), got {keys!r}")
    return int(keys[0]), int(keys[1])


def graddrop(
    x: Tensor | Sequence[Tensor],
    keys: tuple[int, int],
    *,
    leak: Tensor | None = None,
    out: Tensor | None = None,
    check: bool = False,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """GradDrop's combination of J (a K x N tensor, rows at any stride, or K tensors of N elements,
    never stacked) for one call's ``keys`` (two integers in [0, 2^31)); ``leak``: None or K values on
    J's device. Returns the flat N-tensor in J's dtype (written into ``out`` when given: contiguous, N
    elements, J's dtype and device) and, with ``check``, a one-element int32 tensor that is 1 when
    some input value was NaN or inf (else None). Reads nothing back to the host."""
    rows = as_rows(x)
    key0, key1 = _check_keys(keys)
    if leak is not None:
        if not isinstance(leak, Tensor) or leak.shape != (rows.k,) or not leak.is_floating_point():
            raise ValueError(f"leak must be a float tensor of {rows.k} values, got {leak!r}")
        if leak.device != rows.device:
            raise ValueError(f"leak is on {leak.device}, the rows on {rows.device}")
        leak = leak.contiguous()
    out = rows.output(out)
    if block_n is None:
        block_n = 64 if INTERPRETED else 1024
    check_block_n(block_n)
    flag = torch.zeros(1, dtype=torch.int32, device=rows.device) if check else None
    acc_dtype = accumulator_dtype(rows.dtype)
    _graddrop_kernel[(triton.cdiv(rows.n, block_n),)](
        *rows.kernel_args(),
        rows.n,
        rows.k,
        leak if leak is not None else rows.base,
        flag if flag is not None else out,
        key0,
        key1,
        out,
        BLOCK_N=block_n,
        **rows.layout(),
        USE_LEAK=leak is not None,
        CHECK=check,
        ACC_DTYPE=acc_dtype,
        num_warps=1 if INTERPRETED else 4,
    )
    return out.view(-1), flag


__all__ = ["graddrop"]
