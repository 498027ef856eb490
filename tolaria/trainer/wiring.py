"""The trainer's components, built from its config: ``Trainer.__init__`` calls these in order.

Each function builds one part (telemetry, aggregator, LR controller, state manager, emergency
signal, safety guard, control mediator, profiler) from the config and the parts built before it, so
the constructor reads as the wiring diagram and each part can be read (and tested) on its own.
Nothing here keeps state: the trainer holds what is built and releases it in ``close()``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tolaria import profiler as profiler_mod
from tolaria.aggregation import Aggregator, aggregator_class, registered_name
from tolaria.distributed import (
    DistributedContext,
    ShardedLoader,
    bind_rank,
    broadcast_json,
    rank_telemetry,
    shard,
    synchronized_generator,
)
from tolaria.emergency import EmergencyController, LocalEmergencySignal
from tolaria.lr import build_controller
from tolaria.registry import SINKS, locate
from tolaria.state import StateManager
from tolaria.telemetry import JsonlSink, LoggingSink, TelemetryEmitter, TensorBoardSink

from .batches import data_length, default_run_dir, resolve_device
from .config import ConfigError, TrainerConfig
from .gradient import build_training_aggregator
from .mediator import ControlMediator, Executor, Policy
from .safety import SafetyGuard

__all__ = [
    "CONFIG_FILE",
    "TELEMETRY_FILE",
    "bind_telemetry",
    "build_emergency",
    "build_lr",
    "build_mediator",
    "build_profiler",
    "build_safety",
    "build_state",
    "build_telemetry",
    "check_arguments",
    "move_optimizer_state",
    "open_context",
    "open_signal",
    "prepare_run_dir",
    "shard_data",
    "total_steps",
    "wire_aggregator",
    "write_run_config",
]

log = logging.getLogger("tolaria.trainer")

TELEMETRY_FILE = "telemetry.jsonl"
CONFIG_FILE = "run_config.json"


# ---- arguments, context, run folder ------------------------------------------------------------


def check_arguments(
    model: Any,
    optimizer: Any,
    loss_fn: Any,
    config: TrainerConfig | None,
    aggregator: Aggregator | str | None,
) -> TrainerConfig:
    """Checks the trainer's arguments; returns the config to run (``aggregator`` folded into it)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable as loss_fn(outputs, batch)")
    config = config if config is not None else TrainerConfig()
    if not isinstance(config, TrainerConfig):
        raise TypeError(f"config must be a TrainerConfig, got {type(config).__name__}")
    config.validate()  # its fields may have been assigned since it was built
    if isinstance(aggregator, str):
        config = dataclasses.replace(config, aggregator=aggregator)
    elif aggregator is not None and not isinstance(aggregator, Aggregator):
        raise TypeError(f"aggregator must be a tolaria Aggregator or a name, got {type(aggregator).__name__}")
    elif aggregator is not None:
        if config.aggregator_options:
            raise ConfigError(
                f"aggregator_options {sorted(config.aggregator_options)} configure an aggregator built by name; "
                f"the instance {aggregator!r} is already built: pass its options to its constructor"
            )
        config = dataclasses.replace(config, aggregator=registered_name(aggregator))  # for run_config.json
    return config


def open_context(config: TrainerConfig, ctx: DistributedContext | None) -> tuple[DistributedContext, bool]:
    """The distributed context to run in, and whether the trainer owns it (built it, closes it)."""
    if ctx is not None and not isinstance(ctx, DistributedContext):
        raise TypeError(f"ctx must be a DistributedContext, got {type(ctx).__name__}")
    if ctx is not None:
        return ctx, False
    wanted = resolve_device(config.device)
    # "cuda" (no index) lets a torchrun rank take its own GPU; an explicit cuda:N is kept.
    ctx_device = "cuda" if wanted.type == "cuda" and config.device in ("auto", "cuda") else wanted
    return DistributedContext.from_environment(device=ctx_device, timeout_s=config.distributed.timeout_s), True


def move_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state created before the model moved (e.g. loaded) follows its parameters."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, Tensor) and value.device != param.device and not (key == "step" and value.dim() == 0):
                state[key] = value.to(param.device)


