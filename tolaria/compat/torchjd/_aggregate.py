"""Aggregation for ``tolaria.compat.torchjd``: ``jac_to_grad``, the adapters that run Tolaria's and
TorchJD's aggregators on a K x N matrix (in place when the ``.jac`` tile one buffer, else on the
concatenation, counted by :func:`concatenation_fallbacks`), and :class:`as_torchjd`, TorchJD's
aggregator interface on a Tolaria aggregator."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ...aggregation import Aggregator, Weights, as_sources
from ...aggregation._coordinatewise import CoordinatewiseAggregator  # GradDrop, TrimmedMean: no weights
from ...aggregation.engine import aggregate, has_float64, raise_if_nonfinite, select_backend
from ._graph import _check_expects, _check_same_rows, _dedupe

__all__ = ["as_torchjd", "concatenation_fallbacks", "jac_to_grad"]

_fallbacks = 0


def concatenation_fallbacks() -> int:
    """How many ``jac_to_grad`` calls (in this process) could not aggregate one buffer in place and
    concatenated the ``.jac`` fields instead (see :mod:`tolaria.compat.torchjd`)."""
    return _fallbacks


def _accumulate_grad(p: Tensor, g: Tensor) -> None:
    if p.grad is not None:
        p.grad += g
    else:
        p.grad = g


def _torchjd_bases() -> tuple[type, type] | None:
    """TorchJD's (WeightedAggregator, GramianWeightedAggregator), if TorchJD is loaded: an aggregator
    of TorchJD's implies it is, and Tolaria never imports TorchJD itself."""
    if "torchjd" not in sys.modules:
        return None
    try:
        from torchjd.aggregation import GramianWeightedAggregator, WeightedAggregator
    except ImportError:  # pragma: no cover - a TorchJD without these bases
        return None
    return WeightedAggregator, GramianWeightedAggregator


def _has_hooks(module: Any) -> bool:
    return bool(getattr(module, "_forward_hooks", None)) or bool(getattr(module, "_forward_pre_hooks", None))


def _gram_weighted_torchjd(aggregator: Any) -> bool:
    bases = _torchjd_bases()
    return (
        bases is not None
        and isinstance(aggregator, bases[1])
        and not _has_hooks(aggregator)
        and not _has_hooks(aggregator.weighting)
    )


def _gram_weighted_tolaria(aggregator: Any) -> bool:
    """A Tolaria aggregator whose result is exactly ``weighting(G) @ J`` (the base ``__call__``)."""
    return isinstance(aggregator, Aggregator) and type(aggregator).__call__ is Aggregator.__call__


def _check_aggregator(aggregator: Any, optimize: bool) -> None:
    if not callable(aggregator):
        raise TypeError(
            f"the aggregator must be a Tolaria aggregator, a TorchJD aggregator or a callable mapping the K x N "
            f"Jacobian to an N-vector, got {type(aggregator).__name__}"
        )
    if optimize and (
        isinstance(aggregator, CoordinatewiseAggregator)
        or not (isinstance(aggregator, Aggregator) or _gram_weighted_torchjd(aggregator))
    ):
        raise ValueError(
            "In order to use `jac_to_grad` with `optimize_gramian_computation=True`, you must provide an "
            "aggregator that computes weights based on the Gramian of the Jacobian (e.g. `UPGrad`, Tolaria's or "
            f"TorchJD's without forward hooks), got {type(aggregator).__name__}"
        )


def _aggregate_matrix(aggregator: Any, matrix: Tensor, optimize: bool) -> tuple[Tensor, Tensor | None]:
    """The N-vector aggregate of the K x N ``matrix`` (rows may be strided) and the weights, or
    ``None`` for an aggregator that does not combine the rows with weights."""
    k, n = matrix.shape
    if isinstance(aggregator, Aggregator):
        out = torch.empty(n, dtype=matrix.dtype, device=matrix.device)
        if isinstance(aggregator, CoordinatewiseAggregator):
            aggregator(matrix, out=out)
            return out, None
        fixed = aggregator._fixed_weights
        if fixed is not None and _gram_weighted_tolaria(aggregator):  # no Gram pass needed for the weights
            aggregator(matrix, out=out)
            return out, fixed(k, matrix.device).to(matrix.dtype)
        _, stats = aggregator(matrix, out=out, return_stats=True)
        return out, stats.weights.to(matrix.dtype)
    bases = _torchjd_bases()
    if bases is not None and isinstance(aggregator, bases[0]):
        if optimize and _gram_weighted_torchjd(aggregator):
            # TorchJD's Gramian weighting on Tolaria's two passes (Gram, combine) over the matrix.
            captured: list[Tensor] = []

            def weighting(gram: Tensor) -> Weights:
                w = aggregator.gramian_weighting(gram.to(matrix.dtype))
                captured.append(w)
                return Weights(w.to(gram.dtype), torch.zeros((), dtype=torch.int64, device=gram.device))

            out = torch.empty(n, dtype=matrix.dtype, device=matrix.device)
            flat, _ = aggregate(as_sources(matrix), weighting, nonfinite="propagate", out=out, with_stats=False)
            return flat, captured[0]
        weights: list[Tensor] = []
        handle = aggregator.weighting.register_forward_hook(lambda _m, _i, output: weights.append(output))
        try:
            vector = aggregator(matrix)
        finally:
            handle.remove()
        return _checked_vector(vector, aggregator, k, n), (weights[-1] if weights else None)
    return _checked_vector(aggregator(matrix), aggregator, k, n), None


