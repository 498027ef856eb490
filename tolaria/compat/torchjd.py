"""TorchJD's ``torchjd.autojac`` functions (github.com/SimplexLab/TorchJD, 0.18), on Tolaria's engine.

``from tolaria.compat.torchjd import backward, mtl_backward, jac_to_grad`` replaces
``from torchjd.autojac import backward, mtl_backward, jac_to_grad``: the same signatures, the same
``.jac`` and ``.grad`` fields, the same numbers. What TorchJD 0.18 does, and this module repeats:

- ``backward(tensors, /, *, jac_tensors=None, inputs=None, retain_graph=False, parallel_chunk_size=None)``
  accumulates into each input's ``.jac`` the Jacobian of ``tensors`` (left-multiplied by
  ``jac_tensors``; by default the identity: one row per element of ``tensors``). ``inputs`` defaults to
  the leaf tensors of the graph (a walk from the tensors' ``grad_fn``). ``.grad`` is left alone.
- ``mtl_backward(tensors, /, features, *, grad_tensors=None, tasks_params=None, shared_params=None,
  retain_graph=False, parallel_chunk_size=None)``: the Jacobian of the K task tensors over the shared
  parameters, through the ``features`` only, accumulated into their ``.jac`` (one row per task); each
  task's plain gradient over its own parameters accumulated into their ``.grad``.
- ``jac_to_grad(tensors, /, aggregator, *, retain_jac=False, optimize_gramian_computation=False)``
  aggregates the ``.jac`` fields, accumulates the result into ``.grad`` (``grad += result``, or a new
  ``.grad``), deletes ``.jac`` unless ``retain_jac``, and returns the weights when the aggregator combines
  the rows with weights (every Tolaria aggregator but the coordinate-wise GradDrop and TrimmedMean;
  TorchJD's ``WeightedAggregator`` subclasses), in the gradients' dtype; otherwise ``None``.
- Accumulation: ``.jac`` sums over calls (``jac += new``), as TorchJD's; a ``.jac`` of another shape
  raises ``RuntimeError``.

The aggregator is a Tolaria aggregator, a TorchJD aggregator, or any callable mapping the K x N
matrix to an N-vector. :func:`as_torchjd` gives a Tolaria aggregator TorchJD's ``weighting`` /
``gramian_weighting`` attributes, for code that calls those itself.

The older form, which most published TorchJD examples use (TorchJD 0.3 to 0.8), passes the aggregator
to ``backward`` / ``mtl_backward`` and aggregates into ``.grad`` in the same call, leaving ``.jac``
alone: ``backward(tensors, aggregator, inputs=None, retain_graph=False, parallel_chunk_size=None)`` and
``mtl_backward(losses, features, aggregator, tasks_params=None, shared_params=None, retain_graph=False,
parallel_chunk_size=None)`` (``aggregator`` and ``losses`` also by keyword). TorchJD 0.2's
``backward(tensors, inputs, A=aggregator)`` and ``mtl_backward(losses, features, tasks_params,
shared_params, A=aggregator)`` work too. ``inspect.signature`` shows the 0.18 signatures.

How it differs inside (not in results):

- One buffer. Each call allocates one K x N matrix per dtype and device of its inputs (one, for a
  usual model; rows padded apart to 32 elements, as :class:`~tolaria.aggregation.GradientBuffer`'s),
  and every input's ``.jac`` is the K x (its shape) view of its columns: nothing is copied. A second
  call that accumulates adds its fresh buffer into the first one's views (``jac += new``, as TorchJD).
- No ``torch.vmap``: row k is one ordinary backward pass, with the inputs' ``.grad`` bound to views of
  row k while it runs (their own ``.grad`` is put back afterwards). ``parallel_chunk_size`` is validated
  as TorchJD validates it and otherwise ignored: the passes always run one row at a time (TorchJD's
  ``parallel_chunk_size=1``), which also avoids vmap's limitations (compiled models, ``retain_grad``,
  RNNs on CUDA). For scalar losses that is K passes, as vmap's; for the identity Jacobian of a
  non-scalar tensor it is one pass per element, slower than TorchJD's vmap for large tensors.
- ``jac_to_grad``'s fast path: when the tensors' ``.jac`` are views of one K x S row-major tensor that
  tile its first N columns exactly (what one ``backward`` / ``mtl_backward`` call leaves), the K x N
  matrix is aggregated where it lies, with one Gram pass and one combine (Tolaria's aggregators, and
  TorchJD's Gramian-based ones under ``optimize_gramian_computation=True``) or by the aggregator itself
  (TorchJD's, otherwise), and the result is one flat tensor whose views become the new ``.grad``.
  Otherwise (``.jac`` from several calls over different inputs, from several dtypes, replaced by the
  caller, or a subset of a buffer's tensors) the ``.jac`` are flattened and concatenated as TorchJD
  does, which copies them once; :func:`concatenation_fallbacks` counts those calls. With
  ``optimize_gramian_computation=True`` the fallback sums per-tensor Gram matrices instead (as
  TorchJD), for Tolaria aggregators on the base ``__call__`` and TorchJD's Gramian-weighted ones.
- A tensor repeated in ``jac_to_grad``'s ``tensors`` counts once (TorchJD 0.18.2's fix; 0.18.0 fails on it).
- ``create_graph`` does not exist in TorchJD's signatures and is not supported: the Jacobians carry no
  graph.
"""

