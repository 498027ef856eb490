"""The aggregator's state in the trainer's checkpoints and rollback snapshots.

Stateful aggregators (moving averages, warm starts, their own random generator; see
``Aggregator.stateful``) and the trainer's aggregator generator make the weights of step s depend on
steps before it. Both travel in the ``extra`` data of every checkpoint and snapshot, so a resumed run
or a rollback repeats the weights of the saved run bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ..aggregation import Aggregator
from ..telemetry import TelemetryEmitter

__all__ = ["AGGREGATOR_KEY", "GENERATOR_KEY", "aggregator_extra", "restore_aggregator"]

log = logging.getLogger(__name__)

AGGREGATOR_KEY = "aggregator"
GENERATOR_KEY = "aggregator_generator"


def aggregator_extra(aggregator: Aggregator, generator: torch.Generator | None) -> dict[str, Any]:
    """The entries to add to a checkpoint's or snapshot's ``extra``: the aggregator's class and
    state (stateful aggregators only) and the state of the generator the trainer gave it."""
    extra: dict[str, Any] = {}
    if aggregator.stateful:
        extra[AGGREGATOR_KEY] = {"class": type(aggregator).__name__, "state": aggregator.state_dict()}
    if generator is not None:
        extra[GENERATOR_KEY] = generator.get_state()
    return extra


def restore_aggregator(
    aggregator: Aggregator,
    generator: torch.Generator | None,
    extra: Any,
    *,
    telemetry: TelemetryEmitter,
    where: str,
) -> None:
    """Loads what :func:`aggregator_extra` saved into ``aggregator`` and ``generator``.

    A stateful aggregator whose saved state is missing, or was saved by another class (the run's
    aggregator changed between the save and the resume), starts afresh: said in the log and as a
    ``train.aggregator_state_missing`` event, never silently. A saved state that does not load
    (wrong shapes, corrupted) raises, as the model's would.
    """
    extra = extra if isinstance(extra, Mapping) else {}
    if generator is not None and GENERATOR_KEY in extra:
        generator.set_state(extra[GENERATOR_KEY])
    if not aggregator.stateful:
        return
    name = type(aggregator).__name__
    saved = extra.get(AGGREGATOR_KEY)
    if isinstance(saved, Mapping) and saved.get("class") == name:
        aggregator.load_state_dict(dict(saved["state"]))
        return
    found = f"one of {saved.get('class')!r}" if isinstance(saved, Mapping) else "none"
    message = (
        f"{where} holds no state for the aggregator {name} ({found}); it starts from its initial state, "
        "so its weights differ from the saved run's until its state has caught up"
    )
    log.warning(message)
    aggregator.reset()
    telemetry.count("train.aggregator_state_missing")
    telemetry.event("train.aggregator_state_missing", severity="warning", message=message, aggregator=name)
