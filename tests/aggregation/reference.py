"""Plain float64 references for the aggregators, written as literally as the papers state them."""

from __future__ import annotations

import torch
from torch import Tensor


def pcgrad_reference(grads: Tensor, orders: list[list[int]], reduction: str = "sum", weights=None) -> Tensor:
    """Algorithm 1 of Yu et al. (2020), one pair at a time, in float64.

    ``grads`` is K x N; ``orders[i]`` lists the j != i in the order source i is projected against them.
    """
    g = grads.to(torch.float64)
    k = g.shape[0]
    projected = []
    for i in range(k):
        g_pc = g[i].clone()
        for j in orders[i]:
            dot = torch.dot(g_pc, g[j])
            if dot < 0:
                g_pc = g_pc - dot / torch.dot(g[j], g[j]) * g[j]
        projected.append(g_pc)
    a = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    total = sum(a[i] * projected[i] for i in range(k))
    if reduction == "mean":
        total = total / a.sum()
    return total


def ascending_orders(k: int) -> list[list[int]]:
    return [[j for j in range(k) if j != i] for i in range(k)]


def conflicts_reference(grads: Tensor, orders: list[list[int]]) -> int:
    g = grads.to(torch.float64)
    count = 0
    for i in range(g.shape[0]):
        g_pc = g[i].clone()
        for j in orders[i]:
            dot = torch.dot(g_pc, g[j])
            if dot < 0:
                count += 1
                g_pc = g_pc - dot / torch.dot(g[j], g[j]) * g[j]
    return count


# Tolerances relative to the reference's scale, per input dtype: the engine reads the inputs in their
# own precision and writes the result in it, so the result can be no better than one rounding of it.
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def assert_close_to_reference(result: Tensor, reference: Tensor, dtype: torch.dtype) -> None:
    scale = reference.abs().max().clamp_min(1e-12)
    err = (result.to(torch.float64) - reference).abs().max()
    assert err <= RTOL[dtype] * scale * 4, f"max error {err:.3g} vs scale {scale:.3g} for {dtype}"
