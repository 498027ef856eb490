"""``GradientBuffer(..., level="features")``: aggregation at the shared representation.

The sources' gradients are taken at the features ``z`` the trunk outputs (TorchJD's
``mtl_backward(losses, features)``), not at the trunk's parameters: row k of the K x M matrix is
``dL_k/dz`` (M = batch x feature size, a few passes through the heads only). Any aggregator combines
those rows into one cotangent ``c`` at the features, and one backward of ``z`` with ``c`` gives the
trunk's ``.grad``; the heads get their plain gradients (the sum over the sources that reach them).
A step costs about a plain step whatever K is.

This is an approximation of the parameter-level aggregate, not the same update: the Gram matrix of
the features' gradients stands in for the parameters'. For a Gramian aggregator the trunk's gradient
is ``w^T J`` with ``w`` from that feature-level Gram matrix (for MGDA this is MGDA-UB, which
minimises an upper bound of the parameter-level objective: Sener & Koltun, "Multi-Task Learning as
Multi-Objective Optimization", NeurIPS 2018); LibMTL calls it ``rep_grad``. Reported per-source norms
and cosines are those at the features. A loss reaches the trunk through the features only, as in
``mtl_backward``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from ._gradient_rounds import OutputRound, check_losses
from .aggregator import Aggregator
from .stats import AggregationStats

__all__ = ["FeatureGradientBuffer", "check_features"]


def check_features(features: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """The shared representation as a list of tensors that require grad (one tensor, or several)."""
    items = [features] if isinstance(features, Tensor) else list(features) if isinstance(features, Sequence) else None
    if not items:
        raise TypeError(
            "features must be the shared representation the losses are computed from: a tensor or a non-empty "
            f"sequence of tensors (as in TorchJD's mtl_backward(losses, features)), got {type(features).__name__}"
        )
    for i, z in enumerate(items):
        if not isinstance(z, Tensor):
            raise TypeError(f"features[{i}] is a {type(z).__name__}, not a tensor")
        if not z.requires_grad:
            raise ValueError(f"features[{i}] does not require grad: it must be computed from the shared parameters")
    return items


class FeatureGradientBuffer(OutputRound):
    """``GradientBuffer(..., level="features")`` (see the module docstring).

    Attributes beyond the buffer mode's: ``jacobian`` (the round's K x M rows at the features, after
    ``backward``; dropped by ``aggregate``).
    """

    level = "features"

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._rows: list[Tensor] | Tensor | None = None  # the round's K rows at the features (stacked once read)
        self._features: list[Tensor] = []

    @property
    def jacobian(self) -> Tensor | None:
        """The round's K x M rows at the features (after ``backward``, until ``aggregate``), stacked
        on first read: a Tolaria aggregator reads the K rows where autograd left them."""
        if self._rows is None:
            return None
        if not isinstance(self._rows, Tensor):
            self._rows = torch.stack(self._rows)
        return self._rows

    def backward(  # type: ignore[override]
        self,
        losses: Sequence[Tensor] | Mapping[str, Tensor],
        *,
        features: Tensor | Sequence[Tensor] | None = None,
        retain_graph: bool = False,
    ) -> None:
        """Row k of :attr:`jacobian` receives ``dL_k/dfeatures``; the heads their plain gradients."""
        losses = check_losses(losses, self.num_sources)
        if features is None:
            raise TypeError(
                'GradientBuffer(level="features").backward needs features=: the shared representation the '
                "losses are computed from (e.g. the trunk's output)"
            )
        zs = check_features(features)
        self._open_round(losses, retain_graph)
        try:
            self._rows = self._feature_rows(losses, zs)
        except BaseException:
            self._pending = None
            raise
        self._features = zs

    def _feature_rows(self, losses: list[Tensor], zs: list[Tensor]) -> list[Tensor]:
        """Row k: ``dL_k/dz`` flattened (the pieces of several features concatenated), as autograd
        returned it where it can: no K x M copy (on the 4.2M-parameter MLP trunk of
        benchmarks/whole_step.py at K = 8, stacking them cost 2 ms, against a 69 ms plain step)."""
        heads = self.unshared_params
        rows = []
        for loss in losses:
            grads = torch.autograd.grad(loss, [*zs, *heads], retain_graph=True, allow_unused=True)
            # None: the loss does not reach that representation; its gradient there is 0.
            pieces = [torch.zeros_like(z) if g is None else g for g, z in zip(grads[: len(zs)], zs)]
            rows.append(pieces[0].reshape(-1) if len(pieces) == 1 else torch.cat([g.reshape(-1) for g in pieces]))
            for p, g in zip(heads, grads[len(zs) :]):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)
        return rows

    def aggregate(
        self,
        aggregator: Aggregator | Callable[[Tensor], Tensor],
        *,
        return_stats: bool = False,
    ) -> Tensor | tuple[Tensor, AggregationStats]:
        """Aggregates the rows at the features into one cotangent, then one backward of the features
        with it into ``output`` (the trunk's ``.grad``). Any aggregator; only Tolaria's return stats."""
        losses, retain_graph = self._close_round()
        rows, zs = self._rows, self._features
        assert rows is not None
        self._rows, self._features = None, []
        m = sum(z.numel() for z in zs)
        if isinstance(aggregator, Aggregator):  # takes the K rows as they are (a sequence of sources)
            result = aggregator(rows, return_stats=return_stats)
            cotangent, stats = result if return_stats else (result, None)
        elif callable(aggregator):
            if return_stats:
                raise ValueError(f"return_stats=True needs a Tolaria aggregator, got {type(aggregator).__name__}")
            cotangent, stats = aggregator(rows if isinstance(rows, Tensor) else torch.stack(rows)), None
        else:
            raise TypeError(f"aggregate needs an aggregator, got {type(aggregator).__name__}")
        if not isinstance(cotangent, Tensor) or cotangent.numel() != m:
            raise ValueError(f"{type(aggregator).__name__} did not return one vector of {m} elements")
        pieces = torch.split(cotangent.reshape(-1), [z.numel() for z in zs])
        self._backward_into_output(zs, [c.view_as(z) for c, z in zip(pieces, zs)], retain_graph)
        del losses  # kept alive until here: the graph behind the features belongs to them
        return (self.output, stats) if return_stats else self.output
