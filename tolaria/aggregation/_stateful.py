"""What the stateful weightings (MoDo, SDMGrad, CR-MOGM) share: their weight vector carried from call
to call, saved and restored as plain CPU tensors, and started afresh, with a warning, when the
number of sources changes.
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._gramian import conflicting_pairs, solve_if_finite
from .aggregator import Aggregator
from .engine import Weights, has_float64

__all__ = [
    "SimplexStateAggregator",
    "check_count",
    "check_state_keys",
    "k_changed",
    "loaded_vector",
    "saved_vector",
    "square_matrix",
    "state_for_k",
]


def saved_vector(vector: Tensor | None) -> Tensor | None:
    """A CPU copy of a state vector for ``state_dict()`` (what ``torch.load(weights_only=True)`` reads)."""
    return None if vector is None else vector.detach().to("cpu", copy=True)


def check_state_keys(state: Any, owner: str, keys: Iterable[str]) -> dict[str, Any]:
    """``state`` if it is a dict with exactly ``keys``; else ValueError naming what differs."""
    expected = sorted(keys)
    if not isinstance(state, dict):
        raise ValueError(
            f"{owner}.load_state_dict needs the dict state_dict() returned (keys {expected}), "
            f"got {type(state).__name__}"
        )
    if sorted(state) != expected:
        raise ValueError(
            f"{owner}.load_state_dict needs the keys {expected}, got {sorted(map(str, state))}: "
            "was the state saved by another aggregator?"
        )
    return state


def check_count(value: Any, owner: str, key: str) -> int:
    """``value`` if it is an integer >= 0 (a step or call counter of a saved state); else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{owner} state {key!r} must be an integer >= 0, got {value!r}")
    return value


def loaded_vector(value: Any, owner: str, key: str) -> Tensor | None:
    """A validated copy of the state vector ``state[key]``: None, or a 1-D finite floating tensor."""
    if value is None:
        return None
    if not isinstance(value, Tensor):
        raise ValueError(f"{owner} state {key!r} must be a tensor or None, got {type(value).__name__}")
    if value.dim() != 1 or value.numel() == 0 or not value.is_floating_point():
        raise ValueError(
            f"{owner} state {key!r} must be a non-empty 1-D floating tensor, "
            f"got shape {tuple(value.shape)} of {value.dtype}"
        )
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{owner} state {key!r} holds NaN or inf")
    return value.detach().to("cpu", copy=True)


def k_changed(owner: str, old: int, new: int) -> None:
    """Warns that the state kept for ``old`` sources is dropped for ``new`` ones."""
    warnings.warn(
        f"{owner}: the number of gradient sources changed from {old} to {new}; its state starts afresh "
        "(call reset() first to say that this is meant)",
        UserWarning,
        stacklevel=2,
    )


def state_for_k(state: Tensor | None, k: int, owner: str, restarts: str) -> Tensor | None:
    """``state`` if it was kept for ``k`` sources (its first dimension); else None, with a warning
    that ``restarts`` (pointing at the caller of the aggregator)."""
    if state is not None and state.shape[0] != k:
        warnings.warn(f"{owner} was called with {k} sources after {state.shape[0]}: {restarts}", stacklevel=6)
        return None
    return state


def square_matrix(matrix: Any, owner: str) -> Tensor:
    """A K x K floating tensor, in float64 where its device has float64 (as the engine's Gram matrix)."""
    if not isinstance(matrix, Tensor) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise ValueError(f"{owner} needs a K x K matrix A = J_1 J_2^T, got {shape}")
    if matrix.shape[0] == 0 or not matrix.is_floating_point():
        raise ValueError(
            f"{owner} needs a non-empty floating K x K matrix, got {matrix.dtype} of K = {matrix.shape[0]}"
        )
    return matrix.detach().to(torch.float64) if has_float64(matrix.device) else matrix.detach()


class SimplexStateAggregator(Aggregator):
    """An aggregator whose weighting carries a point of the simplex from call to call (MoDo's lambda,
    SDMGrad's w), uniform at the first call and after :meth:`reset` or a change of K.

    A subclass gives ``_update(matrix, current) -> (next_state, weights)`` on a finite K x K matrix.
    A call on a non-finite Gram matrix (``nonfinite="propagate"``) returns NaN weights, as every
    weighting does (:func:`~tolaria.aggregation._gramian.solve_if_finite`), and leaves the state as
    it was: one bad step does not poison the steps after it. No host reads.
    """

    stateful = True
    _state_key = "weights"  # the name of the vector in state_dict()

    def __init__(self, *, backend: str = "auto", nonfinite: str = "raise"):
        super().__init__(backend=backend, nonfinite=nonfinite)
        self._state: Tensor | None = None

    @abstractmethod
    def _update(self, matrix: Tensor, current: Tensor) -> tuple[Tensor, Tensor]:
        """The next state and the weights of this call, from the finite K x K ``matrix``."""

    def weighting(self, gram: Tensor) -> Weights:
        return Weights(self._advance(gram), conflicting_pairs(gram))

    def weights_from_cross(self, cross: Tensor) -> Tensor:
        """The weights from A = J_1 J_2^T, the K x K matrix of two independent samples' gradients
        (row i of J_s: source i's gradient on sample s), as the paper states the method; advances
        the state exactly as a call does. Returns K float64 weights on A's device, to combine with
        the gradients of a third sample (or the mean of the two), e.g. ``w @ j3``. No finiteness
        check runs here: a non-finite A gives NaN weights and leaves the state as it was."""
        return self._advance(square_matrix(cross, f"{type(self).__name__}.weights_from_cross"))

    def _advance(self, matrix: Tensor) -> Tensor:
        k = matrix.shape[-1]
        self._check_k(k)
        current = self._current(k, matrix)
        produced: list[Tensor] = []

        def solve(clean: Tensor) -> Tensor:
            state, weights = self._update(clean, current)
            produced.append(state)
            return weights

        weights = solve_if_finite(matrix, solve)
        self._state = torch.where(torch.isfinite(weights).all(), produced[0], current)
        return weights

    def _current(self, k: int, matrix: Tensor) -> Tensor:
        if self._state is not None and self._state.shape[0] != k:
            k_changed(type(self).__name__, self._state.shape[0], k)
            self._state = None
        if self._state is None:
            return torch.full((k,), 1.0 / k, dtype=matrix.dtype, device=matrix.device)
        return self._state.to(device=matrix.device, dtype=matrix.dtype)

    def state_dict(self) -> dict[str, Any]:
        """The weights carried to the next call (None before the first call), as a CPU tensor."""
        return {self._state_key: saved_vector(self._state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        name = type(self).__name__
        state = check_state_keys(state, name, [self._state_key])
        self._state = loaded_vector(state[self._state_key], name, self._state_key)

    def reset(self) -> None:
        """Forgets the carried weights: the next call starts from uniform weights."""
        self._state = None
