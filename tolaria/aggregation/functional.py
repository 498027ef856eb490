"""Drop-in replacements for the earlier prototype's ``aggregation.py`` functions.

Same names and call signatures, with each defect its review found fixed: every gradient is projected
pairwise (not only the first), weights broadcast over any rank, empty input is refused or typed,
and there is no unused result scaffolding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ._sources import as_sources
from ._weights import as_weight_vector, check_weight_count
from .pcgrad import PCGrad
from .weighted import Mean, Sum, Weighted

__all__ = [
    "grads_to_flat",
    "flat_to_grads",
    "pcgrad",
    "aggregate_mean",
    "aggregate_sum",
    "aggregate_weighted",
    "combine_flat_grads",
]


def grads_to_flat(
    params: Iterable[Tensor | None],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, list[torch.Size]]:
    """Concatenates tensors into one flat tensor; returns it with their shapes.

    ``None`` entries (parameters without a gradient) are skipped. With nothing to flatten, an empty
    tensor of ``dtype`` on ``device`` is returned when both are given; otherwise ``ValueError``,
    since no dtype or device can be inferred.
    """
    flats: list[Tensor] = []
    shapes: list[torch.Size] = []
    for i, p in enumerate(params):
        if p is None:
            continue
        if not isinstance(p, Tensor):
            raise TypeError(f"entry {i} is a {type(p).__name__}, not a tensor")
        if flats and (p.dtype != flats[0].dtype or p.device != flats[0].device):
            raise ValueError(
                f"entry {i} is {p.dtype} on {p.device}, but the first is {flats[0].dtype} on {flats[0].device}"
            )
        shapes.append(p.shape)
        flats.append(p.reshape(-1))
    if not flats:
        if dtype is None or device is None:
            raise ValueError("grads_to_flat got no tensors; pass dtype= and device= to get an empty tensor")
        return torch.empty(0, dtype=dtype, device=device), shapes
    return torch.cat(flats), shapes


def flat_to_grads(flat: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Splits ``flat`` back into views of the given shapes (the inverse of :func:`grads_to_flat`)."""
    if flat.dim() != 1:
        raise ValueError(f"flat must be 1-D, got shape {tuple(flat.shape)}")
    sizes = [torch.Size(s).numel() for s in shapes]
    if sum(sizes) != flat.numel():
        raise ValueError(f"shapes hold {sum(sizes)} elements but flat has {flat.numel()}")
    return [chunk.view(s) for chunk, s in zip(flat.split(sizes), shapes)]


def pcgrad(grad_i: Tensor, grad_j: Tensor) -> Tensor:
    """Projects ``grad_i`` onto the normal plane of ``grad_j`` if they conflict (dot < 0).

    No host synchronisation: the projection is selected on the device. A zero ``grad_j`` leaves
    ``grad_i`` unchanged (no epsilon skews the projection).
    """
    as_sources([grad_i, grad_j])
    a, b = grad_i.reshape(-1), grad_j.reshape(-1)
    dot = torch.dot(a, b)
    sq = torch.dot(b, b)
    coef = torch.where((dot < 0) & (sq > 0), dot / torch.where(sq > 0, sq, 1), 0)
    return grad_i - coef * grad_j


def aggregate_mean(grads: Sequence[Tensor]) -> Tensor:
    """The mean of equal-shape gradients."""
    return Mean()(grads)


def aggregate_sum(grads: Sequence[Tensor]) -> Tensor:
    """The sum of equal-shape gradients."""
    return Sum()(grads)


def aggregate_weighted(grads: Sequence[Tensor], weights: Sequence[float] | Tensor) -> Tensor:
    """The weighted mean sum_k w_k g_k / sum_k w_k of equal-shape gradients of any rank."""
    w = as_weight_vector(weights, "aggregate_weighted")
    check_weight_count(w, len(grads), "aggregate_weighted")
    total = float(w.sum())
    if total <= 0:
        raise ValueError(f"aggregate_weighted weights sum to {total}; the sum must be positive")
    return Weighted(w / total)(grads)


def combine_flat_grads(
    flats: Sequence[Tensor],
    *,
    use_pcgrad: bool = True,
    weights: Sequence[float] | None = None,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    """Combines flat gradients; returns the result and the number of PCGrad projections applied.

    With ``use_pcgrad`` every gradient is projected against every other (PCGrad, Yu et al. 2020),
    in ascending order unless ``shuffle``; the projected gradients are summed, or averaged with
    ``weights`` (sum_k w_k g_k^PC / sum_k w_k). Without it, the plain sum or weighted mean.
    Reading the conflict count back makes this call synchronise the device.
    """
    if use_pcgrad:
        agg = PCGrad(
            reduction="sum" if weights is None else "mean",
            shuffle=shuffle,
            generator=generator,
            weights=weights,
        )
        out, stats = agg(flats, return_stats=True)
        return out, int(stats.conflicts)
    if weights is None:
        return aggregate_sum(flats), 0
    return aggregate_weighted(flats, weights), 0
