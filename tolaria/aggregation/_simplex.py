"""The Euclidean projection onto the probability simplex, on the device, without host reads.

MoDo and SDMGrad take projected gradient steps on their task weights: w <- P(w - step), with
P(y) = argmin_{w >= 0, sum w = 1} |w - y|^2. The projection is the sorting algorithm (Held, Wolfe
& Crowder 1974; Duchi et al. 2008, Figure 1): with u = y sorted in decreasing order and
rho = max{j : u_j - (u_1 + ... + u_j - 1) / j > 0}, P(y) = max(y - theta, 0) where
theta = (u_1 + ... + u_rho - 1) / rho. It is the same map as the loop of Chen & Ye (2011) that the
papers' code uses, written as one sort, one cumulative sum and one gather.

(The QP solvers of :mod:`tolaria.aggregation._qp` minimise w^T H w on the simplex, with no linear
term: a projection is not one of their problems.)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["project_onto_simplex"]


def project_onto_simplex(y: Tensor) -> Tensor:
    """P(y): the point of {w >= 0, sum w = 1} nearest ``y`` (a K-vector, or a batch of them on the
    last dimension). Equivariant under permutations of the K entries; NaN in, NaN out."""
    k = y.shape[-1]
    u = torch.sort(y, dim=-1, descending=True).values
    excess = u.cumsum(dim=-1) - 1.0
    count = torch.arange(1, k + 1, dtype=y.dtype, device=y.device)
    # j = 1 always qualifies in exact arithmetic (u_1 - (u_1 - 1) = 1); the floor of 1 keeps it so
    # where rounding says otherwise (|u_1| beyond 2^53).
    index = torch.arange(k, device=y.device)
    rho = torch.where(u - excess / count > 0, index, 0).amax(dim=-1, keepdim=True)
    theta = excess.gather(-1, rho) / (rho + 1).to(y.dtype)
    return (y - theta).clamp_min(0.0)
