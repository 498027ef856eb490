"""``Trainer``: the training loop, assembled from the components around it.

One step: batch -> model (bf16 autocast on CUDA) -> ``loss_fn(outputs, batch)`` -> named losses ->
gradient stage (``GradientBuffer`` + aggregator, straight into ``.grad``) -> safety verdict (apply,
skip, roll back, halt) -> LR for this step (``LRController``) -> optimizer step (``OptimizerManager``)
-> snapshot on cadence (``StateManager``) -> telemetry every ``log_every_steps``.

At an epoch end: evaluation (if given) -> epoch summary -> time budget check -> control mediator
(policy/executor under timeouts) -> durable checkpoint on cadence -> emergency level bookkeeping.

Every run ends with a final durable checkpoint, however it stops (completed, ``max_steps``, HALT, or
Ctrl-C), and returns a :class:`RunSummary`.

This module is the loop; its parts live beside it: ``wiring`` builds the components, ``control``
consults the policy (and makes the ranks agree), ``checkpointing`` saves and restores, ``batches``
handles batches and devices.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from tolaria.aggregation import Aggregator
from tolaria.distributed import (
    DistributedContext,
    broadcast_module_state,
    telemetry_file_name,
)
from tolaria.optim import OptimizerManager
from tolaria.state import StateManager
from tolaria.telemetry import TelemetryEmitter

from . import checkpointing, control, evaluation, run_position, wiring
from .batches import (
    autocast,
    data_length,
    default_run_dir,  # noqa: F401 (re-exported: tolaria train imports it from here)
    first_tensor,
    move_to,
    resolve_device,
    split_inputs,
)
from .config import TrainerConfig
from .gradient import GradientStage, SourceAccumulator, SourceStats, emit_step_metrics
from .mediator import ControlMediator, Executor, Policy
from .safety import HALT, ROLLED_BACK, SKIP
from .summary import COMPLETED, HALTED, INTERRUPTED, MAX_STEPS, RunSummary  # noqa: F401 (re-exported)

log = logging.getLogger("tolaria.trainer")

# Re-exported: the run folder's file names were defined here before the wiring had its own module.
TELEMETRY_FILE, CONFIG_FILE = wiring.TELEMETRY_FILE, wiring.CONFIG_FILE


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
        config = wiring.check_arguments(model, optimizer, loss_fn, config, aggregator)
        self.config = config
        self.model = model
        self.data = data
        self.loss_fn = loss_fn
        self.evaluate = evaluate
        self.forward = forward
        self.ctx, self._owns_ctx = wiring.open_context(config, ctx)
        ctx = self.ctx
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
            wiring.move_optimizer_state(optimizer)
            self.run_dir = wiring.prepare_run_dir(config, ctx)
            self._owns_telemetry = telemetry is None
            self.telemetry = telemetry if telemetry is not None else wiring.build_telemetry(config, ctx, self.run_dir)
        except BaseException:
            self.close()
            raise
        wiring.bind_telemetry(self.telemetry, ctx)
        wiring.write_run_config(config, ctx, self.run_dir)

        try:
            if config.distributed.sharding != "fsdp":  # fsdp: each rank holds its own shards (GradientStage checks)
                broadcast_module_state(self.model, ctx)  # replicas start from rank 0's parameters
            self.data = wiring.shard_data(data, ctx, seed=config.seed or 0, telemetry=self.telemetry)
            self.aggregator, self.generator = wiring.wire_aggregator(config, aggregator, ctx, self.telemetry)
            self.stage = GradientStage(
                self.model,
                self.aggregator,
                max_grad_norm=config.safety.max_grad_norm,
                ctx=ctx,
                bucket_mb=config.distributed.bucket_mb,
                shared=shared,
                sharding=config.distributed.sharding,
                mode=config.aggregation_mode,
                level=config.aggregation_level,
                telemetry=self.telemetry,
            )
            self.optim = OptimizerManager(optimizer, telemetry=self.telemetry)
            self.lr = wiring.build_lr(config, optimizer, self.data, self.telemetry)
            self.state = wiring.build_state(config, self.run_dir, ctx, self.telemetry)
            self._shared_signal, self._owns_signal = wiring.open_signal(config, self.telemetry)
            self.emergency = wiring.build_emergency(self._shared_signal, self.telemetry)
            self.safety = wiring.build_safety(config, self.state, self.emergency, self.telemetry)
            self.mediator = wiring.build_mediator(config, policy, executor, self.telemetry, ctx)
            self.profiler = wiring.build_profiler(config, self.run_dir, self.telemetry)
            self._forward_model: Callable[..., Any] = torch.compile(self.model) if config.compile else self.model
        except BaseException:
            self.close()  # release what was built (folder lock, shared signal, telemetry file)
            raise
        self.step = 0
        self.epoch = 0
        self._fitted = False
        # The run's position (see run_position): batches of this epoch used, RNG at its start, a
        # mid-epoch resume still to apply, and the step of the last committed checkpoint.
        self._batches_used = 0
        self._epoch_start_rng: dict[str, Any] | None = None
        self._pending_resume: run_position.PendingResume | None = None
        self._last_checkpoint_step: int | None = None
        self._state_split: str | None = None  # why the ranks' states differ, when they do (no checkpoint then)
        self._confirm_rebuild = False

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The live optimizer (a new object after an optimizer rebuild)."""
        return self.optim.optimizer

    # ---- one step --------------------------------------------------------------------------------

    def _compute_losses(self, batch: Any) -> Tensor | Mapping[str, Tensor]:
        model_device = next(self.model.parameters()).device
        with autocast(self.config.amp, self.device):
            inputs = move_to(split_inputs(batch), model_device)
            with self.stage.forward_context():  # features level: the trunk's output; low_memory: measures
                outputs = self.forward(self._forward_model, inputs) if self.forward else self._forward_model(inputs)
            out = first_tensor(outputs)
            if out is None:
                raise TypeError(f"the model returned no tensor (got {type(outputs).__name__})")
            return self.loss_fn(outputs, move_to(batch, out.device))

    def _train_step(self, batch: Any) -> tuple[str, SourceStats]:
        self.stage.zero_grad()
        stats = self.stage.backward(self._compute_losses(batch))
        verdict = self.safety.check_step(stats, self.step, self.model, self.optimizer)
        verdict = control.agree_on_verdict(self, verdict)  # with several ranks: a HALT on one halts all
        if verdict.action == ROLLED_BACK:
            assert verdict.step is not None
            checkpointing.restore_after_rollback(self, verdict.step)
            return ROLLED_BACK, stats
        if verdict.action in (SKIP, HALT):
            if verdict.action == HALT:
                self._halt_reason = verdict.reason
            if self._confirm_rebuild:
                self._confirm_rebuild = False
                self.optim.report_failure(
                    f"the first step after an optimizer rebuild was not finite ({verdict.action})"
                )
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
            self._last_checkpoint_step = resumed
            checkpointing.first_snapshot(self)  # the first rollback target
            self.telemetry.event(
                "train.start",
                message=f"training in {self.run_dir}",
                run_dir=str(self.run_dir),
                device=str(self.device),
                aggregator=repr(self.aggregator),
                epochs=self.config.epochs,
                max_steps=self.config.max_steps,
                resumed_from_step=resumed,
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
                    self._checkpoint(epoch_complete=True, final=False)
                self.telemetry.flush()  # the epoch's records reach the sinks with its checkpoint
                if status == MAX_STEPS:
                    break
                control.agree_on_emergency(self)
                reason = self.safety.halt_reason()
                if reason is not None:
                    status, self._halt_reason = HALTED, reason
                    break
            if status in (HALTED, INTERRUPTED) and epoch_stats.steps and self.evaluate is not None:
                metrics = evaluation.evaluate(self)
            if self._last_checkpoint_step != self.step:
                self._checkpoint(epoch_complete=epoch_complete, final=True)
        except BaseException as exc:
            self.telemetry.event(
                "train.crashed",
                severity="critical",
                message=f"training stopped by {type(exc).__name__}: {exc}",
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
            last_checkpoint_step=self._last_checkpoint_step,
            resumed_from_step=resumed,
            control_failures=self.mediator.failures,
            telemetry_file=(self.run_dir / telemetry_file_name(self.ctx))
            if self._owns_telemetry and self.config.telemetry.jsonl
            else None,
        )
        self.telemetry.event(
            "train.end",
            severity="warning" if status == HALTED else "info",
            message=f"training {status} after {summary.epochs} epoch(s), {summary.steps} step(s)",
            status=status,
            epochs=summary.epochs,
            steps=summary.steps,
            skipped_steps=summary.skipped_steps,
            rollbacks=summary.rollbacks,
            wall_time_s=summary.wall_time_s,
            metrics=summary.metrics,
            conflict_rate=summary.conflict_rate,
            halt_reason=summary.halt_reason,
            final_losses=summary.final_losses,
        )
        self.close()
        return summary

    def _run_epoch(self, epoch: int, epoch_stats: SourceAccumulator, run_stats: SourceAccumulator) -> tuple[str, bool]:
        """Runs one epoch; returns (status, whether the epoch's data was used up)."""
        cfg = self.config
        log_every = cfg.telemetry.log_every_steps
        halt_every = cfg.safety.halt_check_every_steps
        if self.ctx.is_distributed:
            # Every rank must stop at the same step: halts are read only where the ranks agree.
            halt_every = cfg.distributed.emergency_check_every
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(epoch)
        batches: Iterable[Any] = self.data
        bar = None
        if cfg.progress and self.ctx.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(
                self.data,
                total=data_length(self.data),
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                leave=True,
                dynamic_ncols=True,
            )
            batches = bar
        epoch_start = time.monotonic()
        ckpt_every = cfg.checkpoint.checkpoint_every_steps
        try:
            with self.profiler.epoch(epoch, first_step=self.step) as window:
                # Mid-epoch resume: the batches the checkpoint had used are skipped, RNG replayed.
                batches, attempts = run_position.epoch_iterator(self, batches)
                self._batches_used = attempts
                for batch in batches:
                    attempts += 1
                    if attempts % halt_every == 0:
                        control.agree_on_emergency(self)
                        reason = self.safety.halt_reason()
                        if reason is not None:
                            self._halt_reason = reason
                            return HALTED, False
                    action, stats = self._train_step(batch)
                    self._batches_used = attempts
                    window.step()
                    if action == HALT:
                        return HALTED, False
                    if action == "step":
                        epoch_stats.add(stats)
                        run_stats.add(stats)
                        if self.step % log_every == 0:
                            emit_step_metrics(self.telemetry, stats, self.lr.get_last_lr())
                            if bar is not None:
                                bar.set_postfix(
                                    {n: f"{v:.3f}" for n, v in zip(stats.names, stats.losses)}, refresh=False
                                )
                    if (
                        cfg.control_every_steps
                        and self.step
                        and self.step % cfg.control_every_steps == 0
                        and action == "step"
                    ):
                        control.control(self, epoch_stats, {}, time.monotonic() - epoch_start)
                    if ckpt_every and action == "step" and self.step % ckpt_every == 0:
                        self._checkpoint(epoch_complete=False, final=False)  # after all of this batch's work
                    if cfg.max_steps is not None and self.step >= cfg.max_steps:
                        return MAX_STEPS, False
        except KeyboardInterrupt:
            self.telemetry.event(
                "train.interrupted",
                severity="warning",
                message="training interrupted (Ctrl-C); writing a final checkpoint",
            )
            return INTERRUPTED, False
        finally:
            if bar is not None:
                bar.close()
            self._epoch_elapsed = time.monotonic() - epoch_start
        return COMPLETED, True

    def _end_epoch(
        self, epoch: int, stats: SourceAccumulator, previous: dict[str, float], started: float
    ) -> dict[str, float]:
        metrics = evaluation.evaluate(self) if self.evaluate is not None else previous
        summary = stats.summary()
        elapsed = self._epoch_elapsed
        self.telemetry.event(
            "train.epoch",
            message=f"epoch {epoch + 1} done in {elapsed:.1f} s",
            train_steps=summary.pop("steps"),
            duration_s=elapsed,
            metrics=metrics,
            **summary,
        )
        self.safety.check_epoch_time(epoch, elapsed)
        control.control(self, stats, metrics, time.monotonic() - started)
        self.safety.end_epoch(epoch)
        self.telemetry.flush_counters()
        return metrics

    # ---- checkpoints (in ``checkpointing``; methods, so that tests can replace ``_snapshot``) --

    def _checkpoint(self, *, epoch_complete: bool, final: bool) -> int | None:
        step = checkpointing.checkpoint(self, epoch_complete=epoch_complete, final=final)
        if step is not None:
            self._last_checkpoint_step = step
        return step

    def _resume(self) -> int:
        return checkpointing.resume(self)

    def _snapshot(self) -> None:
        checkpointing.snapshot(self)

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


__all__ = ["RunSummary", "Trainer", "first_tensor", "move_to", "resolve_device", "split_inputs"]