def prepare_run_dir(config: TrainerConfig, ctx: DistributedContext) -> Path:
    """The run folder, created: the configured one, or ``runs/<timestamp>``."""
    run_dir = Path(config.run_dir) if config.run_dir is not None else default_run_dir()
    # Every rank uses rank 0's folder (a default one is a timestamp, which could differ per rank).
    run_dir = Path(broadcast_json(str(run_dir), ctx)) if ctx.is_distributed else run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_run_config(config: TrainerConfig, ctx: DistributedContext, run_dir: Path) -> None:
    """Rank 0 writes the config the run uses to ``run_config.json``."""
    if ctx.is_main:
        (run_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")


# ---- telemetry ---------------------------------------------------------------------------------


def build_telemetry(config: TrainerConfig, ctx: DistributedContext, run_dir: Path) -> TelemetryEmitter:
    """The trainer's own emitter: JSONL in the run folder (one file per rank under torchrun),
    logging and TensorBoard as configured."""
    cfg = config.telemetry
    distributed = ctx.is_distributed
    sinks: list[Any] = []
    rank_jsonl = cfg.jsonl and distributed  # telemetry-rank<r>.jsonl, through rank_telemetry below
    if cfg.jsonl and not distributed:
        sinks.append(JsonlSink(run_dir / TELEMETRY_FILE))
    if cfg.log_severity != "off":
        sinks.append(LoggingSink(min_severity=cfg.log_severity))
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(run_dir / ("tensorboard" if not distributed else f"tensorboard-rank{ctx.rank}")))
    for name in cfg.sinks:  # registered sinks (tolaria/registry.py), one instance per rank
        module, cls = locate(SINKS[name])
        sinks.append(getattr(importlib.import_module(module), cls).for_run(run_dir, ctx.rank if distributed else None))
    if rank_jsonl:
        # telemetry-rank<r>.jsonl, every record tagged with the rank and rank 0's run id.
        return rank_telemetry(ctx, run_dir, sinks=sinks, batch_size=cfg.batch_size, rate_limits=cfg.rate_limits)
    if not sinks:
        raise ConfigError("telemetry has no sink: enable telemetry.jsonl, telemetry.tensorboard or a log_severity")
    return TelemetryEmitter(sinks, batch_size=cfg.batch_size, rate_limits=cfg.rate_limits)


def bind_telemetry(telemetry: TelemetryEmitter, ctx: DistributedContext) -> None:
    """Tags every record with the rank (and, under torchrun, rank 0's run id), epoch 0 and step 0."""
    if ctx.is_distributed:
        bind_rank(telemetry, ctx)
        telemetry.bind(epoch=0, step=0)
    else:
        telemetry.bind(rank=ctx.rank, epoch=0, step=0)


# ---- data, aggregator, LR ----------------------------------------------------------------------


def shard_data(
    data: Iterable[Any], ctx: DistributedContext, *, seed: int, telemetry: TelemetryEmitter
) -> Iterable[Any]:
    """This rank's share of ``data`` (``data`` itself in one process)."""
    if not ctx.is_distributed or isinstance(data, ShardedLoader):
        return data
    if isinstance(data, torch.utils.data.DataLoader):
        return shard(data, ctx, seed=seed, telemetry=telemetry)
    for_rank = getattr(data, "for_rank", None)
    if callable(for_rank):
        return for_rank(ctx.rank, ctx.world_size)
    message = (
        f"data of type {type(data).__name__} cannot be sharded by the trainer (not a DataLoader, no "
        f"for_rank(rank, world_size)); it is used as given and must already be rank {ctx.rank}'s shard, "
        "with the same number of batches on every rank"
    )
    log.warning(message)
    telemetry.event("distributed.data_unsharded", severity="warning", message=message)
    return data


def wire_aggregator(
    config: TrainerConfig,
    aggregator: Aggregator | str | None,
    ctx: DistributedContext,
    telemetry: TelemetryEmitter,
) -> tuple[Aggregator, torch.Generator | None]:
    """The aggregator to run, and the generator the trainer gave it (None: the trainer gave none)."""
    if isinstance(aggregator, Aggregator):
        # The caller's instance draws from its own generator (if it has one); under torchrun
        # it must be seeded alike on every rank, which the replica checks verify.
        return aggregator, None
    generator: torch.Generator | None = None
    aggregator_options = dict(config.aggregator_options)
    # A capability of the class, not a list of names: the loop knows no aggregator by name.
    if aggregator_class(config.aggregator).takes_generator() and "generator" not in aggregator_options:
        # The same draws on every rank (and a state to checkpoint): replicas stay identical.
        generator = synchronized_generator(config.seed, ctx, telemetry=telemetry)
        aggregator_options["generator"] = generator
    return build_training_aggregator(config.aggregator, **aggregator_options), generator


def total_steps(data: Any, config: TrainerConfig) -> int | None:
    """The steps the run will take, if known (the data's length times the epochs, capped by max_steps)."""
    per_epoch = data_length(data)
    by_epochs = None if per_epoch is None else per_epoch * config.epochs
    if config.max_steps is None:
        return by_epochs
    return config.max_steps if by_epochs is None else min(by_epochs, config.max_steps)


