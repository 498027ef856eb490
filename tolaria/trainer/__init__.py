"""The training loop and its parts, each its own module.

- :class:`Trainer` / :class:`RunSummary` (``loop``): the loop, assembled from the parts below.
- :class:`TrainerConfig` (``config``): the typed, validated run configuration (TOML-loadable).
- ``wiring``: builds the trainer's components from the config (telemetry, aggregator, LR, state,
  signal, safety, mediator, profiler).
- ``control``: the control step (policy via the mediator; rank 0 decides, every rank applies) and
  the ranks' agreement on the emergency level.
- ``checkpointing``: durable checkpoints, resume and rollback snapshots (``aggregator_state``: the
  aggregator's part of them).
- ``batches``: batches and devices (model inputs, moving batches, the run's device, autocast).
- ``gradient``: named losses -> ``GradientBuffer`` -> aggregator -> ``.grad``, with per-source stats.
- :class:`ControlMediator` (``mediator``): policy/executor calls under timeouts on a long-lived worker.
- :class:`SafetyGuard` (``safety``): non-finite steps, rollback, HALT, epoch time budgets.
- ``tasks``: the embedded default task of ``tolaria train`` (two digits side by side).
- ``report``: the plots of ``tolaria report``.
"""

from .config import (
    CheckpointConfig,
    ConfigError,
    DistributedConfig,
    LRConfig,
    ProfilerConfig,
    SafetyConfig,
    TelemetryConfig,
    TrainerConfig,
)
from .gradient import GradientStage, SourceStats, build_aggregator
from .loop import RunSummary, Trainer
from .mediator import ControlMediator, ControlReport, ControlState, Executor, Policy
from .safety import SafetyGuard, Verdict

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DistributedConfig",
    "ControlMediator",
    "ControlReport",
    "ControlState",
    "Executor",
    "GradientStage",
    "LRConfig",
    "Policy",
    "ProfilerConfig",
    "RunSummary",
    "SafetyConfig",
    "SafetyGuard",
    "SourceStats",
    "TelemetryConfig",
    "Trainer",
    "TrainerConfig",
    "Verdict",
    "build_aggregator",
]