def _checked_vector(vector: Any, aggregator: Any, k: int, n: int) -> Tensor:
    if not isinstance(vector, Tensor) or vector.numel() != n:
        got = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
        raise ValueError(
            f"{type(aggregator).__name__} returned {got} for the {k} x {n} Jacobian; an aggregator must return "
            f"one vector of {n} elements"
        )
    return vector.reshape(n)


def _aggregate_blocks(aggregator: Any, blocks: list[Tensor]) -> tuple[list[Tensor], Tensor]:
    """``optimize_gramian_computation`` on several K x n_i blocks: the weights from the sum of their
    Gram matrices, then each block's combination, with no concatenated copy."""
    if isinstance(aggregator, Aggregator):
        gram = None
        for block in blocks:
            g = select_backend(aggregator.backend, as_sources(block)).gram(as_sources(block))
            g = g.to(torch.float64) if has_float64(g.device) else g
            gram = g if gram is None else gram + g.to(gram.device)
        if aggregator.nonfinite == "raise":
            raise_if_nonfinite(gram)
        weights = aggregator.weighting(gram).weights
        results = []
        for block in blocks:
            sources = as_sources(block)
            impl = select_backend(aggregator.backend, sources)
            results.append(impl.combine(sources, weights.to(block.device), None, wide=aggregator.wide_combine))
        return results, weights.to(blocks[0].dtype)
    gram = sum(block @ block.T for block in blocks)
    weights = aggregator.gramian_weighting(gram)
    return [weights.to(block.dtype) @ block for block in blocks], weights


def _whole_buffer(tensors: Sequence[Tensor], jacobians: Sequence[Tensor]) -> tuple[Tensor, list[int]] | None:
    """When the Jacobians are views of one K x S row-major tensor that tile its first N columns
    exactly: that K x N matrix and each tensor's column offset. Otherwise ``None``."""
    base = jacobians[0]._base
    if base is None or base.dim() != 2 or not base.is_contiguous():
        return None
    k, stride = base.shape
    offsets, spans = [], []
    for t, j in zip(tensors, jacobians):
        if j._base is not base or j.shape != (k, *t.shape):
            return None
        n = t.numel()
        offset = j.storage_offset() - base.storage_offset()
        offsets.append(offset)
        if n == 0:
            continue
        if not 0 <= offset <= stride - n or j.stride() != base[:, offset : offset + n].view(j.shape).stride():
            return None
        spans.append((offset, n))
    spans.sort()
    end = 0
    for offset, n in spans:
        if offset != end:
            return None
        end += n
    if end == 0:
        return None
    offsets = [o if t.numel() else 0 for o, t in zip(offsets, tensors)]
    return base[:, :end], offsets


def _aggregate_into_grads(
    tensors: Sequence[Tensor], jacobians: Sequence[Tensor], aggregator: Any, optimize: bool
) -> Tensor | None:
    global _fallbacks
    whole = _whole_buffer(tensors, jacobians)
    if whole is not None:
        matrix, offsets = whole
        flat, weights = _aggregate_matrix(aggregator, matrix, optimize)
        grads = [flat[o : o + t.numel()].view(t.shape) for o, t in zip(offsets, tensors)]
    else:
        _fallbacks += 1
        k = jacobians[0].shape[0]
        blocks = [j.reshape(k, -1) for j in jacobians]
        if optimize and (_gram_weighted_tolaria(aggregator) or _gram_weighted_torchjd(aggregator)):
            parts, weights = _aggregate_blocks(aggregator, blocks)
        else:
            flat, weights = _aggregate_matrix(aggregator, torch.cat(blocks, dim=1), optimize)
            parts = list(flat.split([t.numel() for t in tensors]))
        grads = [g.reshape(t.shape) for g, t in zip(parts, tensors)]
    for t, g in zip(tensors, grads):
        _accumulate_grad(t, g.to(t.dtype))
    return weights


