"""The trainer's side of ``GradientBuffer``'s memory modes and aggregation levels (``aggregation_mode``,
``aggregation_level`` in :class:`~tolaria.trainer.TrainerConfig`).

- ``aggregation_mode = "low_memory"``: the first forward runs under
  :func:`~tolaria.aggregation.measure_activations`; when the buffer is built (the first backward, K
  known) the trainer estimates both modes' memory from it and reports a ``gradient.memory_mode``
  event with the figures. If low-memory would save nothing (large activations, few parameters: conv
  trunks), it declines and runs the buffer mode, saying so (severity ``warning``); the update is the
  same either way.
- ``aggregation_level = "features"``: the features are the output of the ``shared`` module (the
  trunk), captured by a forward hook during each training forward (``GradientStage.forward_context``,
  which the trainer wraps around its forward); a trunk called several times in a step gives several
  feature tensors, whose gradients are concatenated per source.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from tolaria.aggregation import (
    AGGREGATION_LEVELS,
    BUFFER_MODES,
    Aggregator,
    GradientBuffer,
    estimate_memory,
    is_gramian,
    measure_activations,
)
from tolaria.aggregation.low_memory import ActivationMeasure
from tolaria.telemetry import TelemetryEmitter

__all__ = ["GradientModes"]

log = logging.getLogger(__name__)


class GradientModes:
    """Builds the stage's ``GradientBuffer`` for a mode and a level, and feeds it what it needs."""

    def __init__(
        self,
        mode: str,
        level: str,
        *,
        aggregator: Aggregator,
        shared: Any,
        distributed: bool,
        telemetry: TelemetryEmitter | None = None,
    ):
        if mode not in BUFFER_MODES:
            raise ValueError(f"unknown aggregation mode {mode!r}; valid modes are {', '.join(BUFFER_MODES)}")
        if level not in AGGREGATION_LEVELS:
            raise ValueError(f"unknown aggregation level {level!r}; valid levels are {', '.join(AGGREGATION_LEVELS)}")
        if mode == "low_memory" and level == "features":
            raise ValueError('aggregation_mode="low_memory" applies to aggregation_level="params" only')
        if distributed and (mode, level) != ("buffer", "params"):
            raise ValueError(
                f"aggregation_mode={mode!r}, aggregation_level={level!r} run in a single process only; "
                'with several ranks use aggregation_mode="buffer", aggregation_level="params"'
            )
        if mode == "low_memory" and not is_gramian(aggregator):
            raise ValueError(
                f"aggregation_mode='low_memory' needs an aggregator that is a function of the Gram matrix; "
                f"{type(aggregator).__name__} is not: use aggregation_mode='buffer'"
            )
        if level == "features" and not isinstance(shared, nn.Module):
            raise ValueError(
                "aggregation_level='features' needs the shared trunk as a module (Trainer(..., shared=model.trunk)): "
                "its output is the features the sources' gradients are taken at"
            )
        self.mode, self.level = mode, level
        self.chosen_mode: str | None = None  # after the first build: low_memory, or buffer if it declined
        self.telemetry = telemetry
        self._activations: ActivationMeasure | None = None
        self._features: list[Tensor] = []
        self._capturing = False  # features are taken inside forward_context only
        self._hook = shared.register_forward_hook(self._capture) if level == "features" else None

    @property
    def default(self) -> bool:
        return (self.mode, self.level) == ("buffer", "params")

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._capturing or not torch.is_grad_enabled():
            return  # outside a training forward (an evaluation, the user's own use of the model)
        if not isinstance(output, Tensor):
            raise TypeError(
                "aggregation_level='features': the shared module must return one tensor (the features), "
                f"got {type(output).__name__}"
            )
        if output.requires_grad:
            self._features.append(output)

    @contextmanager
    def forward_context(self, params: list[Tensor]) -> Iterator[None]:
        """Wraps a training forward: forgets stale features, and measures the first one's activations
        when the low-memory mode must decide."""
        self._features = []
        self._capturing = True
        measure = self.mode == "low_memory" and self.chosen_mode is None and self._activations is None
        try:
            with measure_activations(params) if measure else nullcontext() as measured:
                yield
        finally:
            self._capturing = False
        if measure:
            self._activations = measured

    def build(self, params: list[Tensor], k: int, shared: Any, losses: Sequence[Tensor] = ()) -> GradientBuffer:
        """The stage's buffer; ``losses`` (the first step's) let the estimate see the graph's layers."""
        if self.mode != "low_memory":
            return GradientBuffer(params, num_sources=k, shared=shared, level=self.level)
        buffer = GradientBuffer(params, num_sources=k, shared=shared, mode="low_memory")
        estimate = estimate_memory(buffer.params, k, self._activations, losses)
        buffer.memory_estimate = estimate  # said here, not again by the buffer
        self.chosen_mode = "low_memory" if estimate.saves else "buffer"
        message = estimate.message if estimate.saves else f"{estimate.message}; declined: running the buffer mode"
        if self.telemetry is not None:
            self.telemetry.event(
                "gradient.memory_mode",
                severity="info" if estimate.saves else "warning",
                message=message,
                mode=self.chosen_mode,
                buffer_bytes=estimate.buffer_bytes,
                low_memory_bytes=estimate.low_memory_bytes,
                activation_bytes=estimate.activation_bytes,
                num_sources=k,
                params=estimate.params_numel,
            )
        if estimate.saves:
            log.info(message)
            return buffer
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
        return GradientBuffer(params, num_sources=k, shared=shared)

    def backward_kwargs(self) -> dict[str, Any]:
        """What the buffer's ``backward`` takes beside the losses: the step's features, at that level."""
        if self.level != "features":
            return {}
        features, self._features = self._features, []
        if not features:
            raise RuntimeError(
                "aggregation_level='features': the shared module did not run with gradients this step, so there "
                "are no features to take the sources' gradients at (is `shared` the trunk the losses go through?)"
            )
        return {"features": features}

    def close(self) -> None:
        """Removes the features hook from the shared module."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
