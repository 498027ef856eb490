"""Gram matrix G = J J^T of K gradient rows in one pass over them (Triton kernel + torch facade).

The pass is memory bound: J is read exactly once and the K x K result is tiny, so what matters is
keeping enough bytes in flight. Each program owns all K rows of the column tiles it visits
(grid-stride over tiles of BLOCK_N columns, as many programs as fit on the GPU at once), streams the
tiles into shared memory with a software pipeline (16-byte asynchronous copies, several tiles ahead),
multiplies each tile by its own transpose on the tensor cores, and keeps one float32 accumulator in
registers. bf16/fp16 products are exact in float32; float32 rows use three TF32 products
("tf32x3"), which keeps float32 accuracy.

The tensor cores want at least 16 rows. Rather than pad K = 2, 4 or 8 rows with zeros (wasting most
of each tile), the kernel folds each row into R = 16 / K segments and treats every segment as a row
of its own: the tile is then 16 real rows, and G is the sum of the R diagonal K x K blocks of the
folded Gram matrix. Full tiles are loaded without a column mask, so their loads stay vectorised
whatever N is; only the last few tiles are masked.

Two ways to add up the programs' partial sums:

- deterministic (default): each program writes its K x K partial to a buffer and a second small
  kernel adds them in a fixed order, in float64. Bitwise identical run to run (for one device and
  one N), and G comes out symmetric.
- fast: each program adds its partial into a zeroed G with float32 atomics: no partials buffer, at
  the price of last-bit differences between runs.

K up to 128 runs as one block (J read once); larger K is cut into blocks of 128 rows, and each pair
of blocks is one launch (J is then read once per block pair). float64 rows take a CUDA-core path
(no float64 tensor-core dot is assumed), accumulate in float64, and always reduce deterministically.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._rows import (
    INTERPRETED,
    Rows,
    accumulator_dtype,
    as_rows,
    check_block_n,
    load_row,
    multiprocessor_count,
    row_offsets,
)

MAX_BLOCK_K = 128
MIN_DOT_ROWS = 16
_DOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# (element size, BLOCK_K) -> (BLOCK_N, num_warps, num_stages, programs per SM), from register and
# shared-memory counts of the sm_90 builds. The grid is persistent and every program does the same
# work, so all programs must be resident at once (one wave): the programs per SM stay below what
# fits, with margin. Within that, the tiles are sized so that each SM keeps about 60 to 110 KiB of
# loads in flight (what HBM3e needs at ~4.8 TB/s); two warps per program at BLOCK_K = 16 give each
# warp its own 16 x 8 share of the output (four would compute it twice over).
_CONFIGS = {
    (2, 16): (256, 2, 5, 4),
    (2, 32): (128, 4, 4, 3),
    (2, 64): (64, 4, 4, 3),
    (2, 128): (32, 8, 6, 1),
    (4, 16): (64, 2, 6, 4),
    (4, 32): (32, 4, 6, 3),
    (4, 64): (32, 4, 4, 3),
    (4, 128): (16, 8, 4, 1),
}


@triton.jit
def _load_tile(src, tile_rows, cols, COL_CONTIGUOUS: tl.constexpr, MASK_COLS: tl.constexpr):
    """The tile rows x cols, ``tile_rows`` = (row_base, seg_start, row_mask): row m starts at
    row_base[m], its columns at seg_start[m] + cols."""
    base_ptr, _, _, col_stride, n = src
    row_base, seg_start, row_mask = tile_rows
    c = seg_start[:, None] + cols[None, :]
    if COL_CONTIGUOUS:
        ptrs = base_ptr + row_base[:, None] + c
    else:
        ptrs = base_ptr + row_base[:, None] + c * col_stride
    if MASK_COLS:
        mask = row_mask[:, None] & (c < n)
    else:
        mask = row_mask[:, None]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _accumulate_tile(
    acc,
    src,
    LAYOUT: tl.constexpr,
    cols,
    tiles,
    BLOCK_K: tl.constexpr,
    SAME_ROWS: tl.constexpr,
    MASK_COLS: tl.constexpr,
    USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc += A_tile B_tile^T for the columns ``cols`` (A = rows a0.., B = rows b0..); ``tiles`` =
    (A's tile rows, B's tile rows, b0, kb), each tile's rows as ``_load_tile`` takes them."""
    tile_a, tile_b, b0, kb = tiles
    USE_TABLE: tl.constexpr = LAYOUT[0]
    ALIGN: tl.constexpr = LAYOUT[1]
    COL_CONTIGUOUS: tl.constexpr = LAYOUT[2]
    xa = _load_tile(src, tile_a, cols, COL_CONTIGUOUS, MASK_COLS)
    if USE_DOT:
        if SAME_ROWS:
            xb = xa
        else:
            xb = _load_tile(src, tile_b, cols, COL_CONTIGUOUS, MASK_COLS)
        if UPCAST:  # the interpreter's dot cannot multiply bfloat16; float32 products are the same values
            xa = xa.to(tl.float32)
            xb = xb.to(tl.float32)
        acc = tl.dot(xa, tl.trans(xb), acc, input_precision=PRECISION)
    else:
        # float64 (never folded): one column of the block at a time on the CUDA cores, row j from cache.
        base_ptr, table_ptr, row_stride, col_stride, n = src
        rk = tl.arange(0, BLOCK_K)
        for j in range(0, kb):
            off_j = row_offsets(table_ptr, b0 + j, j < kb, row_stride, USE_TABLE, ALIGN)
            xj = load_row(base_ptr + off_j, cols, col_stride, n, COL_CONTIGUOUS, MASK_COLS)
            col = tl.sum(xa.to(acc.dtype) * xj.to(acc.dtype)[None, :], axis=1)
            acc += tl.where(rk[None, :] == j, col[:, None], 0.0)
    return acc