from __future__ import annotations

import inspect
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ..aggregation import Aggregator, Weights
from ..aggregation._sources import as_sources
from ..aggregation.engine import aggregate, has_float64, raise_if_nonfinite, select_backend

from ..aggregation._coordinatewise import CoordinatewiseAggregator  # GradDrop, TrimmedMean: no weights

__all__ = ["as_torchjd", "backward", "concatenation_fallbacks", "jac_to_grad", "mtl_backward"]

_ROW_ALIGN = 32  # elements, as GradientBuffer's rows
_fallbacks = 0


def concatenation_fallbacks() -> int:
    """How many ``jac_to_grad`` calls (in this process) could not aggregate one buffer in place and
    concatenated the ``.jac`` fields instead (see the module docstring)."""
    return _fallbacks


# --------------------------------------------------------------------------------------------------
# Validation


def _as_unique_list(tensors: Any, name: str) -> list[Tensor]:
    items = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    for i, t in enumerate(items):
        if not isinstance(t, Tensor):
            raise TypeError(f"`{name}[{i}]` is a {type(t).__name__}, not a tensor")
    if len({id(t) for t in items}) != len(items):
        raise ValueError(f"`{name}` should contain unique elements.")
    return items


def _dedupe(tensors: Iterable[Tensor], name: str) -> list[Tensor]:
    seen: set[int] = set()
    out = []
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"`{name}` item {i} is a {type(t).__name__}, not a tensor")
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _check_chunk_size(parallel_chunk_size: int | None) -> None:
    if parallel_chunk_size is None:
        return
    if isinstance(parallel_chunk_size, bool) or not isinstance(parallel_chunk_size, int) or parallel_chunk_size <= 0:
        raise ValueError(f"`parallel_chunk_size` should be `None` or greater than `0`. (got {parallel_chunk_size!r})")


def _check_expects(tensors: Iterable[Tensor], field: str, name: str) -> None:
    for i, t in enumerate(tensors):
        if not (t.requires_grad and (t.is_leaf or t.retains_grad)):
            raise ValueError(
                f"cannot populate the {field} field of `{name}[{i}]` (shape {tuple(t.shape)}): a tensor must satisfy "
                "`tensor.requires_grad and (tensor.is_leaf or tensor.retains_grad)`"
            )


