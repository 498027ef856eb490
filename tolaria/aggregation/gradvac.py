"""GradVac (Wang et al. 2021, "Gradient Vaccine: Investigating and Improving Multi-task Optimization in
Massively Multilingual Models", Algorithm 1 and Equation 4), exactly, in Gram space.

For each source i, g_i^PC starts as g_i and meets every other *original* g_j in turn (in a random
order per i, as PCGrad's). With phi_ij = cos(g_i^PC, g_j) and phi_hat_ij the target kept across calls,
a pair below its target gets the vaccine of Equation 4, the multiple of g_j that lifts the cosine
exactly to the target:

    g_i^PC += |g_i^PC| (phi_hat_ij sqrt(1 - phi_ij^2) - phi_ij sqrt(1 - phi_hat_ij^2))
              / (|g_j| sqrt(1 - phi_hat_ij^2)) g_j,

and every visited pair's target then follows the exponential moving average
phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi_ij (with the phi_ij read before the vaccine). The result
is sum_i g_i^PC. The targets start at 0, where the vaccine is PCGrad's projection.

As in :mod:`tolaria.aggregation.pcgrad`, every g_i^PC = sum_m C[i, m] g_m is tracked by its row of
coefficients, and every inner product it needs is read off G = J J^T: g_i^PC . g_j = (C G)[i, j] and
|g_i^PC|^2 = C[i] G C[i]^T. The loop is vectorised over i (K - 1 steps for all i at once: each step
touches a different pair (i, j) per row, so the targets update independently), with no data-dependent
control flow, so it never reads a value on the host. The weights are w = 1^T C.

TorchJD's GradVac (0.18) computes the same thing; ``eps`` enters where it does there (added to
|g_i^PC| |g_j| in the cosine and to the vaccine's denominator). Differences, none of which changes the
aggregate of finite inputs beyond rounding:

- the orders are drawn from the aggregator's own generator (TorchJD: ``torch.randperm`` on the global
  RNG), and its state is part of ``state_dict()``;
- a pair whose g_j is zero gets no vaccine (TorchJD adds a coefficient of up to |g_i| / eps times the
  zero vector: the aggregate is the same, the weights are not), and a cosine whose denominator is zero
  (only with ``eps=0``) counts as 0 instead of NaN; with ``eps=0`` a target of exactly +-1 (whose
  vaccine is infinite) gives no vaccine;
- where G holds NaN or inf (``nonfinite="propagate"``) the weights are NaN and the targets are left as
  they were (TorchJD lets the NaN into its targets for good);
- when K changes the targets restart from 0 with a warning (TorchJD restarts silently).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._gramian import solve_if_finite
from ._randomness import own_generator
from ._stateful import check_state_keys, state_for_k
from .aggregator import Aggregator
from .engine import Weights
from .pcgrad import draw_orders

__all__ = ["GradVac"]


def _unit_interval(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"GradVac {name} must be a number in [0, 1], got {value!r}")
    return float(value)


def gradvac_coefficients(
    gram: Tensor, orders: Tensor, targets: Tensor, beta: float, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (C, new targets, vaccines applied): g_i^PC = sum_m C[i, m] g_m after the loop.

    ``gram`` is G (K x K), ``orders`` K x (K - 1) as from :func:`~tolaria.aggregation.pcgrad.draw_orders`,
    ``targets`` the K x K phi_hat (not modified). Everything stays on G's device.
    """
    k = gram.shape[0]
    coeffs = torch.eye(k, dtype=gram.dtype, device=gram.device)
    products = gram.clone()  # row i: g_i^PC . g_m for every m, i.e. (C G)[i]
    targets = targets.clone()
    rows = torch.arange(k, device=gram.device)
    norms = gram.diagonal().clamp_min(0).sqrt()
    applied = torch.zeros((), dtype=torch.int64, device=gram.device)
    for step in range(orders.shape[1]):
        j = orders[:, step]
        dots = products[rows, j]
        norm_i = (products * coeffs).sum(dim=1).clamp_min(0).sqrt()
        norm_j = norms.index_select(0, j)
        denominator = norm_i * norm_j + eps
        cosine = torch.where(denominator > 0, dots / torch.where(denominator > 0, denominator, 1.0), 0.0)
        target = targets[rows, j]
        sine = (1 - cosine * cosine).clamp_min(0).sqrt()
        target_sine = (1 - target * target).clamp_min(0).sqrt()
        vaccine_denominator = norm_j * target_sine + eps
        vaccinate = (cosine < target) & (norm_j > 0) & (vaccine_denominator > 0)
        amount = norm_i * (target * sine - cosine * target_sine)
        amount = torch.where(vaccinate, amount / torch.where(vaccinate, vaccine_denominator, 1.0), 0.0)
        coeffs = coeffs.index_put((rows, j), amount, accumulate=True)
        products = products + amount[:, None] * gram.index_select(0, j)
        targets = targets.index_put((rows, j), (1 - beta) * target + beta * cosine)
        applied = applied + vaccinate.sum()
    return coeffs, targets, applied


