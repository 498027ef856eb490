"""``GradientBuffer(..., mode="low_memory")``: the exact aggregate without a K x N buffer.

A Gramian aggregator's result is ``w^T J`` with ``w = weighting(G)``, ``G = J J^T``; neither step
needs J whole. So a round is:

1. ``backward(losses)``: one batched backward of the K losses (``torch.func.vmap`` over
   ``torch.autograd.grad`` with the identity cotangents). A hook on every shared parameter receives
   its K x n_p block of J as autograd produces it, adds ``block @ block^T`` to the K x K float64 G,
   and hands autograd a zero-stride tensor back, so the block is freed at once. The graph is kept.
2. ``aggregate(aggregator)``: ``w = weighting(G)`` (state, non-finite check and stats as the buffer
   mode's), then one backward of ``sum_k w_k L_k`` into the shared ``.grad``, which is ``w^T J``.

Peak memory: K copies of the backward's activation cotangents and one K x n_p block, against the
buffer mode's K x N rows; the mode saves memory when the parameters outweigh the activations (MLPs,
transformers at modest batch), not on conv nets (large activations, few parameters).
:class:`MemoryEstimate` says which, from the saved tensors of a measured forward.

Reading the K x n_p block off vmap's batched tensor uses ``torch._C._functorch`` (private). If that
API is missing, or the model's backward has no batching rule (``.item()`` in a custom backward, some
ops), the Gram is built from ordinary backward passes instead: one reference row (N elements) held
at a time and each other source's gradient folded against it, 1 + K(K-1)/2 passes, still never
K x N. That fallback is announced once per buffer (``RuntimeWarning``), and :attr:`batched` says
which path ran. The same passes rebuild G when the batched one comes out non-finite: there every
loss's graph carries the other sources' zero cotangents, and 0 x inf = NaN would spoil every source.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._gradient_rounds import OutputRound, check_losses, is_gramian
from ._linear_gram import LinearLayer, find_linear_layers
from .aggregator import Aggregator
from .engine import has_float64, raise_if_nonfinite
from .stats import AggregationStats, stats_from_gram

__all__ = ["ActivationMeasure", "LowMemoryGradientBuffer", "MemoryEstimate", "estimate_memory", "measure_activations"]

log = logging.getLogger(__name__)

_MIB = 1 << 20


class ActivationMeasure:
    """What one forward saved for its backward: total bytes and the largest tensor's, parameters
    excluded (filled by :func:`measure_activations`)."""

    def __init__(self) -> None:
        self.total_bytes = 0
        self.largest_bytes = 0
        self._seen: set[tuple[int, int]] = set()

    def add(self, t: Tensor, skip: set[int]) -> None:
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if storage.data_ptr() in skip or key in self._seen:
            return  # a parameter (not an activation), or a storage already counted
        self._seen.add(key)
        self.total_bytes += storage.nbytes()
        self.largest_bytes = max(self.largest_bytes, storage.nbytes())


@contextmanager
def measure_activations(params: Sequence[Tensor] = ()) -> Iterator[ActivationMeasure]:
    """Counts the bytes of the tensors the forward inside the block saves for its backward
    (``torch.autograd.graph.saved_tensors_hooks``); storages of ``params`` are not counted."""
    measure = ActivationMeasure()
    skip = {p.untyped_storage().data_ptr() for p in params}

    def pack(t: Tensor) -> Tensor:
        measure.add(t, skip)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield measure


@dataclass(frozen=True)
class MemoryEstimate:
    """The extra memory of a step, over the model, activations and ``.grad``, in each mode.

    ``buffer_bytes``: K x N rows plus one backward's cotangents (about 2 x the largest activation);
    ``low_memory_bytes``: K copies of those cotangents plus the largest K x n_p block. Activations
    unmeasured (None) count as zero: the estimate then speaks for the parameters only.
    """

    num_sources: int
    params_numel: int
    largest_block: int
    element_size: int
    activation_bytes: int | None
    largest_activation_bytes: int | None

    @property
    def _cotangents(self) -> int:
        return 2 * (self.largest_activation_bytes or 0)

    @property
    def buffer_bytes(self) -> int:
        return self.num_sources * self.params_numel * self.element_size + self._cotangents

    @property
    def low_memory_bytes(self) -> int:
        return self.num_sources * (self.largest_block * self.element_size + self._cotangents)

    @property
    def saves(self) -> bool:
        return self.low_memory_bytes < self.buffer_bytes

    @property
    def message(self) -> str:
        k, s = self.num_sources, self.element_size
        if self.activation_bytes is None:
            acts = "activations not measured (wrap one forward in buf.measure_forward() to count them)"
        else:
            acts = (
                f"activations {self.activation_bytes / _MIB:.1f} MiB saved for backward, largest "
                f"{self.largest_activation_bytes / _MIB:.1f} MiB"  # type: ignore[operator]
            )
        verdict = "saves memory" if self.saves else 'saves no memory: use mode="buffer"'
        return (
            f"low_memory mode {verdict}: estimated {self.low_memory_bytes / _MIB:.2f} MiB per step "
            f"(K = {k} copies of the backward's cotangents + the largest K x {self.largest_block} block) against "
            f"{self.buffer_bytes / _MIB:.2f} MiB for the buffer mode (K x N = {k} x {self.params_numel} x {s} bytes); "
            f"{acts}"
        )


def estimate_memory(
    params: Sequence[Tensor],
    num_sources: int,
    activations: ActivationMeasure | None = None,
    losses: Sequence[Tensor] = (),
) -> MemoryEstimate:
    """The :class:`MemoryEstimate` of a step over the shared ``params`` with K = ``num_sources``; given
    the step's ``losses``, the wide linear layers that skip their block (see ``_linear_gram``) count
    no block."""
    roots = [loss.grad_fn for loss in losses]
    skipped = {id(layer.weight) for layer in find_linear_layers(roots, params, num_sources)} if roots else set()
    return MemoryEstimate(
        num_sources=num_sources,
        params_numel=sum(p.numel() for p in params),
        largest_block=max(p.numel() for p in params if id(p) not in skipped),
        element_size=params[0].element_size(),
        activation_bytes=None if activations is None else activations.total_bytes,
        largest_activation_bytes=None if activations is None else activations.largest_bytes,
    )


def _unwrap(grad: Tensor, k: int) -> Tensor:
    """The K x (shape) tensor behind vmap's per-source view ``grad`` (private functorch API)."""
    from torch._C import _functorch

    bdim = _functorch.maybe_get_bdim(grad)
    block = _functorch.get_unwrapped(grad)
    if bdim is None or bdim < 0 or block.ndim != grad.ndim + 1 or block.shape[bdim] != k:
        raise RuntimeError(f"unexpected batched gradient layout (batch dim {bdim}, shape {tuple(block.shape)})")
    return block.movedim(bdim, 0)


