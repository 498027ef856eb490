"""CR-MOGM (Zhou, Zhang, Jiang, Zhong, Gu & Zhu 2022, "On the Convergence of Stochastic
Multi-Objective Gradient Manipulation and Beyond", NeurIPS 2022), in Gram space.

A gradient manipulation method (MGDA, PCGrad, CAGrad, ...) combines the gradients with composite
weights it computes from the current stochastic gradients alone, and the paper shows that this can
keep it from converging. CR-MOGM ("correlation-reduced") combines them with an exponential moving
average of those weights instead:

    lambda_k = alpha lambda_{k-1} + (1 - alpha) lambda^_k,

lambda^_k being the weights the wrapped method computes at step k, and lambda_0 = lambda^_1 (or
given initial weights). The paper's method is MGDA's weights averaged (the default here); its
Corollary 1 lets alpha grow towards 1 as the learning rate decays, which an assignment to
:attr:`CRMOGM.alpha` between steps does. This is TorchJD's ``CRMOGMWeighting``; here the wrapped
method is any Tolaria aggregator, whose ``weighting`` gives lambda^_k from the Gram matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._stateful import check_state_keys, k_changed, loaded_vector, saved_vector
from ._weights import DeviceCopies, check_weight_count
from .aggregator import Aggregator
from .engine import Weights

__all__ = ["CRMOGM"]


def _alpha(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"CRMOGM alpha must be a number in [0, 1], got {value!r}")
    return float(value)


def _initial(value: Sequence[float] | Tensor | None) -> Tensor | None:
    if value is None:
        return None
    try:
        if isinstance(value, Tensor):
            weights = value.detach().to(device="cpu", dtype=torch.float64, copy=True)
        else:  # straight to float64: through float32 the numbers would change
            weights = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"CRMOGM initial_weights must be a 1-D sequence of numbers: {exc}") from None
    if weights.dim() != 1 or weights.numel() == 0 or not bool(torch.isfinite(weights).all()):
        raise ValueError(f"CRMOGM initial_weights must be a non-empty 1-D sequence of finite numbers, got {value!r}")
    return weights


class CRMOGM(Aggregator):
    """An exponential moving average of another aggregator's weights across calls.

    Args:
        weighting: the wrapped aggregator, by registry name (``"mgda"``, the paper's choice and the
            default; built with this aggregator's ``backend`` and ``nonfinite``) or as an
            :class:`~tolaria.aggregation.Aggregator` (used as given). Its ``weighting`` gives the
            step's weights lambda^_k. It is kept as :attr:`inner` (``weighting`` is the method of
            every aggregator).
        alpha: the weight of the previous average, in [0, 1] (TorchJD's default 0.9). 0 returns
            the wrapped weights; 1 keeps the first ones. It may be assigned between calls.
        initial_weights: lambda_0, one number per source (default: the first call's lambda^_1,
            which that call then returns unchanged).
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.

    Stateful: ``state_dict()`` holds the average (``{"lambda": K float64 CPU tensor or None,
    "started": bool, "weighting": the wrapped aggregator's state_dict()}``); :meth:`reset` forgets
    it and resets the wrapped aggregator; a call with another number of sources warns and starts
    the average afresh (TorchJD raises). A call whose wrapped weights are not finite (a non-finite
    Gram matrix under ``nonfinite="propagate"``) returns them and leaves the average as it was.
    ``conflicts`` in the stats are the wrapped aggregator's; so is ``wide_combine``. ``alpha`` is
    configuration, not state: a schedule of alpha is the caller's to repeat after a resume.
    """

    # From a fresh state: MGDA's weights.
    promises = frozenset({"non_conflicting", "permutation", "zero_if_stationary"})

    stateful = True

    def __init__(
        self,
        weighting: str | Aggregator = "mgda",
        alpha: float = 0.9,
        initial_weights: Sequence[float] | Tensor | None = None,
        *,
        backend: str = "auto",
        nonfinite: str = "raise",
    ):
        super().__init__(backend=backend, nonfinite=nonfinite)
        if isinstance(weighting, str):
            from . import build_aggregator  # the registry imports this module

            try:
                inner = build_aggregator(weighting, backend=backend, nonfinite=nonfinite)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"CRMOGM weighting must name an aggregator: {exc}") from None
        elif isinstance(weighting, Aggregator):
            inner = weighting
        else:
            raise ValueError(
                f"CRMOGM weighting must be an aggregator name or an Aggregator, got {type(weighting).__name__}"
            )
        self.inner = inner
        self.alpha = alpha
        self.initial_weights = _initial(initial_weights)
        self._initial = None if self.initial_weights is None else DeviceCopies(self.initial_weights)
        self.wide_combine = inner.wide_combine
        self._lambda: Tensor | None = None
        self._started: Tensor | None = None  # a device bool: has a finite step set the average yet?

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = _alpha(value)

    def _check_k(self, k: int) -> None:
        self.inner._check_k(k)
        if self.initial_weights is not None:
            check_weight_count(self.initial_weights, k, "CRMOGM initial_weights")

    def weighting(self, gram: Tensor) -> Weights:
        k = gram.shape[-1]
        self._check_k(k)
        step, conflicts = self.inner.weighting(gram)
        if self._lambda is not None and self._lambda.shape[0] != k:
            k_changed("CRMOGM", self._lambda.shape[0], k)
            self._lambda = self._started = None
        if self._lambda is None:
            self._lambda = torch.zeros(k, dtype=step.dtype, device=step.device)
            self._started = torch.zeros((), dtype=torch.bool, device=step.device)
        previous = self._lambda.to(device=step.device, dtype=step.dtype)
        started = self._started.to(step.device)
        # No host read decides whether this is the first step: both branches are computed.
        if self._initial is None:
            averaged = self._alpha * previous + (1.0 - self._alpha) * step
            smoothed = torch.where(started, averaged, step)  # lambda_0 = lambda^_1: exactly lambda^_1
        else:
            previous = torch.where(started, previous, self._initial.like(step))
            smoothed = self._alpha * previous + (1.0 - self._alpha) * step
        finite = torch.isfinite(step).all()
        self._lambda = torch.where(finite, smoothed, previous)
        self._started = started | finite
        return Weights(smoothed, conflicts)

    def state_dict(self) -> dict[str, Any]:
        """The average carried to the next call, whether a step has set it, and the wrapped state."""
        return {
            "lambda": saved_vector(self._lambda),
            "started": None if self._started is None else bool(self._started),
            "weighting": self.inner.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = check_state_keys(state, "CRMOGM", ["lambda", "started", "weighting"])
        average = loaded_vector(state["lambda"], "CRMOGM", "lambda")
        started = state["started"]
        if (average is None) != (started is None) or not (started is None or isinstance(started, bool)):
            raise ValueError(
                f"CRMOGM state 'started' must be a bool with a 'lambda' tensor, or None with None; got "
                f"started={started!r} with lambda={'None' if average is None else 'a tensor'}"
            )
        if not isinstance(state["weighting"], dict):
            raise ValueError(
                f"CRMOGM state 'weighting' must be the wrapped aggregator's state dict, got "
                f"{type(state['weighting']).__name__}"
            )
        self.inner.load_state_dict(state["weighting"])  # validates its own part before ours is set
        self._lambda = average
        self._started = None if started is None else torch.tensor(started)

    def reset(self) -> None:
        """Forgets the average (the next call starts as the first did) and resets the wrapped aggregator."""
        self.inner.reset()
        self._lambda = self._started = None

    def __repr__(self) -> str:
        initial = "None" if self.initial_weights is None else repr(self.initial_weights.tolist())
        return (
            f"CRMOGM(weighting={self.inner!r}, alpha={self._alpha}, initial_weights={initial}, "
            f"backend={self.backend!r}, nonfinite={self.nonfinite!r})"
        )