def _check_same_rows(jacobians: Sequence[Tensor], name: str) -> None:
    for i, j in enumerate(jacobians):
        if j.dim() == 0 or j.shape[0] != jacobians[0].shape[0]:
            rows = "no first dimension" if j.dim() == 0 else f"{j.shape[0]} rows"
            raise ValueError(
                f"All Jacobians in `{name}` should have the same number of rows: `{name}[0]` has "
                f"{jacobians[0].shape[0]} rows, `{name}[{i}]` has {rows}."
            )


# --------------------------------------------------------------------------------------------------
# The leaves of a graph


def _leaves(roots: Sequence[Tensor], excluded: Sequence[Tensor], name: str) -> list[Tensor]:
    """The tensors whose ``AccumulateGrad`` nodes a breadth-first walk from the roots' ``grad_fn``
    reaches without entering the ``excluded`` tensors' ``grad_fn``: the leaves the roots depend on."""
    for i, t in enumerate(roots):
        if t.grad_fn is None:
            raise ValueError(
                f"`{name}[{i}]` has no grad_fn (it is a leaf, or does not require grad), so the tensors to "
                "differentiate with respect to cannot be found from it: pass them explicitly"
            )
    stop = {t.grad_fn for t in excluded if t.grad_fn is not None}
    seen = set(stop)
    queue: deque = deque()
    for t in roots:
        if t.grad_fn not in seen:
            seen.add(t.grad_fn)
            queue.append(t.grad_fn)
    leaves: list[Tensor] = []
    known: set[int] = set()
    while queue:
        node = queue.popleft()
        variable = getattr(node, "variable", None)
        if type(node).__name__ == "AccumulateGrad" and isinstance(variable, Tensor) and id(variable) not in known:
            known.add(id(variable))
            leaves.append(variable)
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                queue.append(child)
    return leaves


# --------------------------------------------------------------------------------------------------
# The K x N buffer and the row-by-row backward passes


