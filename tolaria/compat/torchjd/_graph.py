"""Finding and checking the tensors of a ``tolaria.compat.torchjd`` call: argument validation as
TorchJD 0.18 words it, and the leaf tensors a graph depends on (a breadth-first walk from the roots'
``grad_fn`` to their ``AccumulateGrad`` nodes), which are the default ``inputs`` / parameters."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor

__all__: list[str] = []  # internal to tolaria.compat.torchjd


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


def _given_or_leaves(
    given: Tensor | Iterable[Tensor] | None,
    name: str,
    roots: Sequence[Tensor],
    excluded: Sequence[Tensor],
    roots_name: str,
) -> list[Tensor]:
    """The tensors the caller named (deduplicated), or, when it named none, the leaves the roots depend on."""
    if given is None:
        return _leaves(roots, excluded, roots_name)
    return _dedupe([given] if isinstance(given, Tensor) else given, name)
