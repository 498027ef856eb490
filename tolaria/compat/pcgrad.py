"""Pytorch-PCGrad's optimizer wrapper (github.com/WeiChengTseng/Pytorch-PCGrad), on Tolaria's engine.

``from tolaria.compat.pcgrad import PCGrad`` replaces ``from pcgrad import PCGrad``: the same class,
constructor, methods and numbers. What that library does, and this module repeats:

- each objective's gradient over every parameter of the optimizer's groups (a parameter an
  objective does not reach contributes zeros, and is "not shared" for it);
- every projected gradient g_i' starts from g_i and is projected, in turn, against each *original*
  g_j it conflicts with (g_i' . g_j < 0), in an order that Python's ``random.shuffle`` draws anew for
  each i from the same list (its own original included), exactly as the original consumes Python's
  global ``random`` state: same seed, same orders, and no other random draw of the program moves;
- the merged gradient is the mean (``reduction="mean"``) or the sum of the g_i' over the parameters
  every objective reaches, and their sum over the others (task-specific heads);
- every parameter of the optimizer gets that ``.grad``, zeros for one no objective reaches (as the
  original sets them, so weight decay still applies to it), and gradients already in ``.grad``
  are discarded, as the original's ``zero_grad`` before each objective does.

On Tolaria's engine the K backward passes land in one K x N buffer, the projections run on the K x K
Gram matrix in float64 (the original projects N-vectors K^2 times), and one weighted sum writes the
result: two passes over the gradients instead of about 3 K^2.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import Tensor

from ..aggregation import Aggregator, GradientBuffer, Weights

__all__ = ["PCGrad"]

REDUCTIONS = ("mean", "sum")


class _OrderedProjections(Aggregator):
    """Pytorch-PCGrad's projection loop on the Gram matrix, in the orders it is given."""

    def __init__(self):
        super().__init__(nonfinite="propagate")  # the original lets NaN through to the step
        self.orders: list[list[int]] = []

    def weighting(self, gram: Tensor) -> Weights:
        # K x K scalars: on the host, in float64, once (the original reads K^2 dot products back).
        g = gram.tolist()
        k = len(g)
        total = [0.0] * k
        conflicts = 0
        for i, order in enumerate(self.orders):
            coefficients = [0.0] * k  # g_i' = sum_m coefficients[m] g_m
            coefficients[i] = 1.0
            for j in order:
                product = sum(coefficients[m] * g[m][j] for m in range(k))  # g_i' . g_j
                if product < 0:  # False for NaN, as in the original: NaN flows on into the step
                    coefficients[j] -= product / g[j][j]
                    conflicts += 1
            total = [t + c for t, c in zip(total, coefficients)]
        weights = torch.tensor(total, dtype=gram.dtype, device=gram.device)
        return Weights(weights, torch.tensor(conflicts, dtype=torch.int64, device=gram.device))


class PCGrad:
    """Wraps ``optimizer``: ``pc_backward(objectives)`` sets the projected, merged gradient.

    Args:
        optimizer: any ``torch.optim.Optimizer``; its parameter groups name the parameters.
        reduction: ``"mean"`` (default) or ``"sum"`` over the objectives, for the parameters every
            objective reaches; the others always get the sum.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, reduction: str = "mean"):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"PCGrad wraps a torch.optim.Optimizer, got {type(optimizer).__name__}; for the aggregator "
                "(gradients in, one gradient out) use tolaria.aggregation.PCGrad"
            )
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; valid reductions are {', '.join(REDUCTIONS)}")
        self._optim = optimizer
        self._reduction = reduction
        self._projections = _OrderedProjections()
        self._buffer: GradientBuffer | None = None
        self._buffer_key: tuple[int, tuple[int, ...]] | None = None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optim

    @property
    def param_groups(self) -> list[dict]:
        return self._optim.param_groups

    def zero_grad(self) -> None:
        """Clears every parameter's gradient (``set_to_none=True``, as the original)."""
        self._optim.zero_grad(set_to_none=True)

    def step(self, closure=None):
        return self._optim.step() if closure is None else self._optim.step(closure)

    def state_dict(self) -> dict:
        return self._optim.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._optim.load_state_dict(state_dict)

    def _all_params(self) -> list[Tensor]:
        return [p for group in self._optim.param_groups for p in group["params"]]

    def _buffer_for(self, k: int) -> GradientBuffer:
        params = [p for p in self._all_params() if p.requires_grad]
        key = (k, tuple(id(p) for p in params))
        if self._buffer is None or self._buffer_key != key:  # built once; again if K or the groups change
            self._buffer = GradientBuffer(params, k, accumulate=False)
            self._buffer_key = key
        return self._buffer

    def pc_backward(self, objectives: Sequence[Tensor]) -> None:
        """Backpropagates each objective, projects the conflicting gradients, sets ``.grad``."""
        if isinstance(objectives, Tensor) or not isinstance(objectives, Sequence) or not objectives:
            raise TypeError("pc_backward takes a list of objectives (scalar loss tensors), one per task")
        k = len(objectives)
        buf = self._buffer_for(k)
        reached = [torch.zeros(len(buf.params), dtype=torch.bool) for _ in range(k)]
        for i, objective in enumerate(objectives):
            with buf.source(i):
                hooks = [p.register_post_accumulate_grad_hook(_mark(reached[i], n)) for n, p in enumerate(buf.params)]
                try:
                    objective.backward(retain_graph=True)
                finally:
                    for hook in hooks:
                        hook.remove()
        order = list(range(k))
        self._projections.orders = []
        for _ in range(k):  # the original shuffles one list in place, once per objective
            random.shuffle(order)
            self._projections.orders.append(list(order))
        buf.aggregate(self._projections)
        if self._reduction == "mean":
            shared = torch.stack(reached).all(dim=0).tolist()
            for is_shared, p in zip(shared, buf.params):
                if is_shared:
                    p.grad.div_(k)
        for p in self._all_params():
            if p.grad is None:  # reached by no objective (or frozen): zeros, as the original sets
                p.grad = torch.zeros_like(p)

    def __repr__(self) -> str:
        return f"PCGrad({self._optim!r}, reduction={self._reduction!r})"


def _mark(flags: Tensor, index: int):
    def hook(_param: Tensor) -> None:
        flags[index] = True

    return hook
