"""The user's ``evaluate(model)`` at an epoch's end: in eval mode, without gradients, under the run's
autocast, its metrics checked and sent to telemetry as ``eval.<name>``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from .batches import autocast

if TYPE_CHECKING:
    from .loop import Trainer

__all__ = ["evaluate"]


def evaluate(trainer: Trainer) -> dict[str, float]:
    """The metrics ``trainer.evaluate`` returns for its model ({} without one); the model's mode is kept."""
    if trainer.evaluate is None:
        return {}
    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(trainer.config.amp, trainer.device):
            result = trainer.evaluate(model)
    finally:
        model.train(was_training)
    if not isinstance(result, Mapping):
        raise TypeError(
            f"evaluate(model) must return a mapping of metric names to numbers, got {type(result).__name__}"
        )
    metrics = {str(k): float(v) for k, v in result.items()}
    for name, value in metrics.items():
        trainer.telemetry.metric(f"eval.{name}", value)
    return metrics
