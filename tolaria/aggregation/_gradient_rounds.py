"""What the buffer-free gradient modes share: one flat ``output`` written by one combined backward.

``GradientBuffer(..., mode="low_memory")`` and ``GradientBuffer(..., level="features")`` hold no K x
N matrix. Each round is ``backward(losses)`` (which keeps the graph and whatever the weights need)
then ``aggregate(aggregator)``, which runs one more backward of a combined cotangent whose gradients
are written into views of one flat ``output`` (parameter hooks, as autograd produces them), and
those views become the shared parameters' ``.grad``: the contract is the buffer mode's (``output``
is the aggregate, a ``.grad`` already there is added to it, the heads get their plain gradients).
Sources cannot be accumulated over several backward calls (micro-batches): the Gram matrix of a sum
is not the sum of Gram matrices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .buffer import GradientBuffer

__all__ = ["BUFFER_MODES", "AGGREGATION_LEVELS", "OutputRound", "buffer_class", "check_losses", "is_gramian"]

BUFFER_MODES = ("buffer", "low_memory")
AGGREGATION_LEVELS = ("params", "features")


def buffer_class(mode: str, level: str) -> type[GradientBuffer]:
    """The ``GradientBuffer`` subclass of ``mode`` and ``level``; ``ValueError`` naming the valid ones."""
    if mode not in BUFFER_MODES:
        raise ValueError(f"unknown GradientBuffer mode {mode!r}; valid modes are {', '.join(BUFFER_MODES)}")
    if level not in AGGREGATION_LEVELS:
        raise ValueError(f"unknown GradientBuffer level {level!r}; valid levels are {', '.join(AGGREGATION_LEVELS)}")
    if level == "features":
        if mode != "buffer":
            raise ValueError(
                'level="features" holds no K x N buffer anyway (its Jacobian is K x the features\' size); '
                'mode="low_memory" applies to level="params" only'
            )
        from .features import FeatureGradientBuffer

        return FeatureGradientBuffer
    if mode == "low_memory":
        from .low_memory import LowMemoryGradientBuffer

        return LowMemoryGradientBuffer
    return GradientBuffer


def is_gramian(aggregator: object) -> bool:
    """Whether ``aggregator``'s result is ``weighting(G) @ J`` (so G alone decides it): a Tolaria
    aggregator that keeps the engine's gram -> weighting -> combine steps. GradDrop, TrimmedMean
    (coordinate-wise) and ExcessMTL (a K x N state) are not."""
    from .aggregator import Aggregator

    return (
        isinstance(aggregator, Aggregator)
        and aggregator.weighted
        and type(aggregator)._aggregate is Aggregator._aggregate
        and type(aggregator).__call__ is Aggregator.__call__
    )


def check_losses(losses: Sequence[Tensor] | Mapping[str, Tensor], k: int) -> list[Tensor]:
    """The K losses as a list of scalar tensors (a sequence, or a mapping's values in order)."""
    if isinstance(losses, Mapping):
        losses = list(losses.values())
    elif isinstance(losses, Tensor) or not isinstance(losses, Sequence):
        raise TypeError(f"losses must be a sequence or a mapping of {k} scalar tensors, got {type(losses).__name__}")
    if len(losses) != k:
        raise ValueError(f"got {len(losses)} losses for {k} gradient sources")
    for i, loss in enumerate(losses):
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss {i} is a {type(loss).__name__}, not a tensor")
        if loss.numel() != 1:
            raise ValueError(f"loss {i} must be a scalar, got shape {tuple(loss.shape)}")
    return list(losses)


class OutputRound(GradientBuffer):
    """Base of the buffer-free modes (see the module docstring); not built directly."""

    mode = "buffer"
    level = "params"

    def __init__(self, *args: Any, **kwargs: Any):  # GradientBuffer's arguments
        super().__init__(*args, **kwargs)
        self._pending: tuple[list[Tensor], bool] | None = None  # the round's losses, until aggregate

    def _allocate_rows(self) -> None:
        """No K x N buffer: the point of these modes."""

    @property
    def buffer(self) -> Tensor:
        raise AttributeError(
            f"GradientBuffer(mode={self.mode!r}, level={self.level!r}) holds no K x N buffer; "
            'use mode="buffer", level="params" for code that reads the per-source rows'
        )

    def source(self, k: int):  # type: ignore[override]
        raise RuntimeError(
            f"GradientBuffer(mode={self.mode!r}, level={self.level!r}) has no per-source rows to bind: "
            'call backward(losses) with all K losses at once, or use mode="buffer"'
        )

    def zero_grad(self) -> None:
        """Forgets every gradient of the round (the pending losses, and every parameter's ``.grad``)."""
        for p in (*self.params, *self.unshared_params):
            p.grad = None
        self._pending = None

    def _open_round(self, losses: list[Tensor], retain_graph: bool) -> None:
        if self._pending is not None:
            raise RuntimeError(
                f"backward was called twice without aggregate; mode={self.mode!r}, level={self.level!r} cannot "
                "sum sources over several backward passes (micro-batches): aggregate after each backward, "
                'or use mode="buffer"'
            )
        self._check_parameters()
        if not self.accumulate:
            for p in (*self.params, *self.unshared_params):
                p.grad = None
        self._pending = (losses, retain_graph)

    def _close_round(self) -> tuple[list[Tensor], bool]:
        if self._pending is None:
            raise RuntimeError("aggregate needs a backward(losses) first: this round has no losses")
        self._check_parameters()
        pending, self._pending = self._pending, None
        return pending

    def _plain_head_gradients(self, losses: list[Tensor]) -> None:
        """The heads' plain gradient (the sum over the sources), as the buffer mode gives them."""
        if self.unshared_params:  # one pass through the heads only: autograd stops at the inputs it needs
            total = torch.stack([loss.reshape(()) for loss in losses]).sum()
            torch.autograd.backward(total, inputs=self.unshared_params, retain_graph=True)

    def _backward_into_output(
        self, tensors: Sequence[Tensor], grad_tensors: Sequence[Tensor], retain_graph: bool
    ) -> None:
        """One backward of ``tensors`` with ``grad_tensors`` into ``output``, whose views become the
        shared ``.grad``. Each parameter's gradient is written into its view as autograd produces it
        (a copy, or an add onto what ``.grad`` held, which joins the aggregate) and then freed: no
        zero-fill and no read-modify-write of all N, and never more than one parameter's gradient."""
        adds = []
        for p, view in zip(self.params, self._output_views):
            held = p.grad
            if held is None or not self.accumulate:
                adds.append(False)
                continue
            if not (held.data_ptr() == view.data_ptr() and held.shape == view.shape):
                view.copy_(held)
            adds.append(True)
        written = [False] * len(self.params)

        def writer(i: int, view: Tensor) -> Callable[[Tensor], Tensor]:
            def write(grad: Tensor) -> Tensor:
                view.add_(grad) if adds[i] else view.copy_(grad)
                written[i] = True
                return grad.new_zeros(()).expand(grad.shape)  # freed here; autograd keeps a stride-0 zero

            return write

        handles = [p.register_hook(writer(i, v)) for i, (p, v) in enumerate(zip(self.params, self._output_views))]
        try:
            torch.autograd.grad(tensors, self.params, grad_tensors, retain_graph=retain_graph, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        for p, view, add, wrote in zip(self.params, self._output_views, adds, written):
            if not (add or wrote):
                view.zero_()  # a parameter this backward did not reach
            p.grad = view

    def __repr__(self) -> str:
        return (
            f"GradientBuffer(num_sources={self.num_sources}, params={len(self.params)}, numel={self.numel}, "
            f"unshared_params={len(self.unshared_params)}, accumulate={self.accumulate}, mode={self.mode!r}, "
            f"level={self.level!r})"
        )