class GradVac(Aggregator):
    """Gradient Vaccine: each gradient is lifted towards an adaptive cosine target with every other.

    Args:
        beta: the decay in [0, 1] of the targets' moving average (TorchJD's name and default).
        eps: a number >= 0 added to the denominators (TorchJD's name and default).
        seed: seeds the aggregator's own generator for the orders (default: a seed from the system).
        generator: a CPU ``torch.Generator`` to draw the orders from instead (shared with the caller).
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.

    Stateful: the targets phi_hat (K x K) and the generator's state are kept across calls and saved by
    ``state_dict()``. ``reset()`` sets the targets back to 0 (the draws go on from the generator).
    ``conflicts`` in the stats counts the vaccines applied.
    """

    # Random orders, as PCGrad's.
    promises = frozenset()

    stateful = True

    def __init__(
        self,
        beta: float = 0.5,
        eps: float = 1e-8,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        backend: str = "auto",
        nonfinite: str = "raise",
    ):
        super().__init__(backend=backend, nonfinite=nonfinite)
        self.beta = _unit_interval(beta, "beta")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= float(eps) < float("inf"):
            raise ValueError(f"GradVac eps must be a finite number >= 0, got {eps!r}")
        self.eps = float(eps)
        self.generator = own_generator(seed, generator, "GradVac")
        self._targets: Tensor | None = None

    def _targets_for(self, gram: Tensor) -> Tensor:
        k = gram.shape[0]
        self._targets = state_for_k(self._targets, k, "GradVac", "its cosine targets restart from 0")
        if self._targets is None:
            self._targets = torch.zeros((k, k), dtype=gram.dtype, device=gram.device)
        elif self._targets.device != gram.device or self._targets.dtype != gram.dtype:
            self._targets = self._targets.to(device=gram.device, dtype=gram.dtype)
        return self._targets

    def weighting(self, gram: Tensor) -> Weights:
        k = gram.shape[0]
        targets = self._targets_for(gram)
        orders = draw_orders(k, shuffle=True, generator=self.generator, device=gram.device)
        found: dict[str, Tensor] = {}

        def solve(finite_gram: Tensor) -> Tensor:
            coeffs, found["targets"], found["applied"] = gradvac_coefficients(
                finite_gram, orders, targets, self.beta, self.eps
            )
            return coeffs.sum(dim=0)

        weights = solve_if_finite(gram, solve)
        # A non-finite G leaves the targets as they were (its weights are NaN).
        self._targets = torch.where(torch.isfinite(gram).all(), found["targets"], targets)
        return Weights(weights, found["applied"])

    def state_dict(self) -> dict[str, Any]:
        """The targets (a K x K float64 CPU tensor, None before the first call) and the generator's state."""
        targets = None if self._targets is None else self._targets.detach().to("cpu", torch.float64).clone()
        return {"targets": targets, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = check_state_keys(state, "GradVac", ["generator", "targets"])
        targets, generator_state = state["targets"], state["generator"]
        if targets is not None and (
            not isinstance(targets, Tensor)
            or targets.dim() != 2
            or targets.shape[0] != targets.shape[1]
            or not targets.is_floating_point()
        ):
            raise ValueError(f"GradVac state 'targets' must be None or a square K x K float tensor, got {targets!r}")
        if not isinstance(generator_state, Tensor) or generator_state.dtype != torch.uint8:
            raise ValueError("GradVac state 'generator' must be the uint8 tensor of Generator.get_state()")
        self.generator.set_state(generator_state)
        self._targets = None if targets is None else targets.detach().to("cpu", torch.float64).clone()

    def reset(self) -> None:
        """Sets the cosine targets back to 0; the orders go on from the generator's current state."""
        self._targets = None

    def __repr__(self) -> str:
        return f"GradVac(beta={self.beta}, eps={self.eps}, backend={self.backend!r}, nonfinite={self.nonfinite!r})"