def jac_to_grad(
    tensors: Iterable[Tensor],
    /,
    aggregator: Any,
    *,
    retain_jac: bool = False,
    optimize_gramian_computation: bool = False,
) -> Tensor | None:
    """Aggregates the ``.jac`` fields of ``tensors`` and accumulates the result into their ``.grad``
    (``grad += result``, or a new ``.grad``); TorchJD 0.18's ``jac_to_grad``.

    Args:
        tensors: the tensors whose ``.jac`` to aggregate (repeated ones count once); all their Jacobians
            have the same number of rows.
        aggregator: a Tolaria aggregator, a TorchJD aggregator, or a callable mapping the K x N matrix
            to an N-vector.
        retain_jac: keep the ``.jac`` fields (default: deleted).
        optimize_gramian_computation: TorchJD's memory option for Gramian-based aggregators; with one
            buffer Tolaria never concatenates anyway. An aggregator that is not a function of the Gram
            matrix raises ``ValueError``, as in TorchJD.

    Returns:
        The K weights of the rows, in the gradients' dtype, for an aggregator that combines the rows
        with weights (Tolaria's, except GradDrop and TrimmedMean; TorchJD's ``WeightedAggregator``);
        ``None`` otherwise.

    When the ``.jac`` are the views of one buffer that a single ``backward`` / ``mtl_backward`` call
    made, the buffer is aggregated in place (one Gram pass and one combine for Tolaria's aggregators);
    otherwise the ``.jac`` are concatenated as TorchJD does (one copy; counted by
    :func:`concatenation_fallbacks`).
    """
    tensors_ = _dedupe([tensors] if isinstance(tensors, Tensor) else tensors, "tensors")
    if not tensors_:
        raise ValueError("The `tensors` parameter cannot be empty.")
    for i, t in enumerate(tensors_):
        if getattr(t, "jac", None) is None:
            raise ValueError(
                f"tensor {i} (shape {tuple(t.shape)}) has no .jac field: call backward or mtl_backward "
                "(tolaria.compat.torchjd) before jac_to_grad"
            )
    jacobians = [t.jac for t in tensors_]
    _check_same_rows(jacobians, "tensors.jac")
    _check_aggregator(aggregator, optimize_gramian_computation)
    _check_expects(tensors_, ".grad", "tensors")
    if not retain_jac:
        for t in tensors_:
            del t.jac
    return _aggregate_into_grads(tensors_, jacobians, aggregator, optimize_gramian_computation)


class as_torchjd:
    """A Tolaria aggregator seen through TorchJD's aggregator interface.

    ``as_torchjd(UPGrad())(matrix)`` aggregates the K x N matrix (TorchJD's ``aggregator(matrix)``);
    ``.weighting(matrix)`` returns the K weights from the matrix and ``.gramian_weighting(gram)`` from
    its K x K Gram matrix, in the input's dtype, as TorchJD's ``Weighting`` objects do. The weights
    come from the aggregator's own ``weighting`` on the float64 Gram matrix (its K x K work), so a
    stateful aggregator advances its state once per call of any of the three.
    """

    def __init__(self, aggregator: Aggregator):
        if not isinstance(aggregator, Aggregator):
            raise TypeError(f"as_torchjd takes a Tolaria aggregator, got {type(aggregator).__name__}")
        if isinstance(aggregator, CoordinatewiseAggregator):
            raise TypeError(f"{type(aggregator).__name__} is coordinate-wise: it has no weighting to expose")
        self.aggregator = aggregator

    def __call__(self, matrix: Tensor) -> Tensor:
        return _aggregate_matrix(self.aggregator, matrix, False)[0]

    def weighting(self, matrix: Tensor) -> Tensor:
        if matrix.dim() != 2:
            raise ValueError(f"weighting takes a K x N matrix, got shape {tuple(matrix.shape)}")
        sources = as_sources(matrix)
        gram = select_backend(self.aggregator.backend, sources).gram(sources)
        return self.gramian_weighting(gram).to(matrix.dtype)

    def gramian_weighting(self, gram: Tensor) -> Tensor:
        if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
            raise ValueError(f"gramian_weighting takes a K x K matrix, got shape {tuple(gram.shape)}")
        wide = gram.to(torch.float64) if has_float64(gram.device) else gram
        return self.aggregator.weighting(wide).weights.to(gram.dtype)

    def __repr__(self) -> str:
        return f"as_torchjd({self.aggregator!r})"
