"""A gradient operation of the Lightning integration that needs no Lightning: the loss scale undone
(with GradScaler's own op) before an aggregator sees gradients. (The heads' mean over the ranks is
``tolaria.distributed.allreduce_mean_grads``, shared with the trainer.)"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["unscale_found_inf"]


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