@triton.jit(do_not_specialize=["n", "seg_tiles", "full_tiles", "a0", "ka", "b0", "kb"])
def _gram_partials_kernel(
    base_ptr,
    table_ptr,
    row_stride,
    col_stride,
    n,
    seg_tiles,
    full_tiles,
    a0,
    ka,
    b0,
    kb,
    out_ptr,
    out_stride_p,
    out_stride_r,
    out_stride_c,
    ROWS: tl.constexpr,
    SEGMENTS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SAME_ROWS: tl.constexpr,
    LAYOUT: tl.constexpr,
    ATOMIC: tl.constexpr,
    USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """Program p adds up column tiles p, p + P, p + 2P, ... (P programs) of rows a0.. times rows b0..
    and writes its ROWS x ROWS sum to row p of the partials buffer, or atomically into G.

    Tile row m is segment m // ROWS of row m % ROWS; segment s covers columns
    [s * seg_tiles * BLOCK_N, (s + 1) * seg_tiles * BLOCK_N), and tile t is columns
    [t * BLOCK_N, (t + 1) * BLOCK_N) of every segment. Tiles below ``full_tiles`` lie inside every
    row and are loaded without a column mask."""
    BLOCK_K: tl.constexpr = ROWS * SEGMENTS
    USE_TABLE: tl.constexpr = LAYOUT[0]
    ALIGN: tl.constexpr = LAYOUT[1]
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    m = tl.arange(0, BLOCK_K)
    row = m % ROWS
    seg = tl.cast(m // ROWS, tl.int64) * seg_tiles * BLOCK_N  # multiple of BLOCK_N: stays aligned
    mask_a = row < ka
    base_a = row_offsets(table_ptr, a0 + row, mask_a, row_stride, USE_TABLE, ALIGN)
    if SAME_ROWS:
        mask_b = mask_a
        base_b = base_a
    else:
        mask_b = row < kb
        base_b = row_offsets(table_ptr, b0 + row, mask_b, row_stride, USE_TABLE, ALIGN)
    cols0 = tl.arange(0, BLOCK_N).to(tl.int64)
    acc = tl.zeros((BLOCK_K, BLOCK_K), dtype=ACC_DTYPE)
    src = (base_ptr, table_ptr, row_stride, col_stride, n)
    tiles = ((base_a, seg, mask_a), (base_b, seg, mask_b), b0, kb)
    for tile in range(tl.cast(pid, tl.int64), full_tiles, num_programs):  # int64: N may pass 2^31
        cols = tile * BLOCK_N + cols0
        acc = _accumulate_tile(acc, src, LAYOUT, cols, tiles, BLOCK_K, SAME_ROWS, False, USE_DOT, UPCAST, PRECISION)
    # The masked tiles continue the same grid-stride sequence.
    first = full_tiles + (pid - full_tiles % num_programs + num_programs) % num_programs
    for tile in range(tl.cast(first, tl.int64), seg_tiles, num_programs):
        cols = tile * BLOCK_N + cols0
        acc = _accumulate_tile(acc, src, LAYOUT, cols, tiles, BLOCK_K, SAME_ROWS, True, USE_DOT, UPCAST, PRECISION)
    if SEGMENTS > 1:  # G is the sum of the diagonal ROWS x ROWS blocks of the folded product
        acc4 = tl.reshape(acc, (SEGMENTS, ROWS, SEGMENTS, ROWS))
        sa = tl.arange(0, SEGMENTS)[:, None, None, None]
        sb = tl.arange(0, SEGMENTS)[None, None, :, None]
        part = tl.sum(tl.sum(tl.where(sa == sb, acc4, 0.0), axis=2), axis=0)
    else:
        part = acc
    rk = tl.arange(0, ROWS)
    out_mask = (rk[:, None] < ka) & (rk[None, :] < kb)
    offs = rk[:, None] * out_stride_r + rk[None, :] * out_stride_c
    if ATOMIC:
        tl.atomic_add(out_ptr + offs, part, mask=out_mask)
    else:
        tl.store(out_ptr + tl.cast(pid, tl.int64) * out_stride_p + offs, part, mask=out_mask)


@triton.jit(do_not_specialize=["num_partials", "ka", "kb"])
def _gram_reduce_kernel(
    part_ptr,
    num_partials,
    ka,
    kb,
    g_ptr,
    g_stride_r,
    g_stride_c,
    gt_ptr,
    BLOCK_P: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SAME_ROWS: tl.constexpr,
):
    """Adds the partials [P, ka * kb] over P in a fixed order, in float64; writes G[i, j] (and, for an
    off-diagonal block, G[j, i] through ``gt_ptr``). A diagonal block is symmetrised exactly."""
    pid = tl.program_id(0)
    e = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    size = ka * kb
    emask = e < size
    i = e // kb
    j = e % kb
    e_t = j * kb + i  # the transposed entry (a diagonal block is square: ka == kb)
    p = tl.arange(0, BLOCK_P)
    total = tl.zeros((BLOCK_E,), dtype=tl.float64)
    total_t = tl.zeros((BLOCK_E,), dtype=tl.float64)
    for p0 in range(0, num_partials, BLOCK_P):
        rows = tl.cast(p0 + p, tl.int64)
        m = (rows[:, None] < num_partials) & emask[None, :]
        x = tl.load(part_ptr + rows[:, None] * size + e[None, :], mask=m, other=0.0)
        total += tl.sum(x.to(tl.float64), axis=0)
        if SAME_ROWS:
            xt = tl.load(part_ptr + rows[:, None] * size + e_t[None, :], mask=m, other=0.0)
            total_t += tl.sum(xt.to(tl.float64), axis=0)
    if SAME_ROWS:
        total = 0.5 * (total + total_t)
    out_ty = g_ptr.dtype.element_ty
    tl.store(g_ptr + i * g_stride_r + j * g_stride_c, total.to(out_ty), mask=emask)
    if not SAME_ROWS:
        tl.store(gt_ptr + j * g_stride_r + i * g_stride_c, total.to(out_ty), mask=emask)


def _config(rows: Rows, block_k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, num_warps, num_stages, programs per SM) for a block of BLOCK_K tile rows."""
    if INTERPRETED:
        return 64, 1, 1, 1
    if rows.dtype == torch.float64:  # CUDA-core path: correctness first, float64 is rare on GPUs
        return max(16, 4096 // block_k), 4, 2, 2
    return _CONFIGS[(rows.base.element_size(), block_k)]


def tile_shape(rows: Rows, k: int, same: bool, block_n: int | None) -> tuple[int, int, int]:
    """(ROWS, SEGMENTS, BLOCK_N) for a block of k rows (see the module docstring on folding)."""
    if rows.dtype not in _DOT_DTYPES or not same or k >= MIN_DOT_ROWS:
        block_k = max(MIN_DOT_ROWS, triton.next_power_of_2(k))
        return block_k, 1, block_n or _config(rows, block_k)[0]
    row_pad = triton.next_power_of_2(k)
    bn = block_n or _config(rows, MIN_DOT_ROWS)[0]
    segments = MIN_DOT_ROWS // row_pad
    # Fold only when every segment holds whole tiles (short rows are cheap anyway): N >= R^2 BLOCK_N
    # guarantees that the last segment is not empty.
    while segments > 1 and rows.n < segments * segments * bn:
        segments //= 2
    return MIN_DOT_ROWS // segments, segments, bn  # rows padded so that the tile has 16


def _launch_block(
    rows: Rows,
    a0: int,
    ka: int,
    b0: int,
    kb: int,
    g: Tensor,
    *,
    deterministic: bool,
    block_n: int | None,
    num_programs: int | None,
) -> None:
    """Computes G[a0:a0+ka, b0:b0+kb] (and its mirror block) into ``g``."""
    same = a0 == b0
    row_block, segments, block_n = tile_shape(rows, max(ka, kb), same, block_n)
    _, num_warps, num_stages, per_sm = _config(rows, row_block * segments)
    check_block_n(block_n)
    seg_tiles = triton.cdiv(triton.cdiv(rows.n, segments), block_n)
    last_segment = rows.n - (segments - 1) * seg_tiles * block_n  # > 0 by the folding rule
    full_tiles = last_segment // block_n
    programs = num_programs or per_sm * multiprocessor_count(rows.device)
    programs = max(1, min(programs, seg_tiles))
    use_dot = rows.dtype in _DOT_DTYPES
    acc_dtype = accumulator_dtype(rows.dtype)
    atomic = not deterministic and use_dot
    args = (*rows.kernel_args(), rows.n, seg_tiles, full_tiles, a0, ka, b0, kb)
    flags = dict(
        ROWS=row_block,
        SEGMENTS=segments,
        BLOCK_N=block_n,
        SAME_ROWS=same,
        **rows.layout(),
        ATOMIC=atomic,
        USE_DOT=use_dot,
        UPCAST=INTERPRETED and rows.dtype == torch.bfloat16,
        PRECISION="tf32x3" if rows.dtype == torch.float32 else None,
        ACC_DTYPE=acc_dtype,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if atomic:
        acc = torch.zeros((ka, kb), dtype=torch.float32, device=rows.device)
        _gram_partials_kernel[(programs,)](*args, acc, 0, acc.stride(0), acc.stride(1), **flags)
        g[a0 : a0 + ka, b0 : b0 + kb] = acc
        if not same:
            g[b0 : b0 + kb, a0 : a0 + ka] = acc.T
        return
    part_dtype = torch.float64 if acc_dtype == tl.float64 else torch.float32
    partials = torch.empty((programs, ka, kb), dtype=part_dtype, device=rows.device)
    _gram_partials_kernel[(programs,)](
        *args, partials, partials.stride(0), partials.stride(1), partials.stride(2), **flags
    )
    # Few entries (K^2) and up to a few hundred partials: wide tiles over the partials, so that the
    # fixed-order sum takes a handful of steps.
    block_e = 1024 if INTERPRETED else min(128, triton.next_power_of_2(ka * kb))
    block_p = 16 if INTERPRETED else min(512, 8192 // block_e)
    _gram_reduce_kernel[(triton.cdiv(ka * kb, block_e),)](
        partials,
        programs,
        ka,
        kb,
        g[a0:, b0:],
        g.stride(0),
        g.stride(1),
        g[b0:, a0:],
        BLOCK_P=block_p,
        BLOCK_E=block_e,
        SAME_ROWS=same,
        num_warps=1 if INTERPRETED else 8,
    )


def gram(
    x: Tensor | Sequence[Tensor],
    *,
    deterministic: bool = True,
    out_dtype: torch.dtype = torch.float64,
    block_n: int | None = None,
    num_programs: int | None = None,
) -> Tensor:
    """G = J J^T for J given as a K x N tensor (rows at any stride) or as K tensors of N elements each
    (never stacked). Returns a K x K ``out_dtype`` tensor (float32 or float64) on J's device.

    Args:
        deterministic: two-stage reduction, bitwise identical run to run (default); ``False`` adds
            the programs' partial sums with float32 atomics instead (float64 rows always reduce in
            two stages). ``torch.use_deterministic_algorithms(True)`` forces the two-stage path.
        block_n, num_programs: override the launch shape (tests use them to force many tiles).
    """
    rows = as_rows(x)
    if rows.dtype not in _DOT_DTYPES + (torch.float64,):
        raise TypeError(f"gram supports float16, bfloat16, float32 and float64 rows, got {rows.dtype}")
    if out_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"out_dtype must be torch.float32 or torch.float64, got {out_dtype}")
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    g = torch.empty((rows.k, rows.k), dtype=out_dtype, device=rows.device)
    starts = range(0, rows.k, MAX_BLOCK_K)
    for a0 in starts:
        for b0 in starts:
            if b0 >= a0:
                _launch_block(
                    rows,
                    a0,
                    min(MAX_BLOCK_K, rows.k - a0),
                    b0,
                    min(MAX_BLOCK_K, rows.k - b0),
                    g,
                    deterministic=deterministic,
                    block_n=block_n,
                    num_programs=num_programs,
                )
    return g


__all__ = ["MAX_BLOCK_K", "gram", "tile_shape"]
