"""PCGrad's weights from the Gram matrix, in one small kernel on the device (Triton + torch facade).

PCGrad (Yu et al. 2020, Algorithm 1) projects each g_i in turn against the other original g_j (in
a per-i order) whenever their inner product is negative. Every projected g_i^PC stays a linear
combination sum_m C[i, m] g_m of the original rows, and every inner product it needs is a row of C
times a column of G = J J^T, so the whole loop runs on K x K numbers (see
``tolaria.aggregation.pcgrad``). This kernel runs that loop, vectorised over i, in one program:
C lives in registers, the K - 1 steps read G from cache, and the result w = a^T C (a: ones, 1/K or
the per-source weights) and the number of projections applied are written on the device. Nothing is
read on the host, so a training step that uses it never waits for the GPU.

The arithmetic is that of ``pcgrad_coefficients`` step for step, in G's dtype (float64 from the
engine); only the order of the K-term sums may differ. Orders come as a K x (K - 1) int64 tensor
(drawn on the device by ``draw_orders``), or ascending when none is given.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._rows import INTERPRETED, check_device

MAX_K = 128
REDUCTIONS = ("sum", "mean")


@triton.jit(do_not_specialize=["k"])
def _pcgrad_weights_kernel(
    g_ptr,
    g_stride_r,
    g_stride_c,
    orders_ptr,
    o_stride_r,
    o_stride_c,
    k,
    scale_ptr,
    w_ptr,
    conflicts_ptr,
    BLOCK_K: tl.constexpr,
    SHUFFLED: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    MEAN: tl.constexpr,
):
    dtype = g_ptr.dtype.element_ty
    r = tl.arange(0, BLOCK_K)
    valid = r < k
    rows = r[:, None]
    cols = r[None, :]
    coeffs = tl.where(rows == cols, 1.0, 0.0).to(dtype)  # C = I: g_i^PC starts as g_i
    conflicts = tl.zeros((BLOCK_K,), dtype=tl.int64)
    for step in range(0, k - 1):
        if SHUFFLED:
            j = tl.load(orders_ptr + r * o_stride_r + step * o_stride_c, mask=valid, other=0)
        else:
            j = tl.where(r > step, step, step + 1)  # ascending, skipping i itself
            j = tl.where(valid, j, 0)
        # <g_i^PC, g_j> for every i: row i of C times column j_i of G.
        g_col = tl.load(
            g_ptr + cols * g_stride_r + j[:, None] * g_stride_c, mask=valid[:, None] & (cols < k), other=0.0
        )
        dots = tl.sum(coeffs * g_col, axis=1)
        norm_j = tl.load(g_ptr + j * g_stride_r + j * g_stride_c, mask=valid, other=0.0)
        conflict = (dots < 0) & (norm_j > 0) & valid
        step_size = tl.where(conflict, dots / tl.where(norm_j > 0, norm_j, 1.0), 0.0)
        coeffs = coeffs - tl.where(cols == j[:, None], step_size[:, None], 0.0).to(dtype)
        conflicts += conflict.to(tl.int64)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + r, mask=valid, other=0.0).to(dtype)
        if MEAN:
            scale = scale / tl.sum(scale, axis=0)
    else:
        scale = tl.where(valid, 1.0, 0.0).to(dtype)
        if MEAN:
            scale = scale / tl.cast(k, dtype)  # 1 / K in G's dtype, as the torch path computes it
    weights = tl.sum(scale[:, None] * coeffs, axis=0)  # w = a^T C
    tl.store(w_ptr + r, weights, mask=valid)
    tl.store(conflicts_ptr, tl.sum(conflicts, axis=0))


def pcgrad_weights(
    gram: Tensor,
    orders: Tensor | None = None,
    *,
    reduction: str = "sum",
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """PCGrad's combination weights from the K x K Gram matrix, on its device, without a host sync.

    Args:
        gram: G = J J^T, float32 or float64 (the loop runs in this dtype), K up to ``MAX_K``.
        orders: K x (K - 1) int64 tensor on G's device, row i listing the other sources in the
            order i is projected against them; None means ascending index order.
        reduction: ``"sum"`` or ``"mean"`` of the projected gradients.
        weights: optional per-source weights (a K-vector on G's device); under ``"mean"`` the
            result is divided by their sum.

    Returns:
        (w, conflicts): w (K, G's dtype) with sum_i a_i g_i^PC = w @ J, and the number of
        projections applied (int64 scalar tensor).
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square K x K matrix, got shape {tuple(gram.shape)}")
    k = gram.shape[0]
    if not 1 <= k <= MAX_K:
        raise ValueError(f"the PCGrad kernel handles 1 to {MAX_K} sources, got K = {k}")
    if gram.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"gram must be float32 or float64, got {gram.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid reductions are {', '.join(REDUCTIONS)}")
    check_device(gram.device, "the Gram matrix")
    if orders is not None:
        if orders.shape != (k, k - 1) or orders.dtype != torch.int64 or orders.device != gram.device:
            raise ValueError(
                f"orders must be a {k} x {k - 1} int64 tensor on {gram.device}, got "
                f"{tuple(orders.shape)} {orders.dtype} on {orders.device}"
            )
    if weights is not None:
        if weights.shape != (k,) or weights.device != gram.device or not weights.is_floating_point():
            raise ValueError(
                f"weights must be a float tensor of {k} elements on {gram.device}, got "
                f"{tuple(weights.shape)} {weights.dtype} on {weights.device}"
            )
        weights = weights.contiguous()
    w = torch.empty(k, dtype=gram.dtype, device=gram.device)
    conflicts = torch.empty((), dtype=torch.int64, device=gram.device)
    block_k = max(16, triton.next_power_of_2(k))
    _pcgrad_weights_kernel[(1,)](
        gram,
        gram.stride(0),
        gram.stride(1),
        orders if orders is not None else gram,
        orders.stride(0) if orders is not None else 0,
        orders.stride(1) if orders is not None else 0,
        k,
        weights if weights is not None else gram,
        w,
        conflicts,
        BLOCK_K=block_k,
        SHUFFLED=orders is not None,
        HAS_SCALE=weights is not None,
        # One warp up to 32 x 32 (reductions stay in registers), more only where C needs the room.
        MEAN=reduction == "mean",
        num_warps={16: 1, 32: 1, 64: 8, 128: 16}[block_k] if not INTERPRETED else 1,
    )
    return w, conflicts


__all__ = ["MAX_K", "pcgrad_weights"]
