"""out = w^T J: one weighted sum of K gradient rows, in one pass (Triton kernel + torch facade).

Each program owns BLOCK_N columns: it walks the K rows up to four at a time (the loads of a group
are issued together, two 16-byte loads per thread and row), accumulates in float32 (float64 for
float64 rows) and writes its columns once, in the rows' dtype, into a fresh tensor or straight into
a given flat buffer (e.g. the one whose views are the parameters' ``.grad``). With fewer than four
rows the blocks are wider, so that every thread still keeps about 128 bytes of loads in flight.
Weights are read on the device: nothing is synchronised. Full column blocks are unmasked, so their
loads stay vectorised whatever N is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._rows import INTERPRETED, Rows, accumulator_dtype, as_rows, block_columns, check_block_n, load_row_at

MAX_ROWS_PER_GROUP = 4


@triton.jit
def _add_row(acc, src, LAYOUT: tl.constexpr, w_ptr, row, cols, MASK_COLS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    w = tl.load(w_ptr + row).to(ACC_DTYPE)
    return acc + w * load_row_at(src, LAYOUT, row, cols, MASK_COLS, ACC_DTYPE)


@triton.jit
def _weighted_rows(
    src,
    LAYOUT: tl.constexpr,
    k,
    w_ptr,
    cols,
    ROWS: tl.constexpr,
    MASK_COLS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    acc = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    k_groups = (k // ROWS) * ROWS
    for g in range(0, k_groups, ROWS):  # ROWS rows per step, their loads issued together
        for r in tl.static_range(ROWS):
            acc = _add_row(acc, src, LAYOUT, w_ptr, g + r, cols, MASK_COLS, ACC_DTYPE)
    for row in range(k_groups, k):  # the remaining k % ROWS rows
        acc = _add_row(acc, src, LAYOUT, w_ptr, row, cols, MASK_COLS, ACC_DTYPE)
    return acc


@triton.jit
def _to_output(acc, out_ty: tl.constexpr):
    # A float64 sum (wide) reaches a 16-bit output through float32, as the CPU passes do (a direct
    # float64 -> bfloat16 conversion is not supported everywhere, the interpreter included).
    if acc.dtype == tl.float64 and out_ty != tl.float64:
        if out_ty == tl.float32:
            return acc.to(out_ty)
        return acc.to(tl.float32).to(out_ty, fp_downcast_rounding="rtne")
    return acc.to(out_ty)


@triton.jit(do_not_specialize=["n", "k"])
def _combine_kernel(
    base_ptr,
    table_ptr,
    row_stride,
    col_stride,
    n,
    k,
    w_ptr,
    out_ptr,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    LAYOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    start, cols = block_columns(BLOCK_N)
    out_ty = out_ptr.dtype.element_ty
    src = (base_ptr, table_ptr, row_stride, col_stride, n)
    if start + BLOCK_N <= n:  # a full block: compiled without a column mask
        acc = _weighted_rows(src, LAYOUT, k, w_ptr, cols, ROWS, False, ACC_DTYPE, BLOCK_N)
        tl.store(out_ptr + cols, _to_output(acc, out_ty))
    else:
        acc = _weighted_rows(src, LAYOUT, k, w_ptr, cols, ROWS, True, ACC_DTYPE, BLOCK_N)
        tl.store(out_ptr + cols, _to_output(acc, out_ty), mask=cols < n)


def _config(rows: Rows, group: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps): two 16-byte loads per thread and row, times 4 / group rows."""
    if INTERPRETED:
        return 64, 1
    per_thread = 32 // rows.base.element_size() * (MAX_ROWS_PER_GROUP // group)
    return 128 * per_thread, 4


def combine(
    x: Tensor | Sequence[Tensor],
    weights: Tensor,
    *,
    out: Tensor | None = None,
    block_n: int | None = None,
    wide: bool = False,
) -> Tensor:
    """Returns the flat N-tensor ``weights @ J`` in J's dtype (float32 accumulation; float64 for
    float64 rows or with ``wide``, for weights whose terms cancel), for J a K x N tensor (rows at any stride)
    or K tensors of N elements (never
    stacked). ``weights`` is a K-vector of any float dtype on J's device. With ``out`` (a contiguous
    tensor of N elements, J's dtype and device) the result is written there and ``out`` is returned
    as a flat view.
    """
    rows = as_rows(x)
    if not isinstance(weights, Tensor) or weights.shape != (rows.k,):
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"combine needs a tensor of {rows.k} weights, got {shape}")
    if weights.device != rows.device:
        raise ValueError(f"weights are on {weights.device}, the rows on {rows.device}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be floating point, got {weights.dtype}")
    if out is None:
        out = torch.empty(rows.n, dtype=rows.dtype, device=rows.device)
    else:
        if out.numel() != rows.n or out.dtype != rows.dtype or out.device != rows.device:
            raise ValueError(
                f"out is {out.numel()} x {out.dtype} on {out.device}; the rows are "
                f"{rows.n} x {rows.dtype} on {rows.device}"
            )
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
    group = min(rows.k, MAX_ROWS_PER_GROUP)
    cfg_block_n, num_warps = _config(rows, group)
    block_n = block_n or cfg_block_n
    check_block_n(block_n)
    w = weights if weights.is_contiguous() else weights.contiguous()
    acc_dtype = accumulator_dtype(rows.dtype, wide=wide)
    _combine_kernel[(triton.cdiv(rows.n, block_n),)](
        *rows.kernel_args(),
        rows.n,
        rows.k,
        w,
        out,
        BLOCK_N=block_n,
        ROWS=group,
        **rows.layout(),
        ACC_DTYPE=acc_dtype,
        num_warps=num_warps,
    )
    return out.view(-1)


__all__ = ["combine"]