class _JacobianBuffers:
    """One K x N matrix per (dtype, device) of ``params`` (one, usually); each parameter owns a run
    of columns. ``row(r)`` are the parameter-shaped views of row r, ``jacobians()`` the K x (shape)
    views that become ``.jac``."""

    def __init__(self, params: Sequence[Tensor], k: int):
        self.params = list(params)
        self.k = k
        groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, p in enumerate(self.params):
            groups.setdefault((p.dtype, p.device), []).append(i)
        self._place: list[tuple[Tensor, int, int]] = [None] * len(self.params)  # (storage, offset, numel)
        self.storages: list[Tensor] = []
        for (dtype, device), members in groups.items():
            n = sum(self.params[i].numel() for i in members)
            stride = -(-n // _ROW_ALIGN) * _ROW_ALIGN
            storage = torch.zeros((k, stride), dtype=dtype, device=device)
            self.storages.append(storage)
            offset = 0
            for i in members:
                self._place[i] = (storage, offset, self.params[i].numel())
                offset += self.params[i].numel()

    def row(self, r: int) -> list[Tensor]:
        return [s[r, o : o + n].view(p.shape) for (s, o, n), p in zip(self._place, self.params)]

    def jacobians(self) -> list[Tensor]:
        return [s[:, o : o + n].view(self.k, *p.shape) for (s, o, n), p in zip(self._place, self.params)]


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _backward_rows(
    buffers: _JacobianBuffers,
    passes: Iterator[tuple[Sequence[Tensor], Sequence[Tensor]]],
    retain_graph: bool,
) -> None:
    """Row r of the buffers receives the r-th pass: ``outputs`` backpropagated with ``grad_outputs``
    into the buffers' parameters only (their ``.grad`` bound to views of row r meanwhile). The graph
    is freed after the last pass unless ``retain_graph``."""
    params = buffers.params
    if not params or buffers.k == 0:
        return
    saved = [p.grad for p in params]
    try:
        for r, (outputs, grad_outputs) in enumerate(passes):
            views = buffers.row(r)
            for p, v in zip(params, views):
                p.grad = v
            torch.autograd.backward(
                list(outputs), list(grad_outputs), retain_graph=retain_graph or r + 1 < buffers.k, inputs=params
            )
            for p, v in zip(params, views):
                # A leaf's gradient lands in the bound view in place; a non-leaf's (retain_grad) is
                # written out of place as view + gradient: copy it back into the row.
                g = p.grad
                if g is not None and not _same_tensor(g, v):
                    v.copy_(g)
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def _identity_passes(tensors: Sequence[Tensor]) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
    """One pass per element of each tensor, in order (the rows of the identity Jacobian)."""
    for t in tensors:
        if t.dim() == 0:
            yield [t], [torch.ones_like(t)]
            continue
        for j in range(t.numel()):
            one_hot = torch.zeros_like(t)
            one_hot.view(-1)[j] = 1
            yield [t], [one_hot]


def _jacobian_passes(tensors: Sequence[Tensor], jacobians: Sequence[Tensor]) -> Iterator[tuple[list, list]]:
    for r in range(jacobians[0].shape[0]):
        yield tensors, [j[r] for j in jacobians]


def _accumulate_jacs(params: Sequence[Tensor], jacobians: Sequence[Tensor]) -> None:
    for p, j in zip(params, jacobians):
        existing = getattr(p, "jac", None)
        if existing is not None:
            if existing.shape != j.shape:
                raise RuntimeError(
                    f"attempting to accumulate a Jacobian of size {list(j.shape)} into the .jac of size "
                    f"{list(existing.shape)} of a tensor of size {list(p.shape)}: the number of rows (tasks, "
                    "losses) changed between calls; call jac_to_grad, or delete .jac, in between"
                )
            existing += j
        else:
            p.jac = j


def _accumulate_grad(p: Tensor, g: Tensor) -> None:
    if p.grad is not None:
        p.grad += g
    else:
        p.grad = g


# --------------------------------------------------------------------------------------------------
# Aggregation


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
    if optimize and (isinstance(aggregator, CoordinatewiseAggregator) or not (
        isinstance(aggregator, Aggregator) or _gram_weighted_torchjd(aggregator)
    )):
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


# --------------------------------------------------------------------------------------------------
# jac_to_grad


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


# --------------------------------------------------------------------------------------------------
# backward


def _backward(
    tensors: Any,
    jac_tensors: Any,
    inputs: Iterable[Tensor] | None,
    retain_graph: bool,
    parallel_chunk_size: int | None,
    aggregator: Any = None,
) -> None:
    _check_chunk_size(parallel_chunk_size)
    tensors_ = _as_unique_list(tensors, "tensors")
    if not tensors_:
        raise ValueError("`tensors` cannot be empty.")
    inputs_ = _leaves(tensors_, [], "tensors") if inputs is None else _dedupe(
        [inputs] if isinstance(inputs, Tensor) else inputs, "inputs"
    )
    if jac_tensors is None:
        k = sum(t.numel() for t in tensors_)
        passes = _identity_passes(tensors_)
    else:
        jacobians = [jac_tensors] if isinstance(jac_tensors, Tensor) else list(jac_tensors)
        if len(jacobians) != len(tensors_):
            raise ValueError(
                f"`jac_tensors` should have the same length as `tensors`. (got {len(jacobians)} and {len(tensors_)})"
            )
        for i, (j, t) in enumerate(zip(jacobians, tensors_)):
            if not isinstance(j, Tensor) or j.shape[1:] != t.shape or j.dim() != t.dim() + 1:
                shape = tuple(j.shape) if isinstance(j, Tensor) else type(j).__name__
                raise ValueError(
                    f"Shape mismatch: `jac_tensors[{i}]` has shape {shape} but `tensors[{i}]` has shape "
                    f"{tuple(t.shape)}; `jac_tensors[{i}]` should have the shape of `tensors[{i}]` after a first "
                    "dimension (the number of rows)."
                )
        _check_same_rows(jacobians, "jac_tensors")
        k = jacobians[0].shape[0]
        passes = _jacobian_passes(tensors_, jacobians)
    if aggregator is not None:
        _check_aggregator(aggregator, False)
        _check_expects(inputs_, ".grad", "inputs")
    else:
        _check_expects(inputs_, ".jac", "inputs")
    buffers = _JacobianBuffers(inputs_, k)
    _backward_rows(buffers, passes, retain_graph)
    if aggregator is None:
        _accumulate_jacs(inputs_, buffers.jacobians())
    elif inputs_ and k:
        _aggregate_into_grads(inputs_, buffers.jacobians(), aggregator, False)


def _backward_v018(tensors, /, *, jac_tensors=None, inputs=None, retain_graph=False, parallel_chunk_size=None):
    """TorchJD 0.18."""


def _backward_v03(tensors, aggregator, inputs=None, retain_graph=False, parallel_chunk_size=None):
    """TorchJD 0.3 to 0.8: the aggregator in the call."""


def _backward_v02(tensors, inputs, A, retain_graph=False, parallel_chunk_size=None):
    """TorchJD 0.2: inputs second, the aggregator as ``A``."""


def backward(*args: Any, **kwargs: Any) -> None:
    """Accumulates into each input's ``.jac`` the Jacobian of ``tensors`` with respect to it,
    left-multiplied by ``jac_tensors``; TorchJD 0.18's ``backward``:
    ``backward(tensors, /, *, jac_tensors=None, inputs=None, retain_graph=False, parallel_chunk_size=None)``.

    Args:
        tensors: the tensor or tensors to differentiate (non-empty, unique).
        jac_tensors: one tensor per tensor, of its shape after a first dimension K shared by all: row r
            backpropagates ``[J[r] for J in jac_tensors]``. Default: the identity, one row per element of
            ``tensors`` (K = the number of losses, for scalar losses).
        inputs: the tensors whose ``.jac`` receive their K x (shape) Jacobian (each must satisfy
            ``requires_grad and (is_leaf or retains_grad)``). Default: the leaf tensors ``tensors``
            depend on.
        retain_graph: keep the graph after the last pass.
        parallel_chunk_size: validated (``None`` or a positive int) and otherwise ignored: the rows are
            always computed one backward pass at a time (see the module docstring).

    The older form, ``backward(tensors, aggregator, inputs=None, retain_graph=False,
    parallel_chunk_size=None)`` (TorchJD 0.3 to 0.8; ``backward(tensors, inputs, A=aggregator)`` for 0.2),
    aggregates the Jacobian at once and accumulates the result into the inputs' ``.grad``; ``.jac`` is
    left alone.
    """
    if "A" in kwargs:
        b = inspect.signature(_backward_v02).bind(*args, **kwargs)
        b.apply_defaults()
        a = b.arguments
        return _backward(a["tensors"], None, a["inputs"], a["retain_graph"], a["parallel_chunk_size"], _required(a["A"]))
    if len(args) > 1 or "aggregator" in kwargs:
        b = inspect.signature(_backward_v03).bind(*args, **kwargs)
        b.apply_defaults()
        a = b.arguments
        return _backward(
            a["tensors"], None, a["inputs"], a["retain_graph"], a["parallel_chunk_size"], _required(a["aggregator"])
        )
    b = inspect.signature(_backward_v018).bind(*args, **kwargs)
    b.apply_defaults()
    a = b.arguments
    return _backward(a["tensors"], a["jac_tensors"], a["inputs"], a["retain_graph"], a["parallel_chunk_size"])


def _required(aggregator: Any) -> Any:
    if aggregator is None:
        raise TypeError("the aggregator of the older backward / mtl_backward form cannot be None")
    return aggregator


# --------------------------------------------------------------------------------------------------
# mtl_backward


def _mtl_backward(
    tensors: Any,
    features: Any,
    grad_tensors: Sequence[Tensor] | None,
    tasks_params: Sequence[Iterable[Tensor]] | None,
    shared_params: Iterable[Tensor] | None,
    retain_graph: bool,
    parallel_chunk_size: int | None,
    aggregator: Any = None,
) -> None:
    _check_chunk_size(parallel_chunk_size)
    tensors_ = _as_unique_list(tensors, "tensors")
    features_ = _as_unique_list(features, "features")
    if not features_:
        raise ValueError("`features` cannot be empty.")
    if not tensors_:
        raise ValueError("`tensors` cannot be empty.")
    shared = _leaves(features_, [], "features") if shared_params is None else _dedupe(
        [shared_params] if isinstance(shared_params, Tensor) else shared_params, "shared_params"
    )
    if tasks_params is None:
        tasks = [_leaves([t], features_, "tensors") for t in tensors_]
    else:
        tasks = [_dedupe([ps] if isinstance(ps, Tensor) else ps, "tasks_params") for ps in tasks_params]
    if len(tasks) != len(tensors_):
        raise ValueError(f"`tensors` and `tasks_params` should have the same size. (got {len(tensors_)} and {len(tasks)})")
    shared_ids = {id(p) for p in shared}
    if any(id(p) in shared_ids for ps in tasks for p in ps):
        raise ValueError("`tasks_params` should contain no tensor in common with `shared_params`.")
    if grad_tensors is None:
        for i, t in enumerate(tensors_):
            if t.dim() > 0:
                raise ValueError(
                    f"`tensors[{i}]` has shape {tuple(t.shape)}: when `tensors` are non-scalar, the `grad_tensors` "
                    "parameter must be provided."
                )
        grads_out = [torch.ones_like(t) for t in tensors_]
    else:
        grads_out = list(grad_tensors)
        if len(grads_out) != len(tensors_):
            raise ValueError(
                f"`grad_tensors` should have the same length as `tensors`. (got {len(grads_out)} and {len(tensors_)})"
            )
        for i, (g, t) in enumerate(zip(grads_out, tensors_)):
            if not isinstance(g, Tensor) or g.shape != t.shape:
                shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
                raise ValueError(
                    f"Shape mismatch: `grad_tensors[{i}]` has shape {shape} but `tensors[{i}]` has shape "
                    f"{tuple(t.shape)}."
                )
    for i, ps in enumerate(tasks):
        _check_expects(ps, ".grad", f"tasks_params[{i}]")
    if aggregator is not None:
        _check_aggregator(aggregator, False)
    _check_expects(shared, ".grad" if aggregator is not None else ".jac", "shared_params")

    # Stage 1, per task: its gradient over its own parameters (into their .grad) and over the features
    # (a row of the features' Jacobian).
    k = len(tensors_)
    feature_rows: list[list[Tensor]] = [[] for _ in features_]
    for t, g, ps in zip(tensors_, grads_out, tasks):
        wrt = [*ps, *features_]
        found = torch.autograd.grad([t], wrt, [g], retain_graph=retain_graph, allow_unused=True)
        found = [torch.zeros_like(x) if d is None else d for d, x in zip(found, wrt)]
        for p, d in zip(ps, found[: len(ps)]):
            _accumulate_grad(p, d)
        for rows, d in zip(feature_rows, found[len(ps) :]):
            rows.append(d)
    # Stage 2: row k of the shared parameters' Jacobian is the features' backward with task k's row.
    feature_jacobians = [torch.stack(rows) for rows in feature_rows]
    buffers = _JacobianBuffers(shared, k)
    _backward_rows(buffers, _jacobian_passes(features_, feature_jacobians), retain_graph)
    if aggregator is None:
        _accumulate_jacs(shared, buffers.jacobians())
    elif shared:
        _aggregate_into_grads(shared, buffers.jacobians(), aggregator, False)


def _mtl_backward_v018(
    tensors,
    /,
    features,
    *,
    grad_tensors=None,
    tasks_params=None,
    shared_params=None,
    retain_graph=False,
    parallel_chunk_size=None,
):
    """TorchJD 0.18."""


def _mtl_backward_v03(
    losses, features, aggregator, tasks_params=None, shared_params=None, retain_graph=False, parallel_chunk_size=None
):
    """TorchJD 0.3 to 0.8: the aggregator in the call."""


def _mtl_backward_v02(
    losses, features, tasks_params, shared_params, A, retain_graph=False, parallel_chunk_size=None
):
    """TorchJD 0.2: the parameters before the aggregator ``A``."""


def mtl_backward(*args: Any, **kwargs: Any) -> None:
    """Multi-task backward; TorchJD 0.18's ``mtl_backward``: ``mtl_backward(tensors, /, features, *,
    grad_tensors=None, tasks_params=None, shared_params=None, retain_graph=False, parallel_chunk_size=None)``.

    The Jacobian of the K task tensors with respect to the shared parameters, through the
    ``features`` only (row k: task k's gradient at the features, backpropagated to the shared
    parameters), is accumulated into their ``.jac``; each task's plain gradient with respect to its
    own parameters is accumulated into their ``.grad`` (a parameter of several tasks gets the sum).

    Args:
        tensors: the K task tensors (losses, or non-scalar tensors with ``grad_tensors``).
        features: the last shared representation(s) (non-empty).
        grad_tensors: one gradient per tensor, of its shape (default: 1 for scalar tensors).
        tasks_params: the parameters of each task (default: the leaves of each tensor's graph that do
            not come through the features).
        shared_params: the shared parameters (default: the leaves of the features' graph); none in
            common with ``tasks_params``.
        retain_graph: keep the graph after the last pass.
        parallel_chunk_size: validated and otherwise ignored (one backward pass per task).

    The older form, ``mtl_backward(losses, features, aggregator, tasks_params=None, shared_params=None,
    retain_graph=False, parallel_chunk_size=None)`` (TorchJD 0.3 to 0.8; also with ``losses=`` and
    ``aggregator=`` by keyword, and 0.2's ``mtl_backward(losses, features, tasks_params, shared_params,
    A=aggregator)``), aggregates the shared parameters' Jacobian at once and accumulates it into their
    ``.grad``; ``.jac`` is left alone.
    """
    if "A" in kwargs:
        b = inspect.signature(_mtl_backward_v02).bind(*args, **kwargs)
        b.apply_defaults()
        a = b.arguments
        return _mtl_backward(
            a["losses"], a["features"], None, a["tasks_params"], a["shared_params"], a["retain_graph"],
            a["parallel_chunk_size"], _required(a["A"]),
        )
    if len(args) > 2 or "aggregator" in kwargs or "losses" in kwargs:
        b = inspect.signature(_mtl_backward_v03).bind(*args, **kwargs)
        b.apply_defaults()
        a = b.arguments
        return _mtl_backward(
            a["losses"], a["features"], None, a["tasks_params"], a["shared_params"], a["retain_graph"],
            a["parallel_chunk_size"], _required(a["aggregator"]),
        )
    b = inspect.signature(_mtl_backward_v018).bind(*args, **kwargs)
    b.apply_defaults()
    a = b.arguments
    return _mtl_backward(
        a["tensors"], a["features"], a["grad_tensors"], a["tasks_params"], a["shared_params"], a["retain_graph"],
        a["parallel_chunk_size"],
    )


backward.__signature__ = inspect.signature(_backward_v018)  # type: ignore[attr-defined]
mtl_backward.__signature__ = inspect.signature(_mtl_backward_v018)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------
# TorchJD-style view of a Tolaria aggregator


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

