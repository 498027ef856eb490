"""Gradient operations of the Lightning integration that need no Lightning: the heads' mean over
the ranks, and the loss scale undone (with GradScaler's own op) before an aggregator sees gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["allreduce_mean_grads", "unscale_found_inf"]


def allreduce_mean_grads(params: list[Tensor], world: int) -> None:
    """The heads' plain gradients averaged over the ranks (None only where no rank has one): one all-reduce
    per dtype."""
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    for (dtype, device), group in groups.items():
        present = torch.tensor([p.grad is not None for p in group], dtype=dtype, device=device)
        flat = torch.cat(
            [*(p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in group), present]
        )
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, seen in zip(group, flat[-len(group) :].tolist()):
            mean = flat[offset : offset + p.numel()].view_as(p).div_(world)
            offset += p.numel()
            if seen > 0:
                if p.grad is None:
                    p.grad = mean.clone()
                else:
                    p.grad.copy_(mean)


def unscale_found_inf(tensors: list[Tensor], inv_scale: float) -> bool:
    """Divides ``tensors`` by the loss scale in place and says whether any holds inf/NaN (GradScaler's own op)."""
    found = []
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for (_, device), group in groups.items():
        flag = torch.zeros(1, dtype=torch.float32, device=device)
        inv = torch.full((1,), inv_scale, dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, flag, inv)
        found.append(flag.to("cpu"))
    return bool(torch.cat(found).sum().item() > 0) if found else False
