"""The trainer's state on disk and in memory: durable checkpoints, resume, and rollback snapshots.

A checkpoint's ``extra`` carries what the model and optimizer do not: the epoch (and whether its
data was used up, which decides where a resume starts), the step, the LR controller's state, the
gradient sources' names, the aggregator's state (``aggregator_state``) and the run's position: the
batches of the epoch used and every rank's random states (``run_position``), so a resume repeats the
uninterrupted run bit for bit. With several ranks every rank takes part (rank 0 writes, between
barriers; on resume rank 0 reads and the others receive). A sharded run (``[distributed] sharding``
``"zero"`` or ``"fsdp"``) checkpoints through ``torch.distributed.checkpoint`` instead:
every rank writes and reads its own shard, in ``<run>/sharded-checkpoints``
(:class:`~tolaria.state.sharded_checkpoints.ShardedCheckpointStore`), and may resume on another
world size.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tolaria.distributed import checkpoint_barrier, resume_from_checkpoint
from tolaria.state import StateError

from . import checkpoint_failures
from .aggregator_state import aggregator_extra, restore_aggregator
from .run_position import position_extra, restore_position

if TYPE_CHECKING:
    from .loop import Trainer

__all__ = ["checkpoint", "first_snapshot", "restore_after_rollback", "resume", "snapshot"]

log = logging.getLogger("tolaria.trainer")

SHARDED_CHECKPOINTS_DIR = "sharded-checkpoints"


def _sharded(trainer: Trainer) -> bool:
    # By the config, not the world size: a sharded run's checkpoints resume in one process too.
    return trainer.config.distributed.sharding != "none"


def _sharded_store(trainer: Trainer) -> Any:
    """The run's :class:`ShardedCheckpointStore` (built on first use: importing DCP takes a second or two)."""
    store = getattr(trainer, "_sharded_store", None)
    if store is None:
        from tolaria.state.sharded_checkpoints import ShardedCheckpointStore

        store = ShardedCheckpointStore(
            trainer.run_dir / SHARDED_CHECKPOINTS_DIR, trainer.config.checkpoint.keep_last, telemetry=trainer.telemetry
        )
        trainer._sharded_store = store
    return store


def checkpoint(trainer: Trainer, *, epoch_complete: bool, final: bool) -> int | None:
    """Writes a durable checkpoint; returns its step, or None when it failed (reported; the run goes
    on or halts per ``[checkpoint] on_failure``, see :mod:`.checkpoint_failures`). A failed final
    checkpoint raises, unless the run is halting because checkpoints kept failing.

    Nothing is written once the ranks' states split (``trainer._state_split``, set by
    ``control.agree_on_verdict``): the newest committed checkpoint stays the last common state."""
    if trainer._state_split is not None:
        message = (
            f"{'final' if final else 'periodic'} checkpoint at step {trainer.step} not written: "
            f"{trainer._state_split}; the last common state is the checkpoint of step {trainer._last_checkpoint_step}"
        )
        log.critical(message)
        trainer.telemetry.event("train.checkpoint_skipped", severity="critical", message=message, final=final)
        return None
    extra = {
        "epoch": trainer.epoch,
        "epoch_complete": epoch_complete,
        "step": trainer.step,
        "lr": trainer.lr.state_dict(),
        "sources": list(trainer.stage.names or ()),
    }
    extra.update(aggregator_extra(trainer.aggregator, trainer.generator))
    ctx = trainer.ctx
    extra.update(position_extra(trainer))  # a collective: every rank's random states to rank 0
    try:
        if _sharded(trainer):  # every rank writes its shard (DCP)
            _sharded_store(trainer).write(trainer.step, trainer.model, trainer.optimizer, extra)
        else:  # every rank: agree on the step, verify the replicas, rank 0 writes between barriers
            checkpoint_barrier(
                trainer.state if ctx.is_main else None,
                ctx,
                trainer.step,
                trainer.model,
                trainer.optimizer,
                extra,
                telemetry=trainer.telemetry,
            )
    except Exception as exc:
        message = (
            f"{'final' if final else 'periodic'} checkpoint at step {trainer.step} failed: {type(exc).__name__}: {exc}"
        )
        if checkpoint_failures.checkpoint_failed(trainer, message, final=final):
            raise
        return None
    checkpoint_failures.checkpoint_succeeded(trainer)
    trainer.telemetry.event(
        "train.checkpoint",
        message=f"checkpoint at step {trainer.step}",
        final=final,
        epoch_complete=epoch_complete,
    )
    return trainer.step


