"""The K x N Jacobian buffer of ``tolaria.compat.torchjd`` and the row-by-row backward passes.

One K x N matrix per dtype and device of the inputs (rows padded apart to 32 elements, as
:class:`~tolaria.aggregation.GradientBuffer`'s); row r is one ordinary backward pass with the inputs'
``.grad`` bound to views of row r (no ``torch.vmap``). :func:`run_backward` and
:func:`run_mtl_backward` are the bodies of ``backward`` and ``mtl_backward`` (both call forms: into
``.jac``, or aggregated at once into ``.grad`` when an aggregator is given).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ._aggregate import _accumulate_grad, _aggregate_into_grads, _check_aggregator
from ._graph import (
    _as_unique_list,
    _check_chunk_size,
    _check_expects,
    _check_same_rows,
    _dedupe,
    _given_or_leaves,
    _leaves,
)

__all__: list[str] = []  # internal to tolaria.compat.torchjd

_ROW_ALIGN = 32  # elements, as GradientBuffer's rows


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
    inputs_ = _given_or_leaves(inputs, "inputs", tensors_, [], "tensors")
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
    shared = _given_or_leaves(shared_params, "shared_params", features_, [], "features")
    if tasks_params is None:
        tasks = [_leaves([t], features_, "tensors") for t in tensors_]
    else:
        tasks = [_dedupe([ps] if isinstance(ps, Tensor) else ps, "tasks_params") for ps in tasks_params]
    if len(tasks) != len(tensors_):
        raise ValueError(
            f"`tensors` and `tasks_params` should have the same size. (got {len(tensors_)} and {len(tasks)})"
        )
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