def _unbatch(grad: Tensor, k: int) -> Tensor:
    """The K x n_p block behind vmap's per-source view ``grad``."""
    return _unwrap(grad, k).reshape(k, -1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1)).to(torch.float64)


class LowMemoryGradientBuffer(OutputRound):
    """``GradientBuffer(..., mode="low_memory")`` (see the module docstring).

    Attributes beyond the buffer mode's: ``gram`` (the round's K x K float64 G, after ``backward``),
    ``batched`` (whether the last ``backward`` ran the batched path; False after a fallback),
    ``memory_estimate`` (a :class:`MemoryEstimate`, from the first ``backward``).
    """

    mode = "low_memory"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.gram: Tensor | None = None
        self.batched = True
        self.memory_estimate: MemoryEstimate | None = None
        self._activations: ActivationMeasure | None = None
        self._fallback_announced = False
        self.linear_gram = True  # wide nn.Linear weights through x x^T (see _linear_gram); False: every block
        self.linear_layers = 0  # how many layers the last batched backward took that way

    @contextmanager
    def measure_forward(self) -> Iterator[ActivationMeasure]:
        """Wrap a forward in this block to count its activations for :attr:`memory_estimate`."""
        with measure_activations([*self.params, *self.unshared_params]) as measure:
            yield measure
        self._activations = measure
        self.memory_estimate = None  # re-estimated at the next backward

    def _say_estimate(self, losses: list[Tensor]) -> None:
        if self.memory_estimate is not None:
            return
        roots = losses if self.linear_gram else []
        self.memory_estimate = estimate = estimate_memory(self.params, self.num_sources, self._activations, roots)
        if estimate.saves:
            log.info(estimate.message)
        else:
            log.warning(estimate.message)
            warnings.warn(estimate.message, RuntimeWarning, stacklevel=4)

    def backward(self, losses: Sequence[Tensor] | Mapping[str, Tensor], *, retain_graph: bool = False) -> None:
        """Folds the K losses' gradients into :attr:`gram` (one batched backward) and gives the heads
        their plain gradients; the graph is kept for :meth:`aggregate`'s combined backward."""
        losses = check_losses(losses, self.num_sources)
        self._say_estimate(losses)
        self._open_round(losses, retain_graph)
        try:
            self.gram = self._gram(losses)
            self._plain_head_gradients(losses)
        except BaseException:
            self._pending = None
            raise

    def _gram(self, losses: list[Tensor]) -> Tensor:
        try:
            gram = self._batched_gram(losses)
            self.batched = True
            if not bool(torch.isfinite(gram).all()):
                # In one batched pass every loss's graph carries the other sources' zero cotangents, and
                # 0 x inf = NaN: one non-finite source spoils them all. Per-source passes keep the others
                # finite, so the non-finite check names the same sources as the buffer mode.
                log.info("low_memory mode: a non-finite source; its Gram matrix is rebuilt from per-source passes")
                gram = self._sequential_gram(losses)
            return gram
        except Exception as exc:  # no batching rule, or functorch's private API changed: exact fallback
            self.batched = False
            if not self._fallback_announced:
                self._fallback_announced = True
                message = (
                    f"low_memory mode: the batched backward failed ({type(exc).__name__}: {exc}); building the "
                    f"Gram matrix from ordinary backward passes instead (1 + K(K-1)/2 = "
                    f"{1 + self.num_sources * (self.num_sources - 1) // 2} passes, no K x N buffer); "
                    'mode="buffer" takes K passes'
                )
                log.warning(message)
                warnings.warn(message, RuntimeWarning, stacklevel=4)
            return self._sequential_gram(losses)

    def _new_gram(self) -> Tensor:
        dtype = torch.float64 if has_float64(self.device) else self.dtype
        return torch.zeros((self.num_sources, self.num_sources), dtype=dtype, device=self.device)

    def _batched_gram(self, losses: list[Tensor]) -> Tensor:
        k = self.num_sources
        gram = self._new_gram()
        stacked = torch.stack([loss.reshape(()) for loss in losses])

        def fold(grad: Tensor) -> Tensor:
            block = _unbatch(grad, k)
            gram.add_((block @ block.T).to(gram.dtype))
            return grad.new_zeros(()).expand(grad.shape)  # block freed; autograd keeps a stride-0 zero

        # Wide linear layers: their weight's share of G from x x^T and the output gradients, never the
        # K x out x in block (see _linear_gram); their weights stay out of the batched backward.
        layers = find_linear_layers([loss.grad_fn for loss in losses], self.params, k) if self.linear_gram else []
        self.linear_layers = len(layers)
        skipped = {id(layer.weight) for layer in layers}
        inputs = [p for p in self.params if id(p) not in skipped]

        def fold_layer(layer: LinearLayer) -> Callable[[Sequence[Tensor | None]], None]:
            def pre_hook(grad_outputs: Sequence[Tensor | None]) -> None:
                layer.calls += 1
                gram.add_(layer.gram(_unwrap(grad_outputs[0], k)).to(gram.dtype))  # type: ignore[arg-type]

            return pre_hook

        def vjp(cotangent: Tensor) -> Tensor:
            torch.autograd.grad(stacked, inputs, cotangent, retain_graph=True, allow_unused=True)
            return stacked.new_zeros(())

        handles = [p.register_hook(fold) for p in inputs]
        handles += [layer.node.register_prehook(fold_layer(layer)) for layer in layers]  # type: ignore[attr-defined]
        try:
            torch.func.vmap(vjp)(torch.eye(k, dtype=stacked.dtype, device=stacked.device))
        finally:
            for handle in handles:
                handle.remove()
        missed = [tuple(layer.weight.shape) for layer in layers if layer.calls != 1]
        if missed:
            raise RuntimeError(f"the gradient of linear layer(s) {missed} did not reach their hook exactly once")
        return gram

    def _grads(self, loss: Tensor) -> list[Tensor | None]:
        return list(torch.autograd.grad(loss, self.params, retain_graph=True, allow_unused=True))

    def _sequential_gram(self, losses: list[Tensor]) -> Tensor:
        """G from plain passes holding one reference row: round i folds g_j (j > i) against g_i and
        keeps g_{i+1}, the last one it computes, as the next reference."""
        k = self.num_sources
        gram = self._new_gram()

        def dots(a: list[Tensor | None], b: list[Tensor | None]) -> Tensor:
            terms = [_dot(x, y) for x, y in zip(a, b) if x is not None and y is not None]
            return torch.stack(terms).sum() if terms else gram.new_zeros(())

        ref = self._grads(losses[0])
        gram[0, 0] = dots(ref, ref)
        for i in range(k - 1):
            following = None
            for j in range(k - 1, i, -1):
                row = self._grads(losses[j])
                gram[i, j] = gram[j, i] = dots(ref, row)
                if j == i + 1:
                    gram[j, j] = dots(row, row)
                    following = row
                del row
            ref = following
        return gram

    def aggregate(
        self, aggregator: Aggregator, *, return_stats: bool = False
    ) -> Tensor | tuple[Tensor, AggregationStats]:
        """Weights from :attr:`gram`, then one backward of ``sum_k w_k L_k`` into ``output`` (the
        shared ``.grad``). Only Gramian aggregators (:func:`is_gramian`); others raise ``ValueError``."""
        if not is_gramian(aggregator):
            raise ValueError(
                f"{type(aggregator).__name__} is not a function of the Gram matrix (coordinate-wise, a K x N "
                'state, or not a Tolaria aggregator), so mode="low_memory" cannot run it: use mode="buffer"'
            )
        losses, retain_graph = self._close_round()
        gram = self.gram
        assert gram is not None
        if aggregator.nonfinite == "raise":
            raise_if_nonfinite(gram)
        weights, conflicts = aggregator.weighting(gram)
        cotangents = [w.to(loss.dtype).reshape(loss.shape) for w, loss in zip(weights, losses)]
        self._backward_into_output(losses, cotangents, retain_graph)
        if return_stats:
            return self.output, stats_from_gram(gram, weights, conflicts)
        return self.output
