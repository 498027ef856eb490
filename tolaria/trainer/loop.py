"""``Trainer``: the training loop, assembled from the components around it.

One step: batch -> model (bf16 autocast on CUDA) -> ``loss_fn(outputs, batch)`` -> named losses ->
gradient stage (``GradientBuffer`` + aggregator, straight into ``.grad``) -> safety verdict (apply,
skip, roll back, halt) -> LR for this step (``LRController``) -> optimizer step (``OptimizerManager``)
-> snapshot on cadence (``StateManager``) -> telemetry every ``log_every_steps``.

At an epoch end: evaluation (if given) -> epoch summary -> time budget check -> control mediator
(policy/executor under timeouts) -> durable checkpoint on cadence -> emergency level bookkeeping.

Every run ends with a final durable checkpoint, however it stops (completed, ``max_steps``, HALT, or
Ctrl-C), and returns a :class:`RunSummary`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tolaria import profiler as profiler_mod
from tolaria.distributed import (
    DistributedContext,
    DistributedError,
    ShardedLoader,
    agree_on_emergency_level,
    any_rank,
    bind_rank,
    broadcast_json,
    broadcast_module_state,
    checkpoint_barrier,
    rank_telemetry,
    resume_from_checkpoint,
    shard,
    synchronized_generator,
    telemetry_file_name,
)
from tolaria.aggregation import Aggregator, aggregator_class, registered_name
from tolaria.emergency import EmergencyController, EmergencyLevel, LocalEmergencySignal
from tolaria.lr import build_controller
from tolaria.optim import OptimizerManager
from tolaria.state import StateError, StateManager
from tolaria.telemetry import JsonlSink, LoggingSink, TelemetryEmitter, TensorBoardSink

from .aggregator_state import aggregator_extra, restore_aggregator
from .config import ConfigError, TrainerConfig
from .gradient import GradientStage, SourceAccumulator, SourceStats, build_aggregator, emit_step_metrics
from .mediator import ControlMediator, ControlState, Executor, Policy
from .safety import HALT, ROLLED_BACK, SKIP, SafetyGuard

log = logging.getLogger("tolaria.trainer")

TELEMETRY_FILE = "telemetry.jsonl"
CONFIG_FILE = "run_config.json"

COMPLETED, MAX_STEPS, HALTED, INTERRUPTED = "completed", "max_steps", "halted", "interrupted"


@dataclass
class RunSummary:
    """What a run did.

    Attributes:
        status: ``"completed"`` (all epochs), ``"max_steps"``, ``"halted"`` (emergency HALT) or
            ``"interrupted"`` (Ctrl-C).
        epochs: epochs completed.
        steps: global optimizer steps taken (after any rollback).
        skipped_steps: steps skipped for non-finite values.
        rollbacks: rollbacks performed.
        wall_time_s: seconds in ``fit``.
        sources: the gradient sources' names.
        final_losses: mean loss per source over the last epoch (or the part of it that ran).
        metrics: the last evaluation's metrics.
        conflict_rate: conflicting projections per source pair per step, over the run (None for one
            source).
        halt_reason: why the run halted, if it did.
        run_dir: the run folder (checkpoints, telemetry, config).
        last_checkpoint_step: step of the final durable checkpoint (None if none was written).
        resumed_from_step: the step restored at start (None: a fresh run).
        control_failures: failed, timed-out or refused control calls.
        telemetry_file: the JSONL telemetry file, if one was written.
    """

    status: str
    epochs: int
    steps: int
    skipped_steps: int
    rollbacks: int
    wall_time_s: float
    sources: tuple[str, ...]
    final_losses: dict[str, float]
    metrics: dict[str, float]
    conflict_rate: float | None
    halt_reason: str | None
    run_dir: Path
    last_checkpoint_step: int | None
    resumed_from_step: int | None = None
    control_failures: int = 0
    telemetry_file: Path | None = None

    def table(self) -> str:
        """A plain-text summary table (per-task loss and metrics, conflict rate, time)."""
        rows: list[tuple[str, str]] = [("status", self.status + (f" ({self.halt_reason})" if self.halt_reason else ""))]
        rows.append(("epochs / steps", f"{self.epochs} / {self.steps}"))
        if self.resumed_from_step is not None:
            rows.append(("resumed from step", str(self.resumed_from_step)))
        for name, loss in self.final_losses.items():
            rows.append((f"loss [{name}]", f"{loss:.4f}"))
        for name, value in self.metrics.items():
            rows.append((name, f"{value:.4f}" if isinstance(value, float) else str(value)))
        rows.append(("conflict rate", "n/a (one source)" if self.conflict_rate is None else f"{self.conflict_rate:.3f}"))
        rows.append(("skipped steps / rollbacks", f"{self.skipped_steps} / {self.rollbacks}"))
        rows.append(("control failures", str(self.control_failures)))
        rows.append(("time", f"{self.wall_time_s:.1f} s"))
        rows.append(("run folder", str(self.run_dir)))
        width = max(len(k) for k, _ in rows)
        rule = "-" * (width + 3 + max(len(v) for _, v in rows))
        return "\n".join([rule, *(f"{k.ljust(width)} | {v}" for k, v in rows), rule])


# ---- batches and devices -----------------------------------------------------------------------


def split_inputs(batch: Any) -> Any:
    """The model's input of a batch: the batch itself (a tensor), its first item (a tuple or list),
    or its ``"inputs"`` entry (a mapping)."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("got an empty batch")
        return batch[0]
    if isinstance(batch, Mapping):
        if "inputs" not in batch:
            raise KeyError(f"a mapping batch needs an 'inputs' entry for the model; it has {sorted(map(str, batch))}")
        return batch["inputs"]
    raise TypeError(f"batches must be a tensor, a tuple/list or a mapping, got {type(batch).__name__}")


