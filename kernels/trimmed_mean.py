"""TrimmedMean (Yin et al. 2018): per column, the mean of the K values less the ``trim`` smallest and
``trim`` largest, in one pass (Triton kernel + torch facade).

Each program loads a BLOCK_N x KP tile (its columns by the K rows, KP the next power of two, padded
with keys above every value), turns the values into integer keys of the total order -inf < ... < -0 <
+0 < ... < +inf < NaN (every NaN made one positive quiet NaN, then negative values' magnitude bits
flipped), sorts each column's keys in registers (``tl.sort``), and sums the kept ranks trim .. K -
trim - 1 in ascending order in float32 (float64 for float64 rows), then divides by their count with a
correctly rounded division: the same arithmetic, in the same order, as the compiled CPU kernel
(csrc/aggregation/coordinatewise.h) and the torch reference
(tolaria.aggregation.backends.coordinatewise), so every backend returns the same bits. With ``check``,
a one-element int32 flag records whether some input value was NaN or inf.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._rows import INTERPRETED, accumulator_dtype, as_rows, block_columns, check_block_n, row_offsets

MAX_K = 256  # the tile holds every row of BLOCK_N columns in registers


@triton.jit
def _divide(a, b):
    if a.dtype == tl.float32:
        return tl.math.div_rn(a, b)  # plain `/` is approximate for float32 on the GPU
    return a / b


@triton.jit(do_not_specialize=["n", "k", "trim"])
def _trimmed_mean_kernel(
    base_ptr,
    table_ptr,
    row_stride,
    col_stride,
    n,
    k,
    trim,
    flag_ptr,
    out_ptr,
    BLOCK_N: tl.constexpr,
    KP: tl.constexpr,
    LAYOUT: tl.constexpr,
    CHECK: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    USE_TABLE: tl.constexpr = LAYOUT[0]
    ALIGN: tl.constexpr = LAYOUT[1]
    COL_CONTIGUOUS: tl.constexpr = LAYOUT[2]
    _, cols = block_columns(BLOCK_N)
    ranks = tl.arange(0, KP)
    real = ranks < k
    offs = row_offsets(table_ptr, ranks, real, row_stride, USE_TABLE, ALIGN)
    if COL_CONTIGUOUS:
        ptrs = base_ptr + offs[None, :] + cols[:, None]
    else:
        ptrs = base_ptr + offs[None, :] + cols[:, None] * col_stride
    mask = real[None, :] & (cols < n)[:, None]
    x = tl.load(ptrs, mask=mask, other=0.0)
    if tl.float64 == ACC_DTYPE:
        x = x.to(tl.float64)
        bits = x.to(tl.int64, bitcast=True)
        bits = tl.where(x != x, 0x7FF8000000000000, bits)  # noqa: PLR0124 (NaN)
        keys = bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)
        keys = tl.where(real[None, :], keys, 0x7FFFFFFFFFFFFFFF)
    else:
        x = x.to(tl.float32)
        bits = x.to(tl.int32, bitcast=True)
        bits = tl.where(x != x, 0x7FC00000, bits)  # noqa: PLR0124 (NaN)
        keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        keys = tl.where(real[None, :], keys, 0x7FFFFFFF)  # padding: above NaN's key
    if CHECK:
        bad = tl.where(mask, x * 0.0, 0.0) != 0  # NaN where x is NaN or inf
        tl.atomic_max(flag_ptr, tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0))
    keys = tl.sort(keys, dim=1)
    if tl.float64 == ACC_DTYPE:
        values = (keys ^ ((keys >> 63) & 0x7FFFFFFFFFFFFFFF)).to(tl.float64, bitcast=True)
    else:
        values = (keys ^ ((keys >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    acc = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for r in range(trim, k - trim):  # ascending: one rank at a time, each picked out exactly
        acc += tl.sum(tl.where(ranks[None, :] == r, values, 0.0), axis=1)
    count = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE) + (k - 2 * trim)
    mean = _divide(acc, count)
    out_ty = out_ptr.dtype.element_ty
    if tl.float64 == ACC_DTYPE or out_ty == tl.float32:
        result = mean.to(out_ty)
    else:
        result = mean.to(out_ty, fp_downcast_rounding="rtne")
    tl.store(out_ptr + cols, result, mask=cols < n)


def trimmed_mean(
    x: Tensor | Sequence[Tensor],
    trim: int,
    *,
    out: Tensor | None = None,
    check: bool = False,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Per column of J (a K x N tensor, rows at any stride, or K tensors of N elements, never stacked),
    the mean of the K values less the ``trim`` smallest and ``trim`` largest (K > 2 trim, K <= 256).
    Returns the flat N-tensor in J's dtype (written into ``out`` when given) and, with ``check``, a
    one-element int32 tensor that is 1 when some input value was NaN or inf (else None)."""
    rows = as_rows(x)
    if isinstance(trim, bool) or not isinstance(trim, int) or trim < 0:
        raise ValueError(f"trim must be a non-negative integer, got {trim!r}")
    if rows.k <= 2 * trim:
        raise ValueError(f"trimming {trim} values from each end needs more than {2 * trim} rows, got {rows.k}")
    if rows.k > MAX_K:
        raise ValueError(f"the Triton TrimmedMean kernel takes at most {MAX_K} rows, got {rows.k}")
    out = rows.output(out)
    kp = triton.next_power_of_2(max(rows.k, 2))
    if block_n is None:
        block_n = 32 if INTERPRETED else max(16, min(256, 4096 // kp))
    check_block_n(block_n)
    flag = torch.zeros(1, dtype=torch.int32, device=rows.device) if check else None
    acc_dtype = accumulator_dtype(rows.dtype)
    _trimmed_mean_kernel[(triton.cdiv(rows.n, block_n),)](
        *rows.kernel_args(),
        rows.n,
        rows.k,
        trim,
        flag if flag is not None else out,
        out,
        BLOCK_N=block_n,
        KP=kp,
        **rows.layout(),
        CHECK=check,
        ACC_DTYPE=acc_dtype,
        num_warps=1 if INTERPRETED else 4,
    )
    return out.view(-1), flag


__all__ = ["MAX_K", "trimmed_mean"]
