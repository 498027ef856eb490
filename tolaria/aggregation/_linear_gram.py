"""The Gram contribution of a linear layer's weight without its K x out x in gradient block.

For ``y = x W^T + b`` (``x``: B x in), source k's weight gradient is ``D_k^T x`` (``D_k``: B x out, the
gradient at ``y``), so ``<D_i^T x, D_j^T x> = <D_i, P D_j>`` with ``P = x x^T`` (B x B): the same
number from B x B and K x B x out tensors, never K x out x in. The low-memory mode uses it where it is
cheaper (``B (in + K out) < K in out``: wide layers, modest batches), reading ``D`` in a pre-hook of
the layer's ``AddmmBackward0`` node and ``x`` from the node's saved input, and leaves the weight out
of its batched backward (so autograd never builds the block).

Only exact cases qualify: a weight reached by exactly one edge of the graph (not tied, its layer
called once), 2-D input, a bias among the shared parameters (so the node runs in the batched pass);
the caller checks that every chosen node's hook ran once. Reading the saved input uses the node's
``_saved_mat1`` attribute (how PyTorch's autograd notes inspect saved tensors); where it is missing
no layer qualifies and every weight takes the block path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

__all__ = ["LinearLayer", "find_linear_layers"]


@dataclass
class LinearLayer:
    """One qualifying ``x W^T + b`` node: ``weight``'s Gram contribution comes from ``x`` and ``D``."""

    node: object
    weight: Tensor
    x: Tensor
    calls: int = 0

    def gram(self, d: Tensor) -> Tensor:
        """``<D_i, P D_j>`` for the K x B x out gradients ``d`` at the layer's output."""
        k = d.shape[0]
        p = self.x @ self.x.T
        return d.reshape(k, -1) @ (p @ d).reshape(k, -1).T


def find_linear_layers(roots: Sequence[object], shared: Sequence[Tensor], k: int) -> list[LinearLayer]:
    """The linear layers of the graph behind ``roots`` whose weight (among ``shared``) qualifies."""
    ids = {id(p) for p in shared}
    edges_into: dict[int, int] = {}  # id(parameter) -> edges into its AccumulateGrad node
    candidates: list[LinearLayer] = []
    seen: set[int] = set()
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for nxt, _ in node.next_functions:  # type: ignore[attr-defined]
            if nxt is None:
                continue
            variable = getattr(nxt, "variable", None)
            if variable is not None:
                edges_into[id(variable)] = edges_into.get(id(variable), 0) + 1
            stack.append(nxt)
        layer = _as_linear(node, ids, k)
        if layer is not None:
            candidates.append(layer)
    return [layer for layer in candidates if edges_into.get(id(layer.weight)) == 1]


def _as_linear(node: object, ids: set[int], k: int) -> LinearLayer | None:
    if node.name() != "AddmmBackward0":  # type: ignore[attr-defined]
        return None
    bias_edge, _, weight_edge = (edge for edge, _ in node.next_functions)  # type: ignore[attr-defined]
    bias = getattr(bias_edge, "variable", None)
    if bias is None or id(bias) not in ids or weight_edge is None or weight_edge.name() != "TBackward0":
        return None
    weight = getattr(weight_edge.next_functions[0][0], "variable", None)
    try:
        x = getattr(node, "_saved_mat1", None)
    except RuntimeError:  # a saved-tensor hook that cannot unpack here: the layer takes the exact block path
        return None
    if weight is None or id(weight) not in ids or not isinstance(x, Tensor) or x.ndim != 2 or weight.ndim != 2:
        return None
    batch, width_in = x.shape
    width_out = weight.shape[0]
    if batch * (width_in + k * width_out) >= k * width_in * width_out:
        return None  # the block is cheaper than P and P D here
    return LinearLayer(node=node, weight=weight, x=x)