def build_lr(config: TrainerConfig, optimizer: torch.optim.Optimizer, data: Any, telemetry: TelemetryEmitter):
    """The LR controller; a schedule that needs the run's length and has no ``t_max`` gets it from
    ``data`` (this rank's shard) and ``max_steps``."""
    cfg = config.lr
    kwargs = cfg.controller_kwargs()
    needs_length = cfg.policy == "linear" or (cfg.policy == "cosine" and cfg.restarts is None)
    if needs_length and cfg.t_max is None:
        total = total_steps(data, config)  # only here: len(data) is not asked for otherwise
        if total is None:
            raise ConfigError(
                f"lr.policy {cfg.policy!r} needs lr.t_max: the data has no len() and max_steps is not set"
            )
        kwargs["t_max"] = max(1, total - cfg.warmup_steps)
    return build_controller(optimizer, cfg.policy, telemetry=telemetry, **kwargs)


# ---- state, emergency, safety, control, profiler -----------------------------------------------


def build_state(
    config: TrainerConfig, run_dir: Path, ctx: DistributedContext, telemetry: TelemetryEmitter
) -> StateManager:
    """The state manager: checkpoints and fast snapshots."""
    # Rank 0 owns the checkpoints; the others keep only their fast snapshots (for rollbacks).
    return StateManager(
        run_dir / ("checkpoints" if ctx.is_main else f"state-rank{ctx.rank}"),
        fast_cache_mb=config.checkpoint.fast_cache_mb,
        keep_last=config.checkpoint.keep_last,
        telemetry=telemetry,
    )


def open_signal(config: TrainerConfig, telemetry: TelemetryEmitter) -> tuple[Any, bool]:
    """The shared emergency signal the config names (attached, or created when none exists) and
    whether the trainer created it (and so unlinks it); ``(None, False)`` when none is named."""
    name = config.safety.emergency_signal
    if name is None:
        return None, False
    # Imported here: the compiled signal is only needed by runs that name one.
    from tolaria.signals import SharedEmergencySignal

    # One call, not attach-else-create: ranks starting together on one host would race between the
    # two (both miss, both create, one fails). Exactly one creates; the others attach.
    signal = SharedEmergencySignal.create_or_attach(name)
    if signal.created:
        telemetry.event("safety.signal_created", message=f"created shared emergency signal {name!r}", signal=name)
    return signal, signal.created


def build_emergency(shared_signal: Any, telemetry: TelemetryEmitter) -> EmergencyController:
    """The emergency controller, on the shared signal if there is one, else a local one."""
    signal = shared_signal if shared_signal is not None else LocalEmergencySignal("trainer")
    return EmergencyController(signal=signal, telemetry=telemetry)


def build_safety(
    config: TrainerConfig,
    state: StateManager,
    emergency: EmergencyController,
    telemetry: TelemetryEmitter,
) -> SafetyGuard:
    """The safety guard: non-finite steps, rollbacks, HALT, epoch time budgets."""
    return SafetyGuard(
        config.safety,
        state,
        emergency,
        rollback_deadline_s=config.checkpoint.rollback_deadline_s,
        telemetry=telemetry,
    )


def build_mediator(
    config: TrainerConfig,
    policy: Policy | None,
    executor: Executor | None,
    telemetry: TelemetryEmitter,
    ctx: DistributedContext | None = None,
) -> ControlMediator:
    """The control mediator: the policy and executor under timeouts and a circuit breaker."""
    # Only rank 0 consults the policy: the other ranks start no policy process.
    isolation = config.control_policy_isolation if ctx is None or ctx.is_main else "thread"
    return ControlMediator(
        policy,
        executor,
        timeout_s=config.control_timeout_s,
        failure_threshold=config.control_failure_threshold,
        cooldown_s=config.control_cooldown_s,
        recovery_calls=config.control_recovery_calls,
        max_abandoned=config.control_max_abandoned,
        policy_isolation=isolation,
        telemetry=telemetry,
    )


def build_profiler(config: TrainerConfig, run_dir: Path, telemetry: TelemetryEmitter):
    """The profiler the config asks for (traces in ``<run>/traces`` by default)."""
    cfg = config.profiler
    trace_dir = cfg.trace_dir or (str(run_dir / "traces") if cfg.enabled else None)
    # The config section subclasses tolaria.profiler.ProfilerConfig (same fields); only the trace
    # folder's default, the run folder, is the trainer's own.
    pcfg = profiler_mod.ProfilerConfig(**{**cfg.to_dict(), "trace_dir": trace_dir})
    return profiler_mod.build_profiler(pcfg, run_id=str(telemetry.attributes.get("run_id")), telemetry=telemetry)