def resume(trainer: Trainer) -> int:
    """Restores the latest checkpoint into the trainer (model, optimizer, step, epoch, LR,
    aggregator, data position and random states); returns the restored step."""
    ctx = trainer.ctx
    if _sharded(trainer):  # every rank reads its shard, resharded to this world size (DCP)
        restored: Any = _sharded_store(trainer).load_newest(trainer.model, trainer.optimizer)
    else:  # rank 0 restores, every other rank receives the same state (and all raise if any fails)
        restored = resume_from_checkpoint(
            trainer.state if ctx.is_main else None, ctx, trainer.model, trainer.optimizer, telemetry=trainer.telemetry
        )
    step, extra = restored.step, restored.extra
    if not isinstance(extra, Mapping) or "epoch" not in extra:
        raise ValueError(f"checkpoint at step {step} was not written by the Trainer (no epoch in its extra data)")
    trainer.step = int(step)
    # An epoch whose data was used up is done: the run goes on with the next one.
    trainer.epoch = int(extra["epoch"]) + (1 if extra.get("epoch_complete") else 0)
    restore_position(trainer, extra, epoch_complete=bool(extra.get("epoch_complete")))
    trainer.lr.load_state_dict(extra["lr"])
    restore_aggregator(
        trainer.aggregator,
        trainer.generator,
        extra,
        telemetry=trainer.telemetry,
        where=f"the checkpoint of step {trainer.step}",
    )
    trainer.telemetry.bind(step=trainer.step, epoch=trainer.epoch)
    trainer.telemetry.event(
        "train.resume",
        message=f"resumed from the checkpoint at step {trainer.step}; next epoch {trainer.epoch + 1}",
        restored_step=trainer.step,
        next_epoch=trainer.epoch,
    )
    return trainer.step


def first_snapshot(trainer: Trainer) -> None:
    """The snapshot a run starts with: the first rollback target (a failure here stops the run)."""
    trainer.state.snapshot(
        trainer.step, trainer.model, trainer.optimizer, extra=aggregator_extra(trainer.aggregator, trainer.generator)
    )


def snapshot(trainer: Trainer) -> None:
    """A rollback snapshot on cadence; a failure is reported and training goes on."""
    try:
        trainer.state.snapshot(
            trainer.step,
            trainer.model,
            trainer.optimizer,
            extra=aggregator_extra(trainer.aggregator, trainer.generator),
        )
    except StateError as exc:  # e.g. the optimizer state outgrew the cache: reported, training goes on
        message = f"snapshot at step {trainer.step} failed: {exc}; rollbacks will use older snapshots or checkpoints"
        log.error(message)
        trainer.telemetry.count("train.snapshot_failures")
        trainer.telemetry.event("train.snapshot_failed", severity="error", message=message)


def restore_after_rollback(trainer: Trainer, step: int) -> None:
    """After the safety guard rolled the model back to ``step``: the aggregator's state and the
    trainer's step follow it."""
    # The aggregator's state goes back with the model: a moving average that took in the
    # non-finite steps would otherwise carry them past the rollback.
    restore_aggregator(
        trainer.aggregator,
        trainer.generator,
        trainer.state.last_restored_extra,
        telemetry=trainer.telemetry,
        where=f"the state rolled back to (step {step})",
    )
    trainer.step = step
    trainer.telemetry.bind(step=step)