def move_to(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside (tuples, lists, mappings) moved to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        moved = [move_to(o, device) for o in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else tuple(moved)
    if isinstance(obj, list):
        return [move_to(o, device) for o in obj]
    if isinstance(obj, Mapping):
        return {k: move_to(v, device) for k, v in obj.items()}
    return obj


def first_tensor(obj: Any) -> Tensor | None:
    """The first tensor in ``obj`` (depth first), or None."""
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        items: Iterable[Any] = obj
    elif isinstance(obj, Mapping):
        items = obj.values()
    else:
        return None
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def resolve_device(name: str) -> torch.device:
    """The device a config names (``"auto"``: CUDA when available, else CPU); unavailable CUDA raises."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available; use device='auto' or 'cpu'")
    return device


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


# ---- the trainer -------------------------------------------------------------------------------


class Trainer:
    """Trains ``model`` on ``data`` with ``loss_fn``, safely; ``fit()`` runs it and returns a :class:`RunSummary`.

    Args:
        model: the model; moved to the configured device.
        optimizer: its optimizer (managed by an ``OptimizerManager``; fetch the live one from
            ``trainer.optimizer``).
        data: an iterable of batches, iterated once per epoch (``set_epoch(epoch)`` is called when
            it has one). A batch is a tensor, a tuple/list whose first item is the model's input, or
            a mapping with an ``"inputs"`` entry. Inputs go to the model's device; the whole batch
            (targets included) goes to the device of the model's outputs before ``loss_fn`` sees it.
        loss_fn: ``loss_fn(outputs, batch)`` returns a scalar tensor or a dict of named scalar
            losses; each name is one gradient source, combined by the configured aggregator.
        config: a :class:`TrainerConfig` (default: all defaults).
        policy, executor: the control policy and its executor (see :mod:`.mediator`).
        telemetry: an emitter to report to; by default the trainer builds one writing JSONL to the
            run folder (plus logging, and TensorBoard when configured) and closes it at the end.
        aggregator: an :class:`~tolaria.aggregation.Aggregator` instance, or a name, used instead of
            ``config.aggregator`` (with an instance, ``config.aggregator_options`` must be empty).
        shared: the shared trunk of a model with task-specific heads (a module or its parameters):
            only its gradients are aggregated; the heads get their plain gradient, as in
            Pytorch-PCGrad and TorchJD's ``mtl_backward``. Default: every parameter is aggregated.
        evaluate: ``evaluate(model) -> {name: value}`` at every epoch end (eval mode, no grad).
        forward: ``forward(model, inputs) -> outputs``, if calling ``model(inputs)`` is not right.
        ctx: the distributed context. Default: :meth:`DistributedContext.from_environment` (under
            ``torchrun`` the trainer joins the process group itself, on ``cuda:<LOCAL_RANK>`` or the
            CPU with gloo, and leaves it in :meth:`close`; otherwise one process). With several ranks:
            the model starts from rank 0's parameters; the data is sharded per rank (a plain
            ``DataLoader`` through :func:`tolaria.distributed.shard`, an object with
            ``for_rank(rank, world_size)`` through that; anything else is used as given and must
            already be this rank's shard, with the same number of batches on every rank); each step
            averages the K x N gradient buffer and the losses over the ranks before the aggregation
            (with a generator seeded the same on every rank), so replicas stay identical; the ranks
            agree on the emergency level every ``distributed.emergency_check_every`` steps (HALT on
            one rank stops all); rank 0 writes the checkpoints (between barriers) and consults the
            control policy, broadcasting its outcome; every rank writes ``telemetry-rank<r>.jsonl``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: Iterable[Any],
        loss_fn: Callable[[Any, Any], Tensor | Mapping[str, Tensor]],
        config: TrainerConfig | None = None,
        policy: Policy | None = None,
        executor: Executor | None = None,
        telemetry: TelemetryEmitter | None = None,
        *,
        aggregator: Aggregator | str | None = None,
        shared: nn.Module | Iterable[Tensor] | None = None,
        evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        ctx: DistributedContext | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(outputs, batch)")
        config = config if config is not None else TrainerConfig()
        if not isinstance(config, TrainerConfig):
            raise TypeError(f"config must be a TrainerConfig, got {type(config).__name__}")
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
        self.config = config
        self.model = model
        self.data = data
        self.loss_fn = loss_fn
        self.evaluate = evaluate
        self.forward = forward
        if ctx is not None and not isinstance(ctx, DistributedContext):
            raise TypeError(f"ctx must be a DistributedContext, got {type(ctx).__name__}")
        self._owns_ctx = ctx is None
        if ctx is None:
            wanted = resolve_device(config.device)
            # "cuda" (no index) lets a torchrun rank take its own GPU; an explicit cuda:N is kept.
            ctx_device = "cuda" if wanted.type == "cuda" and config.device in ("auto", "cuda") else wanted
            ctx = DistributedContext.from_environment(device=ctx_device, timeout_s=config.distributed.timeout_s)
        self.ctx = ctx
        self._closed = False
        self.telemetry = None  # type: ignore[assignment]  # set below; close() checks it
        self._owns_telemetry = False
        self.state: StateManager | None = None
        self.mediator: ControlMediator | None = None
        self._shared_signal: Any = None
        self._owns_signal = False
        try:
            self.device = ctx.device if ctx.is_distributed else resolve_device(config.device)
            self.model.to(self.device)
            _move_optimizer_state(optimizer)
            run_dir = Path(config.run_dir) if config.run_dir is not None else default_run_dir()
            # Every rank uses rank 0's folder (a default one is a timestamp, which could differ per rank).
            self.run_dir = Path(broadcast_json(str(run_dir), ctx)) if ctx.is_distributed else run_dir
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._owns_telemetry = telemetry is None
            self.telemetry = telemetry if telemetry is not None else self._build_telemetry()
        except BaseException:
            self.close()
            raise
        if ctx.is_distributed:
            bind_rank(self.telemetry, ctx)
            self.telemetry.bind(epoch=0, step=0)
        else:
            self.telemetry.bind(rank=ctx.rank, epoch=0, step=0)
        if ctx.is_main:
            (self.run_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")

        try:
            broadcast_module_state(self.model, ctx)  # replicas start from rank 0's parameters
            self.data = self._shard(data)
            self.generator: torch.Generator | None = None
            if isinstance(aggregator, Aggregator):
                # The caller's instance draws from its own generator (if it has one); under torchrun
                # it must be seeded alike on every rank, which the replica checks verify.
                self.aggregator = aggregator
            else:
                aggregator_options = dict(config.aggregator_options)
                if aggregator_class(config.aggregator).takes_generator() and "generator" not in aggregator_options:
                    # The same draws on every rank (and a state to checkpoint): replicas stay identical.
                    self.generator = synchronized_generator(config.seed, ctx, telemetry=self.telemetry)
                    aggregator_options["generator"] = self.generator
                self.aggregator = build_aggregator(config.aggregator, **aggregator_options)
            self.stage = GradientStage(
                self.model, self.aggregator, max_grad_norm=config.safety.max_grad_norm, ctx=ctx,
                bucket_mb=config.distributed.bucket_mb, shared=shared,
            )
            self.optim = OptimizerManager(optimizer, telemetry=self.telemetry)
            self.lr = self._build_lr(optimizer)
            # Rank 0 owns the checkpoints; the others keep only their fast snapshots (for rollbacks).
            self.state = StateManager(
                self.run_dir / ("checkpoints" if ctx.is_main else f"state-rank{ctx.rank}"),
                fast_cache_mb=config.checkpoint.fast_cache_mb,
                keep_last=config.checkpoint.keep_last, telemetry=self.telemetry,
            )
            self._shared_signal, self._owns_signal = self._open_signal()
            signal = self._shared_signal if self._shared_signal is not None else LocalEmergencySignal("trainer")
            self.emergency = EmergencyController(signal=signal, telemetry=self.telemetry)
            self.safety = SafetyGuard(
                config.safety, self.state, self.emergency,
                rollback_deadline_s=config.checkpoint.rollback_deadline_s, telemetry=self.telemetry,
            )
            self.mediator = ControlMediator(
                policy, executor, timeout_s=config.control_timeout_s,
                failure_threshold=config.control_failure_threshold, cooldown_s=config.control_cooldown_s,
                recovery_calls=config.control_recovery_calls, max_abandoned=config.control_max_abandoned,
                telemetry=self.telemetry,
            )
            self.profiler = self._build_profiler()
            self._forward_model: Callable[..., Any] = torch.compile(self.model) if config.compile else self.model
        except BaseException:
            self.close()  # release what was built (folder lock, shared signal, telemetry file)
            raise
        self.step = 0
        self.epoch = 0
        self._fitted = False
        self._confirm_rebuild = False

    # ---- construction helpers ------------------------------------------------------------------

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The live optimizer (a new object after an optimizer rebuild)."""
        return self.optim.optimizer

    def _build_telemetry(self) -> TelemetryEmitter:
        cfg = self.config.telemetry
        distributed = self.ctx.is_distributed
        sinks: list[Any] = []
        rank_jsonl = cfg.jsonl and distributed  # telemetry-rank<r>.jsonl, through rank_telemetry below
        if cfg.jsonl and not distributed:
            sinks.append(JsonlSink(self.run_dir / TELEMETRY_FILE))
        if cfg.log_severity != "off":
            sinks.append(LoggingSink(min_severity=cfg.log_severity))
        if cfg.tensorboard:
            sinks.append(TensorBoardSink(self.run_dir / ("tensorboard" if not distributed else f"tensorboard-rank{self.ctx.rank}")))
        if rank_jsonl:
            # telemetry-rank<r>.jsonl, every record tagged with the rank and rank 0's run id.
            return rank_telemetry(self.ctx, self.run_dir, sinks=sinks, batch_size=cfg.batch_size, rate_limits=cfg.rate_limits)
        if not sinks:
            raise ConfigError("telemetry has no sink: enable telemetry.jsonl, telemetry.tensorboard or a log_severity")
        return TelemetryEmitter(sinks, batch_size=cfg.batch_size, rate_limits=cfg.rate_limits)

    def _shard(self, data: Iterable[Any]) -> Iterable[Any]:
        """This rank's share of ``data`` (``data`` itself in one process)."""
        ctx = self.ctx
        if not ctx.is_distributed or isinstance(data, ShardedLoader):
            return data
        if isinstance(data, torch.utils.data.DataLoader):
            return shard(data, ctx, seed=self.config.seed or 0, telemetry=self.telemetry)
        for_rank = getattr(data, "for_rank", None)
        if callable(for_rank):
            return for_rank(ctx.rank, ctx.world_size)
        message = (
            f"data of type {type(data).__name__} cannot be sharded by the trainer (not a DataLoader, no "
            f"for_rank(rank, world_size)); it is used as given and must already be rank {ctx.rank}'s shard, "
            "with the same number of batches on every rank"
        )
        log.warning(message)
        self.telemetry.event("distributed.data_unsharded", severity="warning", message=message)
        return data

    def _total_steps(self) -> int | None:
        per_epoch = _length(self.data)
        by_epochs = None if per_epoch is None else per_epoch * self.config.epochs
        if self.config.max_steps is None:
            return by_epochs
        return self.config.max_steps if by_epochs is None else min(by_epochs, self.config.max_steps)

    def _build_lr(self, optimizer: torch.optim.Optimizer):
        cfg = self.config.lr
        kwargs = cfg.controller_kwargs()
        needs_length = cfg.policy == "linear" or (cfg.policy == "cosine" and cfg.restarts is None)
        if needs_length and cfg.t_max is None:
            total = self._total_steps()
            if total is None:
                raise ConfigError(
                    f"lr.policy {cfg.policy!r} needs lr.t_max: the data has no len() and max_steps is not set"
                )
            kwargs["t_max"] = max(1, total - cfg.warmup_steps)
        return build_controller(optimizer, cfg.policy, telemetry=self.telemetry, **kwargs)

    def _open_signal(self):
        name = self.config.safety.emergency_signal
        if name is None:
            return None, False
        from tolaria.signals import SharedEmergencySignal

        try:
            return SharedEmergencySignal.attach(name), False
        except FileNotFoundError:
            signal = SharedEmergencySignal.create(name)
            self.telemetry.event("safety.signal_created", message=f"created shared emergency signal {name!r}", signal=name)
            return signal, True

    def _build_profiler(self):
        cfg = self.config.profiler
        trace_dir = cfg.trace_dir or (str(self.run_dir / "traces") if cfg.enabled else None)
        # The config section mirrors tolaria.profiler.ProfilerConfig field for field (a test holds
        # them together); only the trace folder's default, the run folder, is the trainer's own.
        pcfg = profiler_mod.ProfilerConfig(**{**cfg.to_dict(), "trace_dir": trace_dir})
        return profiler_mod.build_profiler(pcfg, run_id=str(self.telemetry.attributes.get("run_id")), telemetry=self.telemetry)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        amp = self.config.amp
        if amp == "off" or (amp == "auto" and self.device.type != "cuda"):
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    # ---- one step --------------------------------------------------------------------------------

    def _compute_losses(self, batch: Any) -> Tensor | Mapping[str, Tensor]:
        model_device = next(self.model.parameters()).device
        with self._autocast():
            inputs = move_to(split_inputs(batch), model_device)
            outputs = self.forward(self._forward_model, inputs) if self.forward else self._forward_model(inputs)
            out = first_tensor(outputs)
            if out is None:
                raise TypeError(f"the model returned no tensor (got {type(outputs).__name__})")
            return self.loss_fn(outputs, move_to(batch, out.device))

    def _agree_on_emergency(self) -> None:
        """The highest emergency level over the ranks becomes this rank's (no-op in one process)."""
        if self.ctx.is_distributed:
            agree_on_emergency_level(self.emergency.level, self.ctx, controller=self.emergency, telemetry=self.telemetry)

    def _train_step(self, batch: Any) -> tuple[str, SourceStats]:
        self.stage.zero_grad()
        stats = self.stage.backward(self._compute_losses(batch))
        verdict = self.safety.check_step(stats, self.step, self.model, self.optimizer)
        if self.ctx.is_distributed and verdict.action in (ROLLED_BACK, HALT):
            # The stats are identical on every rank, so all ranks got here; but a rollback has a
            # deadline, so it can fail on one rank only: then every rank halts.
            if any_rank(verdict.action == HALT, self.ctx) and verdict.action != HALT:
                reason = "a rollback failed on another rank; halting every rank"
                self.emergency.escalate(EmergencyLevel.HALT, reason)
                verdict = type(verdict)(HALT, reason=reason)
        if verdict.action == ROLLED_BACK:
            assert verdict.step is not None
            # The aggregator's state goes back with the model: a moving average that took in the
            # non-finite steps would otherwise carry them past the rollback.
            restore_aggregator(self.aggregator, self.generator, self.state.last_restored_extra, telemetry=self.telemetry,
                               where=f"the state rolled back to (step {verdict.step})")
            self.step = verdict.step
            self.telemetry.bind(step=self.step)
            return ROLLED_BACK, stats
        if verdict.action in (SKIP, HALT):
            if verdict.action == HALT:
                self._halt_reason = verdict.reason
            if self._confirm_rebuild:
                self._confirm_rebuild = False
                self.optim.report_failure(f"the first step after an optimizer rebuild was not finite ({verdict.action})")
            return verdict.action, stats
        self.lr.apply(self.step)
        self.optimizer.step()
        if self._confirm_rebuild:
            self._confirm_rebuild = False
            self.optim.report_success()
        self.step += 1
        self.telemetry.bind(step=self.step)
        every = self.config.checkpoint.snapshot_every_steps
        if every and self.step % every == 0:
            self._snapshot()
        return "step", stats

    def _snapshot(self) -> None:
        try:
            self.state.snapshot(self.step, self.model, self.optimizer,
                                extra=aggregator_extra(self.aggregator, self.generator))
        except StateError as exc:  # e.g. the optimizer state outgrew the cache: reported, training goes on
            message = f"snapshot at step {self.step} failed: {exc}; rollbacks will use older snapshots or checkpoints"
            log.error(message)
            self.telemetry.count("train.snapshot_failures")
            self.telemetry.event("train.snapshot_failed", severity="error", message=message)

    # ---- the run ---------------------------------------------------------------------------------

    def fit(self) -> RunSummary:
        """Runs the training (see the module docstring) and returns its :class:`RunSummary`."""
        if self._fitted:
            raise RuntimeError("fit() was already called on this Trainer; build a new one for another run")
        if self._closed:
            raise RuntimeError("this Trainer is closed; build a new one to train")
        self._fitted = True
        started = time.monotonic()
        self._halt_reason: str | None = None
        run_stats = SourceAccumulator()
        epoch_stats = SourceAccumulator()
        metrics: dict[str, float] = {}
        status = COMPLETED
        epoch_complete = True  # whether self.epoch's data was used up (decides where a resume starts)
        try:
            if self.config.seed is not None:
                torch.manual_seed(self.config.seed)
            resumed = self._resume() if self.config.checkpoint.resume else None
            start_epoch = epochs_done = self.epoch
            last_ckpt: int | None = resumed
            self.state.snapshot(self.step, self.model, self.optimizer,
                                extra=aggregator_extra(self.aggregator, self.generator))  # the first rollback target
            self.telemetry.event(
                "train.start", message=f"training in {self.run_dir}", run_dir=str(self.run_dir),
                device=str(self.device), aggregator=repr(self.aggregator), epochs=self.config.epochs,
                max_steps=self.config.max_steps, resumed_from_step=resumed,
            )
            for epoch in range(start_epoch, self.config.epochs):
                self.epoch = epoch
                self.telemetry.bind(epoch=epoch)
                epoch_stats.reset()
                status, epoch_complete = self._run_epoch(epoch, epoch_stats, run_stats)
                if status in (HALTED, INTERRUPTED):
                    break
                if epoch_complete:
                    epochs_done = epoch + 1
                metrics = self._end_epoch(epoch, epoch_stats, metrics, started)
                every = self.config.checkpoint.checkpoint_every_epochs
                if epoch_complete and every and epochs_done % every == 0:
                    last_ckpt = self._checkpoint(epoch_complete=True, final=False) or last_ckpt
                self.telemetry.flush()  # the epoch's records reach the sinks with its checkpoint
                if status == MAX_STEPS:
                    break
                self._agree_on_emergency()
                reason = self.safety.halt_reason()
                if reason is not None:
                    status, self._halt_reason = HALTED, reason
                    break
            if status in (HALTED, INTERRUPTED) and epoch_stats.steps and self.evaluate is not None:
                metrics = self._evaluate()
            if last_ckpt != self.step:
                last_ckpt = self._checkpoint(epoch_complete=epoch_complete, final=True)
        except BaseException as exc:
            self.telemetry.event(
                "train.crashed", severity="critical", message=f"training stopped by {type(exc).__name__}: {exc}",
                error=f"{type(exc).__name__}: {exc}",
            )
            log.critical("training stopped by %s: %s", type(exc).__name__, exc)
            self.close()
            raise
        summary = RunSummary(
            status=status,
            epochs=epochs_done,
            steps=self.step,
            skipped_steps=self.safety.skipped_steps,
            rollbacks=self.safety.rollbacks,
            wall_time_s=time.monotonic() - started,
            sources=tuple(self.stage.names or ()),
            final_losses=epoch_stats.losses or run_stats.losses,
            metrics=dict(metrics),
            conflict_rate=run_stats.conflict_rate,
            halt_reason=self._halt_reason if status == HALTED else None,
            run_dir=self.run_dir,
            last_checkpoint_step=last_ckpt,
            resumed_from_step=resumed,
            control_failures=self.mediator.failures,
            telemetry_file=(self.run_dir / telemetry_file_name(self.ctx)) if self._owns_telemetry and self.config.telemetry.jsonl else None,
        )
        self.telemetry.event(
            "train.end", severity="warning" if status == HALTED else "info",
            message=f"training {status} after {summary.epochs} epoch(s), {summary.steps} step(s)",
            status=status, epochs=summary.epochs, steps=summary.steps, skipped_steps=summary.skipped_steps,
            rollbacks=summary.rollbacks, wall_time_s=summary.wall_time_s, metrics=summary.metrics,
            conflict_rate=summary.conflict_rate, halt_reason=summary.halt_reason, final_losses=summary.final_losses,
        )
        self.close()
        return summary

    def _run_epoch(self, epoch: int, epoch_stats: SourceAccumulator, run_stats: SourceAccumulator) -> tuple[str, bool]:
        """Runs one epoch; returns (status, whether the epoch's data was used up)."""
        cfg = self.config
        log_every = cfg.telemetry.log_every_steps
        halt_every = cfg.safety.halt_check_every_steps
        distributed = self.ctx.is_distributed
        if distributed:
            # Every rank must stop at the same step: halts are read only where the ranks agree.
            halt_every = cfg.distributed.emergency_check_every
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(epoch)
        batches: Iterable[Any] = self.data
        bar = None
        if cfg.progress and self.ctx.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(self.data, total=_length(self.data), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=True, dynamic_ncols=True)
            batches = bar
        epoch_start = time.monotonic()
        attempts = 0
        try:
            with self.profiler.epoch(epoch, first_step=self.step) as window:
                for batch in batches:
                    attempts += 1
                    if attempts % halt_every == 0:
                        self._agree_on_emergency()
                        reason = self.safety.halt_reason()
                        if reason is not None:
                            self._halt_reason = reason
                            return HALTED, False
                    action, stats = self._train_step(batch)
                    window.step()
                    if action == HALT:
                        return HALTED, False
                    if action == "step":
                        epoch_stats.add(stats)
                        run_stats.add(stats)
                        if self.step % log_every == 0:
                            emit_step_metrics(self.telemetry, stats, self.lr.get_last_lr())
                            if bar is not None:
                                bar.set_postfix({n: f"{v:.3f}" for n, v in zip(stats.names, stats.losses)}, refresh=False)
                    if cfg.control_every_steps and self.step and self.step % cfg.control_every_steps == 0 and action == "step":
                        self._control(epoch_stats, {}, time.monotonic() - epoch_start)
                    if cfg.max_steps is not None and self.step >= cfg.max_steps:
                        return MAX_STEPS, False
        except KeyboardInterrupt:
            self.telemetry.event("train.interrupted", severity="warning", message="training interrupted (Ctrl-C); writing a final checkpoint")
            return INTERRUPTED, False
        finally:
            if bar is not None:
                bar.close()
            self._epoch_elapsed = time.monotonic() - epoch_start
        return COMPLETED, True

    def _evaluate(self) -> dict[str, float]:
        if self.evaluate is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast():
                result = self.evaluate(self.model)
        finally:
            self.model.train(was_training)
        if not isinstance(result, Mapping):
            raise TypeError(f"evaluate(model) must return a mapping of metric names to numbers, got {type(result).__name__}")
        metrics = {str(k): float(v) for k, v in result.items()}
        for name, value in metrics.items():
            self.telemetry.metric(f"eval.{name}", value)
        return metrics

    def _end_epoch(self, epoch: int, stats: SourceAccumulator, previous: dict[str, float], started: float) -> dict[str, float]:
        metrics = self._evaluate() if self.evaluate is not None else previous
        summary = stats.summary()
        elapsed = self._epoch_elapsed
        self.telemetry.event(
            "train.epoch", message=f"epoch {epoch + 1} done in {elapsed:.1f} s",
            train_steps=summary.pop("steps"), duration_s=elapsed, metrics=metrics, **summary,
        )
        self.safety.check_epoch_time(epoch, elapsed)
        self._control(stats, metrics, time.monotonic() - started)
        self.safety.end_epoch(epoch)
        self.telemetry.flush_counters()
        return metrics

    # ---- control ---------------------------------------------------------------------------------

    def _control(self, stats: SourceAccumulator, metrics: Mapping[str, float], elapsed_s: float) -> None:
        if self.mediator.policy is None:
            return
        if self.ctx.is_distributed:
            self._control_distributed(stats, metrics, elapsed_s)
            return
        decision = self._consult(stats, metrics, elapsed_s)
        self._apply_conservative(decision)
        if decision["params_changed"]:
            self._rebuild_optimizer()

    def _consult(self, stats: SourceAccumulator, metrics: Mapping[str, float], elapsed_s: float) -> dict[str, Any]:
        """Consults the mediator once; returns what changed (a JSON-able dict, broadcast by rank 0)."""
        was_conservative, params_before = self.mediator.conservative, self._param_ids()
        self.mediator.consult(self._control_state(stats, metrics, elapsed_s))  # losses: all-reduced per step
        return {
            "was_conservative": was_conservative,
            "conservative": self.mediator.conservative,
            "reason": self.mediator.conservative_reason,
            "params_changed": self._param_ids() != params_before,
            "lrs": [float(g["lr"]) for g in self.optimizer.param_groups],
        }

    def _apply_conservative(self, decision: Mapping[str, Any], where: str = "") -> None:
        """Enters or leaves the conservative emergency level as the mediator did (``where``: " on rank 0")."""
        if decision["conservative"] and not decision["was_conservative"]:
            self.emergency.escalate(EmergencyLevel.CONSERVATIVE, f"control calls failing{where}: {decision['reason']}")
        elif decision["was_conservative"] and not decision["conservative"] and self.emergency.level == EmergencyLevel.CONSERVATIVE:
            self.emergency.deescalate(EmergencyLevel.NONE, f"control calls succeed again{where}")

    def _control_state(self, stats: SourceAccumulator, metrics: Mapping[str, float], elapsed_s: float) -> ControlState:
        return ControlState(
            epoch=self.epoch, step=self.step, losses=dict(stats.losses), metrics=dict(metrics),
            lr=tuple(self.lr.get_last_lr()) if self.lr.last_step is not None else tuple(g["lr"] for g in self.optimizer.param_groups),
            conflict_rate=stats.conflict_rate, emergency_level=self.emergency.level.name,
            conservative=self.mediator.conservative, elapsed_s=elapsed_s,
        )

    def _control_distributed(self, stats: SourceAccumulator, metrics: Mapping[str, float], elapsed_s: float) -> None:
        """Rank 0 consults the mediator (its calls are timed, so outcomes could differ per rank) and
        broadcasts the outcome; every rank then takes the same decisions at the same step."""
        ctx = self.ctx
        decision: dict[str, Any] | None = None
        if ctx.is_main:
            decision = self._consult(stats, metrics, elapsed_s)
        decision = broadcast_json(decision, ctx)
        if decision["params_changed"]:
            raise DistributedError(
                "the control executor changed the model's parameters on rank 0; grafting modules is not supported "
                "with several ranks (the other ranks' replicas would differ); stopping every rank"
            )
        if len(decision["lrs"]) != len(self.optimizer.param_groups):
            raise DistributedError(f"rank 0 has {len(decision['lrs'])} param groups, rank {ctx.rank} has "
                                   f"{len(self.optimizer.param_groups)}")
        for group, lr in zip(self.optimizer.param_groups, decision["lrs"]):
            group["lr"] = lr  # an LR a command set on rank 0 holds everywhere
        self._apply_conservative(decision, where=" on rank 0")

    def _param_ids(self) -> tuple[int, ...]:
        return tuple(id(p) for p in self.model.parameters() if p.requires_grad)

    def _rebuild_optimizer(self) -> None:
        result = self.optim.rebuild(self.model)
        if not result.success:
            message = f"the model's parameters changed but the optimizer rebuild failed: {result.error}"
            log.error(message)
            self.telemetry.event("train.rebuild_failed", severity="error", message=message)
            return
        self.lr.attach(self.optim.optimizer)
        self.stage.rebind(self.model)
        self._confirm_rebuild = True  # the next step tells the breaker whether the rebuild really worked
        self._snapshot()  # older snapshots hold the old parameter set; give rollbacks a matching target
        self.telemetry.event(
            "train.rebuilt", message=f"parameters changed: optimizer rebuilt (+{result.added} / -{result.removed})",
            added=result.added, removed=result.removed,
        )

    # ---- checkpoints and resume ------------------------------------------------------------------

    def _checkpoint(self, *, epoch_complete: bool, final: bool) -> int | None:
        extra = {
            "epoch": self.epoch,
            "epoch_complete": epoch_complete,
            "step": self.step,
            "lr": self.lr.state_dict(),
            "sources": list(self.stage.names or ()),
        }
        extra.update(aggregator_extra(self.aggregator, self.generator))
        try:
            # Every rank: agree on the step, verify the replicas, rank 0 writes between barriers.
            checkpoint_barrier(self.state if self.ctx.is_main else None, self.ctx, self.step, self.model, self.optimizer,
                               extra, telemetry=self.telemetry)
        except Exception as exc:
            message = f"{'final' if final else 'periodic'} checkpoint at step {self.step} failed: {type(exc).__name__}: {exc}"
            log.critical(message)
            self.telemetry.event("train.checkpoint_failed", severity="critical", message=message, final=final)
            if final:
                raise
            self.emergency.escalate(EmergencyLevel.ELEVATED, message)
            return None
        self.telemetry.event(
            "train.checkpoint", message=f"checkpoint at step {self.step}", final=final, epoch_complete=epoch_complete,
        )
        return self.step

    def _resume(self) -> int:
        # Rank 0 restores, every other rank receives the same state (and all raise if any fails).
        restored = resume_from_checkpoint(self.state if self.ctx.is_main else None, self.ctx, self.model,
                                          self.optimizer, telemetry=self.telemetry)
        step, extra = restored.step, restored.extra
        if not isinstance(extra, Mapping) or "epoch" not in extra:
            raise ValueError(f"checkpoint at step {step} was not written by the Trainer (no epoch in its extra data)")
        self.step = int(step)
        self.epoch = int(extra["epoch"]) + (1 if extra.get("epoch_complete") else 0)
        self.lr.load_state_dict(extra["lr"])
        restore_aggregator(self.aggregator, self.generator, extra, telemetry=self.telemetry,
                           where=f"the checkpoint of step {self.step}")
        self.telemetry.bind(step=self.step, epoch=self.epoch)
        self.telemetry.event(
            "train.resume", message=f"resumed from the checkpoint at step {self.step}; next epoch {self.epoch + 1}",
            restored_step=self.step, next_epoch=self.epoch,
        )
        return self.step

    # ---- shutdown --------------------------------------------------------------------------------

    def close(self) -> None:
        """Releases what the trainer holds (control worker, checkpoint folder lock, signals, its own
        telemetry). ``fit`` calls it at the end; call it yourself for a trainer never fitted. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.mediator is not None:
            self.mediator.close()
        if self._shared_signal is not None:
            if self._owns_signal:
                self._shared_signal.unlink()
            self._shared_signal.close()
        if self.state is not None:
            self.state.close()
        if self.telemetry is not None:
            if self._owns_telemetry:
                self.telemetry.close()
            else:
                self.telemetry.flush()
        if self._owns_ctx:
            self.ctx.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _move_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state created before the model moved (e.g. loaded) follows its parameters."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, Tensor) and value.device != param.device and not (key == "step" and value.dim() == 0):
                state[key] = value.to(param.device)


def _length(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


__all__ = ["RunSummary", "Trainer", "first_tensor", "move_to", "resolve_device", "split_inputs"]
