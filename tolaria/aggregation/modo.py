"""MoDo (Chen, Fernando, Ying & Chen 2023, "Three-Way Trade-Off in Multi-Objective Learning:
Optimization, Generalization and Conflict-Avoidance", Algorithm 1, Equation 2.9a), in Gram space.

MoDo carries task weights lambda on the simplex from step to step and moves them by one projected
stochastic gradient step of the MGDA objective 1/2 |J^T lambda|^2 + rho/2 |lambda|^2:

    lambda_{t+1} = P_simplex(lambda_t - gamma (J_1 J_2^T lambda_t + rho lambda_t)),

starting from uniform weights; the update direction is J^T lambda_{t+1} (Equation 2.9b).

The paper takes J_1 J_2^T from two independent samples of the gradients, an unbiased estimate of
the true Gram matrix; the engine has one sample, so a call uses its Gram matrix G = J J^T (as
TorchJD's ``MoDoWeighting`` does given a Gramian). :meth:`MoDo.weights_from_cross` takes the
two-sample matrix J_1 J_2^T instead and advances the same state.
"""

from __future__ import annotations

from torch import Tensor

from ._simplex import project_onto_simplex
from ._stateful import SimplexStateAggregator

__all__ = ["MoDo"]


def _number(value: object, name: str, positive: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and float(value) < float("inf")
    ok = ok and (float(value) > 0 if positive else float(value) >= 0)
    if not ok:
        raise ValueError(f"MoDo {name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


class MoDo(SimplexStateAggregator):
    """Multi-objective gradient with double sampling: weights moved by one projected gradient step
    per call.

    Args:
        gamma: the step size of the weights' update, > 0 (TorchJD's argument and default). The
            update is not scale-free: gamma G is what moves the weights, so gamma suits one scale
            of gradients.
        rho: the L2 regularisation of the weights, >= 0 (TorchJD's argument and default).
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.

    Stateful: the weights start uniform and each call returns lambda_{t+1}, which the next call
    starts from. ``state_dict()`` holds them (``{"lambda": K float64 CPU tensor or None}``);
    :meth:`reset` returns to uniform weights; a call with another number of sources warns and
    starts from uniform weights (TorchJD starts afresh silently). A call on a non-finite Gram
    matrix (``nonfinite="propagate"``) gives NaN weights and leaves the state as it was.
    ``conflicts`` in the stats counts the pairs of sources with a negative inner product.
    """

    promises = frozenset({"permutation"})

    _state_key = "lambda"

    def __init__(self, gamma: float = 0.1, rho: float = 0.1, *, backend: str = "auto", nonfinite: str = "raise"):
        super().__init__(backend=backend, nonfinite=nonfinite)
        self.gamma = _number(gamma, "gamma", positive=True)
        self.rho = _number(rho, "rho", positive=False)

    def _update(self, matrix: Tensor, current: Tensor) -> tuple[Tensor, Tensor]:
        step = matrix @ current + self.rho * current
        following = project_onto_simplex(current - self.gamma * step)
        return following, following

    def __repr__(self) -> str:
        return f"MoDo(gamma={self.gamma}, rho={self.rho}, backend={self.backend!r}, nonfinite={self.nonfinite!r})"
