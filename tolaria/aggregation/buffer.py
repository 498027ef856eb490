"""``GradientBuffer``: K gradient sources of one set of parameters, in one K x N buffer.

Row k of the buffer receives source k's backward directly: while a source is active, every
parameter's ``.grad`` is a view into that row, and autograd accumulates into it in place. The
aggregate is then written into one flat output whose views are the parameters' ``.grad``, so the
optimizer reads it with no scatter and nothing is copied twice. A parameter that a source does not
reach keeps zeros in that row, at its own offset.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .aggregator import Aggregator
from .stats import AggregationStats


_ROW_ALIGN = 32  # elements


def _trainable(params_or_model: nn.Module | Iterable[Tensor]) -> list[Tensor]:
    if isinstance(params_or_model, nn.Module):
        params = list(params_or_model.parameters())
    else:
        params = list(params_or_model)
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"parameter {i} is a {type(p).__name__}, not a tensor")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("GradientBuffer needs at least one parameter with requires_grad=True")
    seen: set[int] = set()
    unique = []
    for p in params:  # shared (tied) parameters appear once
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    first = unique[0]
    for i, p in enumerate(unique):
        if p.dtype != first.dtype or p.device != first.device:
            raise ValueError(
                f"parameter {i} is {p.dtype} on {p.device}, but parameter 0 is "
                f"{first.dtype} on {first.device}; GradientBuffer needs one dtype and device"
            )
    return unique


class GradientBuffer:
    """Binds parameters to a ``num_sources`` x N gradient buffer and aggregates into their ``.grad``.

    Example::

        buf = GradientBuffer(model, num_sources=2)
        for k, loss in enumerate(losses):
            with buf.source(k):
                loss.backward(retain_graph=k + 1 < len(losses))
        buf.aggregate(PCGrad())   # params' .grad now hold the aggregate
        optimizer.step()

    Attributes:
        params: the trainable parameters, in order (tied parameters once).
        buffer: the K x N matrix of per-source gradients (rows padded apart for alignment).
        output: the flat N-tensor whose views are the parameters' ``.grad`` after ``aggregate``.
    """

    def __init__(self, params_or_model: nn.Module | Iterable[Tensor], num_sources: int):
        if isinstance(num_sources, bool) or not isinstance(num_sources, int) or num_sources < 1:
            raise ValueError(f"num_sources must be a positive int, got {num_sources!r}")
        self.params = _trainable(params_or_model)
        self.num_sources = num_sources
        first = self.params[0]
        self.numel = sum(p.numel() for p in self.params)
        # Rows start on 64-byte boundaries (row stride padded to 32 elements) so that the kernels'
        # wide vector loads stay aligned whatever N is; `buffer` is the K x N view.
        stride = -(-self.numel // _ROW_ALIGN) * _ROW_ALIGN
        self._storage = torch.zeros((num_sources, stride), dtype=first.dtype, device=first.device)
        self.buffer = self._storage[:, : self.numel]
        self.output = torch.zeros(self.numel, dtype=first.dtype, device=first.device)
        self._offsets: list[tuple[int, int]] = []
        offset = 0
        for p in self.params:
            self._offsets.append((offset, p.numel()))
            offset += p.numel()
        self._row_views = [self._views(self.buffer[k]) for k in range(num_sources)]
        self._output_views = self._views(self.output)

    def _views(self, flat: Tensor) -> list[Tensor]:
        return [flat[o : o + n].view_as(p) for (o, n), p in zip(self._offsets, self.params)]

    def _bind(self, views: Sequence[Tensor]) -> None:
        for p, v in zip(self.params, views):
            p.grad = v

    @contextmanager
    def source(self, k: int) -> Iterator[Tensor]:
        """Within this block, backward passes accumulate into row ``k`` (zeroed on entry)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.num_sources:
            raise IndexError(f"source index {k!r} out of range for {self.num_sources} sources")
        row = self.buffer[k]
        row.zero_()
        self._bind(self._row_views[k])
        try:
            yield row
        finally:
            self._check_bound(k)
            self._bind(self._output_views)

    def _check_bound(self, k: int) -> None:
        # Autograd accumulates into an existing .grad in place; if something replaced a .grad
        # (e.g. zero_grad(set_to_none=True) inside the block), that gradient never reached row k.
        for i, (p, v) in enumerate(zip(self.params, self._row_views[k])):
            if p.grad is not None and p.grad.data_ptr() != v.data_ptr():
                raise RuntimeError(
                    f"parameter {i}'s .grad was replaced while source {k} was active; "
                    "its gradient did not land in the buffer (was zero_grad called inside the block?)"
                )

    def backward(self, losses: Sequence[Tensor]) -> None:
        """Backpropagates ``losses[k]`` into row k for every source (the graph is kept until the last)."""
        if len(losses) != self.num_sources:
            raise ValueError(f"got {len(losses)} losses for {self.num_sources} gradient sources")
        for k, loss in enumerate(losses):
            with self.source(k):
                loss.backward(retain_graph=k + 1 < len(losses))

    def aggregate(self, aggregator: Aggregator, *, return_stats: bool = False) -> Tensor | tuple[Tensor, AggregationStats]:
        """Aggregates the K rows straight into ``output``; the parameters' ``.grad`` are its views."""
        result = aggregator(self.buffer, out=self.output, return_stats=return_stats)
        self._bind(self._output_views)
        return result

    def __repr__(self) -> str:
        return f"GradientBuffer(num_sources={self.num_sources}, params={len(self.params)}, numel={self.numel})"
