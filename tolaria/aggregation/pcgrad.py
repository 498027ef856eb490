"""PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning"), exactly, in Gram space.

Algorithm 1 of the paper: for each source i, g_i^PC starts as g_i and is projected in turn against
every other *original* g_j (in a random order per i) whose inner product with the current g_i^PC is
negative: g_i^PC -= (g_i^PC . g_j) / |g_j|^2 g_j. The result is sum_i g_i^PC (or the mean).

Every g_i^PC stays a linear combination of the original rows, g_i^PC = sum_m C[i, m] g_m, and every
inner product it needs is a row of C times a column of G = J J^T. So the whole loop runs on K x K
numbers; the final weights are w = a^T C (a: ones, 1/K, or the per-source weights), and the output is
one weighted sum of the rows. The loop is vectorised over i (K - 1 steps for all i at once), with no
data-dependent control flow, and exists once per target:

- device: :func:`pcgrad_coefficients`, torch ops that never read a value on the host (the torch
  backend on a device, the Triton backend beyond the kernel's K, and anything under ``torch.compile``);
- GPU: the same loop as one small Triton kernel (``tolaria.kernels.pcgrad``), step for step the same
  arithmetic, for the Triton backend;
- host: :func:`_host_coefficients`, NumPy on a CPU Gram matrix, which is in host memory already.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._weights import DeviceCopies, as_weight_vector, check_weight_count
from .aggregator import Aggregator
from .engine import Weights, uses_triton

REDUCTIONS = ("sum", "mean")

__all__ = ["PCGrad", "REDUCTIONS", "draw_orders", "pcgrad_coefficients"]


def draw_orders(k: int, *, shuffle: bool, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """A K x (K - 1) int64 tensor: row i lists the other sources in the order i meets them.

    With ``shuffle`` each row is an independent uniform permutation drawn from ``generator`` (on the
    generator's device, then moved), else ascending index order. With K <= 2 there is only one
    order, and nothing is drawn.
    """
    if k == 1:
        return torch.empty((1, 0), dtype=torch.int64, device=device)
    if not shuffle or k == 2:  # with two sources there is one order only: nothing is drawn
        # Row i: 0..k-1 without i, i.e. j + (j >= i) for j < k - 1; built on the device (no mask,
        # whose indexing would read a count on the host).
        steps = torch.arange(k - 1, device=device)
        return steps[None, :] + (steps[None, :] >= torch.arange(k, device=device)[:, None])
    gen_device = generator.device if generator is not None else device
    scores = torch.rand((k, k), generator=generator, device=gen_device)
    # Source i itself sorts last (scores are < 1), so dropping the last column removes it.
    scores.fill_diagonal_(2.0)
    return scores.argsort(dim=1)[:, : k - 1].to(device)


def pcgrad_coefficients(gram: Tensor, orders: Tensor) -> tuple[Tensor, Tensor]:
    """Returns (C, conflicts): g_i^PC = sum_m C[i, m] g_m, and how many projections were applied.

    ``gram`` is G = J J^T (K x K); ``orders`` is K x (K - 1) as from :func:`draw_orders`, on G's
    device. A source with zero norm is never projected against (its inner products are all zero
    anyway). This is the device loop: torch ops in G's dtype, vectorised over i, with no
    data-dependent control flow, so it never reads a value on the host (and traces whole under
    ``torch.compile``). :class:`PCGrad` runs it wherever G is not in host memory and the Triton
    kernel does not apply; a CPU Gram matrix takes the host loop (:func:`_host_coefficients`).
    """
    k = gram.shape[0]
    coeffs = torch.eye(k, dtype=gram.dtype, device=gram.device)
    conflicts = torch.zeros((), dtype=torch.int64, device=gram.device)
    rows = torch.arange(k, device=gram.device)
    sq_norms = gram.diagonal()
    for step in range(orders.shape[1]):
        j = orders[:, step]
        # <g_i^PC, g_j> for every i at once: row i of C times column j_i of G.
        dots = (coeffs * gram.index_select(1, j).T).sum(dim=1)
        norm_j = sq_norms.index_select(0, j)
        conflict = (dots < 0) & (norm_j > 0)
        step_size = torch.where(conflict, dots / torch.where(norm_j > 0, norm_j, 1), 0)
        coeffs = coeffs.index_put((rows, j), -step_size, accumulate=True)
        conflicts = conflicts + conflict.sum()
    return coeffs, conflicts


def _on_host(gram: Tensor) -> bool:
    """Whether the K x K loop runs on host numbers: a CPU Gram matrix, outside torch.compile tracing
    (which needs the torch loop to keep its graph whole)."""
    return gram.device.type == "cpu" and not torch.compiler.is_compiling()


def _host_coefficients(gram: Tensor, orders: Tensor) -> tuple[np.ndarray, int]:
    """The loop of :func:`pcgrad_coefficients` on host numbers (NumPy, float64): (C, conflicts).

    A CPU Gram matrix already lives in host memory, so each tiny step costs a few NumPy calls instead
    of a torch dispatch; the arithmetic is the same step for step (only the order of the K-term sums
    may differ). NumPy rather than plain Python floats: floats win below K ~ 10 by some tens of
    microseconds, but cost O(K^3) interpreted operations (milliseconds from K ~ 30).
    """
    g = gram.detach().to(torch.float64).numpy()
    order = orders.numpy()
    k = g.shape[0]
    coeffs = np.eye(k)
    rows = np.arange(k)
    columns = g.T[order]  # columns[i, s] = G[:, order[i, s]], the column i meets at step s
    norms = np.diagonal(g)[order]
    positive = norms > 0
    safe_norms = np.where(positive, norms, 1.0)
    conflicts = 0
    for step in range(order.shape[1]):
        dots = np.einsum("im,im->i", coeffs, columns[:, step])  # <g_i^PC, g_j> for every i
        conflict = (dots < 0) & positive[:, step]
        coeffs[rows, order[:, step]] -= np.where(conflict, dots / safe_norms[:, step], 0.0)
        conflicts += int(np.count_nonzero(conflict))
    return coeffs, conflicts


class PCGrad(Aggregator):
    """Projecting conflicting gradients, as in Algorithm 1 of Yu et al. (2020).

    Args:
        reduction: ``"sum"`` (as in the paper) or ``"mean"`` of the projected gradients g_i^PC.
        shuffle: draw each source's projection order at random from ``generator`` (reproducible for
            a seeded generator); ``False`` uses ascending index order.
        generator: a ``torch.Generator`` for the shuffles, shared with the caller (default: the
            aggregator's own, created on the gradients' device and seeded with ``seed``; torch's
            global generator is never drawn from, so adding PCGrad changes no other random draw).
        weights: optional per-source weights multiplying each g_i^PC; under ``"mean"`` the result
            is divided by their sum instead of by K.
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.
        seed: seeds the aggregator's own generator (default: a seed from the operating system).

    With ``shuffle`` the aggregator is ``stateful``: its generator's state is its ``state_dict()``,
    so that a resumed run draws the same orders. Inside ``torch.compile`` (TorchDynamo cannot trace a
    ``torch.Generator``) the aggregator's own generator is not used: the orders come from torch's
    global generator there, as dropout's masks do; a generator passed in cannot be compiled at all.
    """

    promises = frozenset()

    def __init__(
        self,
        reduction: str = "sum",
        shuffle: bool = True,
        generator: torch.Generator | None = None,
        weights: Sequence[float] | Tensor | None = None,
        backend: str = "auto",
        nonfinite: str = "raise",
        *,
        seed: int | None = None,
    ):
        super().__init__(backend=backend, nonfinite=nonfinite)
        if isinstance(reduction, torch.optim.Optimizer):
            raise TypeError(
                "tolaria.aggregation.PCGrad is an aggregator (gradients in, one gradient out); for "
                "Pytorch-PCGrad's optimizer wrapper, PCGrad(optimizer) with pc_backward(losses), import "
                "tolaria.compat.pcgrad.PCGrad"
            )
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; valid reductions are {', '.join(REDUCTIONS)}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator is not None and seed is not None:
            raise ValueError("PCGrad takes a seed or a generator, not both")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"PCGrad's seed must be an integer, got {seed!r}")
        self.reduction = reduction
        self.shuffle = bool(shuffle)
        self.stateful = self.shuffle
        self.generator = generator
        self._owns_generator = generator is None
        # The own generator is made on the first call's device (a CUDA one for CUDA gradients, so
        # that drawing the orders copies nothing to the device), from this seed.
        self._seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.weights = None if weights is None else as_weight_vector(weights, "PCGrad")
        self._weight_copies = None if self.weights is None else DeviceCopies(self.weights)
        if self.weights is not None and reduction == "mean" and float(self.weights.sum()) <= 0:
            raise ValueError('PCGrad weights must have a positive sum under reduction="mean"')

    def _check_k(self, k: int) -> None:
        if self.weights is not None:
            check_weight_count(self.weights, k, "PCGrad")

    def _generator_on(self, device: torch.device) -> torch.Generator | None:
        if device.type == "meta":  # shapes only: nothing is drawn, no generator exists there
            return None
        if torch.compiler.is_compiling() and self._owns_generator:
            # TorchDynamo cannot trace a torch.Generator object: compiled, the orders come from
            # torch's global generator (as dropout's masks do there). Documented in the class.
            return None
        if self.generator is None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self._seed)
        return self.generator

    def state_dict(self) -> dict[str, Any]:
        """The shuffles' generator state (or the seed it will start from): loading it repeats the orders."""
        if self.generator is None:
            return {"seed": self._seed}
        return {"generator": self.generator.get_state(), "device": str(self.generator.device)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not ({"seed"} == set(state) or {"generator", "device"} == set(state)):
            raise ValueError(
                "PCGrad.load_state_dict needs the dict state_dict() returned ({'seed': ...} or "
                "{'generator': ..., 'device': ...})"
            )
        if "seed" in state:
            self.generator, self._seed = None, int(state["seed"])
            return
        if self.generator is None:
            self._generator_on(torch.device(state["device"]))
        self.generator.set_state(state["generator"])

    def reset(self) -> None:
        """Nothing to forget: the orders go on from the generator's current state (reseed to repeat)."""

    def weighting(self, gram: Tensor) -> Weights:
        k = gram.shape[0]
        generator = self._generator_on(gram.device) if self.shuffle else None
        if uses_triton(self.backend, gram.device):
            from tolaria.kernels.pcgrad import MAX_K, pcgrad_weights  # triton is heavy to load

            if k <= MAX_K:  # beyond, the loop below: more launches, still no host sync
                orders = (
                    draw_orders(k, shuffle=True, generator=generator, device=gram.device)
                    if self.shuffle
                    else None  # the kernel walks ascending order itself
                )
                weights = None if self.weights is None else self._weight_copies.like(gram)
                return Weights(*pcgrad_weights(gram, orders, reduction=self.reduction, weights=weights))
        orders = draw_orders(k, shuffle=self.shuffle, generator=generator, device=gram.device)
        if _on_host(gram):
            # Host numbers: the loop and w = a^T C in NumPy, two small tensors at the end (the device
            # branch below builds the same scale as a device tensor: no host copy there).
            coeffs_host, n_conflicts = _host_coefficients(gram, orders)
            if self.weights is None:
                scale_host = np.full(k, 1.0 if self.reduction == "sum" else 1.0 / k)
            else:
                scale_host = self.weights.numpy()
                if self.reduction == "mean":
                    scale_host = scale_host / scale_host.sum()
            w = torch.from_numpy(scale_host @ coeffs_host).to(gram.dtype)
            return Weights(w, torch.tensor(n_conflicts, dtype=torch.int64))
        coeffs, conflicts = pcgrad_coefficients(gram, orders)
        if self.weights is None:
            scale = torch.full((k,), 1.0 if self.reduction == "sum" else 1.0 / k, dtype=gram.dtype, device=gram.device)
        else:
            scale = self._weight_copies.like(gram)
            if self.reduction == "mean":
                scale = scale / scale.sum()
        return Weights(scale @ coeffs, conflicts)

    def __repr__(self) -> str:
        return (
            f"PCGrad(reduction={self.reduction!r}, shuffle={self.shuffle}, "
            f"weights={None if self.weights is None else self.weights.tolist()}, "
            f"backend={self.backend!r}, nonfinite={self.nonfinite!r})"
        )
