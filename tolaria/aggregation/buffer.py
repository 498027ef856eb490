"""``GradientBuffer``: K gradient sources of the shared parameters, in one K x N buffer.

Row k of the buffer receives source k's backward directly: while a source is active, every shared
parameter's ``.grad`` is a view into that row, and autograd accumulates into it in place. The
aggregate is then written into one flat output whose views are the parameters' ``.grad``, so the
optimizer reads it with no scatter and nothing is copied twice. A parameter that a source does not
reach keeps zeros in that row, at its own offset.

Gradients accumulate as PyTorch's do: the rows keep summing over backward passes (micro-batches)
until ``aggregate`` consumes them, and a ``.grad`` that was already there (an auxiliary loss, a
regulariser, a step without ``zero_grad``) is added to the aggregate, never dropped. Parameters
outside ``shared`` (task-specific heads) are not buffered: they get their plain gradient, the sum
over the sources that reach them, as Pytorch-PCGrad and TorchJD's ``mtl_backward`` give them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .aggregator import Aggregator
from .stats import AggregationStats

__all__ = ["GradientBuffer"]

_ROW_ALIGN = 32  # elements

ParameterSource = nn.Module | torch.optim.Optimizer | Iterable[Tensor] | Iterable[Mapping[str, Any]]


def _parameters(source: Any, what: str) -> list[Tensor]:
    """The parameters of a module, an optimizer, its ``param_groups``, or an iterable of tensors."""
    if isinstance(source, nn.Module):
        return list(source.parameters())
    if isinstance(source, torch.optim.Optimizer):
        return [p for group in source.param_groups for p in group["params"]]
    if isinstance(source, Tensor):
        return [source]
    if isinstance(source, (str, bytes)) or not isinstance(source, Iterable):
        raise TypeError(
            f"{what} must be a module, an optimizer, its param_groups or an iterable of tensors, "
            f"got {type(source).__name__}"
        )
    params: list[Tensor] = []
    for i, item in enumerate(source):
        if isinstance(item, Mapping) and "params" in item:  # an optimizer's param group
            group = item["params"]
            params.extend([group] if isinstance(group, Tensor) else group)
        elif isinstance(item, Tensor):
            params.append(item)
        else:
            raise TypeError(
                f"{what}: item {i} is a {type(item).__name__}; pass a module, an optimizer, its "
                "param_groups (dicts with 'params'), or an iterable of tensors"
            )
    return params


def _holds_dtensors(source: Any) -> bool:
    """Whether a module's, an optimizer's or a list's parameters are DTensors (FSDP2's sharded ones)."""
    if isinstance(source, nn.Module):
        params: Iterable[Any] = source.parameters()
    elif isinstance(source, torch.optim.Optimizer):
        params = (p for group in source.param_groups for p in group["params"])
    elif isinstance(source, (list, tuple)):
        params = source
    else:
        return False  # an iterator is not consumed here; GradientBuffer's own checks then apply
    return any(type(p).__name__ == "DTensor" and hasattr(p, "to_local") for p in params)


def _unique_trainable(params: list[Tensor], what: str) -> list[Tensor]:
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"{what}: parameter {i} is a {type(p).__name__}, not a tensor")
    seen: set[int] = set()
    unique = []
    for p in params:  # tied parameters appear once
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique


class GradientBuffer:
    """Binds the shared parameters to a ``num_sources`` x N gradient buffer and aggregates into
    their ``.grad``.

    Example::

        buf = GradientBuffer(model, num_sources=2, shared=model.trunk)
        optimizer.zero_grad()
        buf.backward([loss_a, loss_b])   # or {"a": loss_a, "b": loss_b}
        buf.aggregate(UPGrad())          # the trunk's .grad now hold the aggregate
        optimizer.step()                 # the heads' .grad hold their plain gradients

    Args:
        params: a module, an optimizer, its ``param_groups``, or an iterable of parameters; those
            with ``requires_grad`` take part (tied parameters once).
        num_sources: K, the number of gradient sources.
        shared: the parameters whose K gradients are aggregated (a module or parameters among
            ``params``; default: all of them). The others get their plain gradient.
        accumulate: True (default) accumulates like PyTorch: rows sum over backward passes until
            ``aggregate`` consumes them, and an existing ``.grad`` of a shared parameter is added to
            the aggregate. False zeroes row k at every entry into ``source(k)`` and discards the
            gradients found in ``.grad`` (of every parameter) when a new round of sources begins.
        mode: ``"buffer"`` (default: the K x N rows) or ``"low_memory"`` (the same update from the
            Gram matrix folded during one batched backward, never K x N; Gramian aggregators only;
            see :mod:`tolaria.aggregation.low_memory`).
        level: ``"params"`` (default) or ``"features"`` (the sources' gradients at the shared
            representation, ``backward(losses, features=z)``: an approximation; see
            :mod:`tolaria.aggregation.features`).

    Attributes:
        params: the buffered (shared) parameters, in order.
        unshared_params: the other trainable parameters (plain gradients).
        buffer: the K x N matrix of per-source gradients (rows padded apart for alignment).
        output: the flat N-tensor whose views are the shared parameters' ``.grad`` after ``aggregate``.
    """

    def __new__(cls, *args: Any, mode: str = "buffer", level: str = "params", **kwargs: Any) -> GradientBuffer:
        # mode="low_memory" and level="features" hold no K x N buffer: their own classes (issue 20).
        if cls is GradientBuffer and (mode, level) != ("buffer", "params"):
            from ._gradient_rounds import buffer_class

            return super().__new__(buffer_class(mode, level))
        # A model wrapped by FSDP2's fully_shard (DTensor parameters): the rows of its local shards (issue 19).
        if cls is GradientBuffer and _holds_dtensors(args[0] if args else kwargs.get("params")):
            from .sharded_buffer import FSDPGradientBuffer

            return super().__new__(FSDPGradientBuffer)
        return super().__new__(cls)

    def __init__(
        self,
        params: ParameterSource,
        num_sources: int,
        *,
        shared: nn.Module | Iterable[Tensor] | None = None,
        accumulate: bool = True,
        mode: str = "buffer",
        level: str = "params",
    ):
        if isinstance(params, Aggregator):
            raise TypeError(
                "GradientBuffer takes the parameters first and the number of sources second; "
                "pass the aggregator to buf.aggregate(...)"
            )
        first = self._bind_parameters(params, num_sources, shared, accumulate)
        self._offsets: list[tuple[int, int]] = []
        offset = 0
        for p in self.params:
            self._offsets.append((offset, p.numel()))
            offset += p.numel()
        self.output = torch.zeros(self.numel, dtype=first.dtype, device=first.device)
        self._output_views = self._views(self.output)
        self._allocate_rows()
        # Gradients found in the shared parameters' .grad during a round, added to its aggregate.
        self._carry: Tensor | None = None
        self._round_open = False  # a round: the backward passes between two aggregates

    def _allocate_rows(self) -> None:
        """The K x N buffer and each row's per-parameter views (the buffer-free modes override this)."""
        # Rows start on 64-byte boundaries (row stride padded to 32 elements) so that the kernels'
        # wide vector loads stay aligned whatever N is; `buffer` is the K x N view.
        stride = -(-self.numel // _ROW_ALIGN) * _ROW_ALIGN
        self._storage = torch.zeros((self.num_sources, stride), dtype=self.dtype, device=self.device)
        self.buffer = self._storage[:, : self.numel]
        self._row_views = [self._views(self.buffer[k]) for k in range(self.num_sources)]

    def _bind_parameters(self, params: Any, num_sources: int, shared: Any, accumulate: bool) -> Tensor:
        """The checks every buffer kind makes of its arguments, and the attributes they set (params,
        unshared_params, num_sources, accumulate, dtype, device, numel); returns parameter 0."""
        if isinstance(num_sources, bool) or not isinstance(num_sources, int) or num_sources < 1:
            raise ValueError(f"num_sources must be a positive int, got {num_sources!r}")
        if not isinstance(accumulate, bool):
            raise TypeError(f"accumulate must be True or False, got {accumulate!r}")
        trainable = _unique_trainable(_parameters(params, "GradientBuffer params"), "GradientBuffer params")
        if not trainable:
            raise ValueError("GradientBuffer needs at least one parameter with requires_grad=True")
        if shared is None:
            self.params, self.unshared_params = trainable, []
        else:
            self.params, self.unshared_params = self._split_shared(trainable, shared)
        first = self.params[0]
        for i, p in enumerate(self.params):
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(
                    f"parameter {i} is {p.dtype} on {p.device}, but parameter 0 is "
                    f"{first.dtype} on {first.device}; GradientBuffer needs one dtype and device"
                )
        self.num_sources, self.accumulate = num_sources, accumulate
        self.dtype, self.device = first.dtype, first.device
        self.numel = sum(p.numel() for p in self.params)
        return first

    @staticmethod
    def _split_shared(trainable: list[Tensor], shared: Any) -> tuple[list[Tensor], list[Tensor]]:
        chosen = _unique_trainable(_parameters(shared, "GradientBuffer shared"), "GradientBuffer shared")
        known = {id(p) for p in trainable}
        for i, p in enumerate(chosen):
            if id(p) not in known:
                raise ValueError(
                    f"shared parameter {i} (shape {tuple(p.shape)}) is not among the buffer's parameters; "
                    "shared must be a part of params (e.g. GradientBuffer(model, K, shared=model.trunk))"
                )
        if not chosen:
            raise ValueError("shared holds no parameter with requires_grad=True")
        ids = {id(p) for p in chosen}
        return [p for p in trainable if id(p) in ids], [p for p in trainable if id(p) not in ids]

    def _views(self, flat: Tensor) -> list[Tensor]:
        return [flat[o : o + n].view_as(p) for (o, n), p in zip(self._offsets, self.params)]

    def _check_parameters(self) -> None:
        for i, p in enumerate(self.params):
            if p.dtype != self.dtype or p.device != self.device:
                raise RuntimeError(
                    f"GradientBuffer was built for {self.dtype} parameters on {self.device}, but parameter {i} is "
                    f"now {p.dtype} on {p.device} (the model was moved or cast after the buffer was built): "
                    "build a new GradientBuffer after model.to(...) / .double() / .half()"
                )

    def _is_ours(self, grad: Tensor, views: Sequence[Tensor], i: int) -> bool:
        return grad.data_ptr() == views[i].data_ptr() and grad.shape == views[i].shape

    def _begin_round(self) -> None:
        """The first backward after an aggregate (or construction): consumed rows are cleared."""
        if self._round_open:
            return
        self._round_open = True
        self._storage.zero_()
        self._carry = None
        if not self.accumulate:
            for p in (*self.params, *self.unshared_params):
                p.grad = None

    def _absorb_external_grads(self) -> None:
        """Adds whatever sits in a shared parameter's ``.grad`` (not one of the rows) to the carry."""
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue
            if self.accumulate:
                if self._carry is None:
                    self._carry = torch.zeros_like(self.output)
                offset, n = self._offsets[i]
                self._carry[offset : offset + n].view_as(p).add_(grad)
            p.grad = None

    def zero_grad(self) -> None:
        """Forgets every gradient of the round (rows, carry, and every parameter's ``.grad``)."""
        for p in (*self.params, *self.unshared_params):
            p.grad = None
        self._round_open = False
        self._carry = None

    @contextmanager
    def source(self, k: int) -> Iterator[Tensor]:
        """Within this block, backward passes accumulate into row ``k``; yields the row."""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.num_sources:
            raise IndexError(f"source index {k!r} out of range for {self.num_sources} sources")
        self._check_parameters()
        self._begin_round()
        self._absorb_external_grads()
        row = self.buffer[k]
        if not self.accumulate:
            row.zero_()
        for p, v in zip(self.params, self._row_views[k]):
            p.grad = v
        try:
            yield row
        finally:
            self._check_bound(k)
            for p in self.params:
                p.grad = None

    def _check_bound(self, k: int) -> None:
        # Autograd accumulates into an existing .grad in place; if something replaced a .grad
        # (e.g. zero_grad(set_to_none=True) inside the block), that gradient never reached row k.
        for i, p in enumerate(self.params):
            if p.grad is not None and not self._is_ours(p.grad, self._row_views[k], i):
                raise RuntimeError(
                    f"parameter {i}'s .grad was replaced while source {k} was active; "
                    "its gradient did not land in the buffer (was zero_grad called inside the block?)"
                )

    def backward(self, losses: Sequence[Tensor] | Mapping[str, Tensor], *, retain_graph: bool = False) -> None:
        """Backpropagates ``losses[k]`` into row k for every source (a sequence, or a mapping whose
        values are taken in order). The graph is kept until the last loss, and after it too with
        ``retain_graph=True``."""
        if isinstance(losses, Mapping):
            losses = list(losses.values())
        elif isinstance(losses, Tensor) or not isinstance(losses, Sequence):
            raise TypeError(
                f"losses must be a sequence or a mapping of {self.num_sources} scalar tensors, "
                f"got {type(losses).__name__}"
            )
        if len(losses) != self.num_sources:
            raise ValueError(f"got {len(losses)} losses for {self.num_sources} gradient sources")
        for k, loss in enumerate(losses):
            if not isinstance(loss, Tensor):
                raise TypeError(f"loss {k} is a {type(loss).__name__}, not a tensor")
            with self.source(k):
                loss.backward(retain_graph=retain_graph or k + 1 < len(losses))

    def aggregate(
        self,
        aggregator: Aggregator | Callable[[Tensor], Tensor],
        *,
        return_stats: bool = False,
    ) -> Tensor | tuple[Tensor, AggregationStats]:
        """Aggregates the K rows straight into ``output`` (plus any gradient carried into the
        round); the shared parameters' ``.grad`` are its views. ``aggregator`` is a Tolaria
        aggregator or any callable mapping the K x N matrix to an N-vector (e.g. TorchJD's); only
        Tolaria's return stats. The rows are consumed: the next backward starts a new round."""
        self._check_parameters()
        self._absorb_external_grads()
        if isinstance(aggregator, Aggregator):
            result = aggregator(self.buffer, out=self.output, return_stats=return_stats)
        elif callable(aggregator):
            if return_stats:
                raise ValueError(f"return_stats=True needs a Tolaria aggregator, got {type(aggregator).__name__}")
            result = self._aggregate_foreign(aggregator)
        else:
            raise TypeError(
                f"aggregate needs an aggregator (a callable on the K x N matrix), got {type(aggregator).__name__}"
            )
        if self._carry is not None:
            self.output.add_(self._carry)
            self._carry = None
        for p, v in zip(self.params, self._output_views):
            p.grad = v
        self._round_open = False
        return result

    def _aggregate_foreign(self, aggregator: Callable[[Tensor], Tensor]) -> Tensor:
        result = aggregator(self.buffer)
        if not isinstance(result, Tensor) or result.shape != (self.numel,):
            shape = tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
            raise ValueError(
                f"{type(aggregator).__name__} returned {shape} for the {self.num_sources} x {self.numel} matrix; "
                f"an aggregator must return one vector of {self.numel} elements"
            )
        self.output.copy_(result)
        return self.output

    def __repr__(self) -> str:
        return (
            f"GradientBuffer(num_sources={self.num_sources}, params={len(self.params)}, numel={self.numel}, "
            f"unshared_params={len(self.unshared_params)}, accumulate={self.accumulate})"
        )
