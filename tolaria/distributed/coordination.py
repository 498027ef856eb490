"""Decisions every rank takes together: emergency levels, checkpoints and resuming.

- :func:`agree_on_emergency` / :func:`agree_on_emergency_level`: the highest emergency level over all
  ranks, so HALT on any rank stops every rank at the same step boundary.
- :func:`checkpoint_barrier`: rank 0 writes a durable checkpoint between two barriers, and every rank
  learns whether it was committed.
- :func:`resume_from_checkpoint`: rank 0 restores the newest checkpoint and broadcasts the state, so
  every rank resumes from the same one.
- :func:`agree_on_rollback` / :func:`adopt_main_state`: whether every rank's rollback restored the
  same step, and, when not, rank 0's model, optimizer and extra state made every rank's.

A failure on one rank is raised on every rank, so no rank goes on alone and the replicas do not
diverge.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tolaria.distributed.collectives import _from_main, all_gather_json, broadcast_tree
from tolaria.distributed.context import (
    DistributedContext,
    DistributedError,
    ReplicaMismatchError,
    _allreduce_ints,
    _check_context,
)
from tolaria.distributed.replicas import verify_replicas
from tolaria.emergency import EmergencyController, EmergencyLevel, as_level
from tolaria.state import CheckpointEntry, CheckpointError, RestoredState, StateManager
from tolaria.state.manager import _check_step
from tolaria.state.restore import capture, restore
from tolaria.telemetry import TelemetryEmitter, emitter_or_default

# One logger name for the whole package, as before the split, so log filters keep matching.
log = logging.getLogger("tolaria.distributed")


# ---- emergencies -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmergencyAgreement:
    """What :func:`agree_on_emergency` found.

    Attributes:
        level: the highest level over all ranks.
        source_rank: the lowest rank at that level (None when the level is NONE).
        local_level: this rank's own level, as given.
    """

    level: EmergencyLevel
    source_rank: int | None
    local_level: EmergencyLevel

    @property
    def from_other_rank(self) -> bool:
        """Whether another rank raised the level above this rank's own."""
        return self.level > self.local_level


def agree_on_emergency(
    local_level: EmergencyLevel | int,
    ctx: DistributedContext,
    *,
    controller: EmergencyController | None = None,
    telemetry: TelemetryEmitter | None = None,
) -> EmergencyAgreement:
    """The highest emergency level over all ranks and which rank holds it (one all-reduce of one int).

    Every rank must call it at the same step boundaries. A level raised by another rank is reported
    (telemetry event ``emergency.remote_level``, critical for HALT, and a log line) and, with
    ``controller``, escalated into it, so this host's emergency signal (shared memory) carries it to
    the other processes here. The agreement only raises levels: lowering one is a decision all ranks
    take together (``controller.deescalate`` on every rank at the same step).
    """
    _check_context(ctx)
    local = as_level(local_level)
    if controller is not None and not isinstance(controller, EmergencyController):
        raise TypeError(f"controller must be an EmergencyController, got {type(controller).__name__}")
    if not ctx._live():
        return EmergencyAgreement(local, None if local == EmergencyLevel.NONE else ctx.rank, local)
    world = ctx.world_size
    # level * world + (world - 1 - rank): the max carries the highest level and the lowest rank at it.
    encoded = _allreduce_ints([int(local) * world + (world - 1 - ctx.rank)], ctx, dist.ReduceOp.MAX)[0]
    level = as_level(encoded // world)
    agreement = EmergencyAgreement(level, None if level == EmergencyLevel.NONE else world - 1 - encoded % world, local)
    if agreement.from_other_rank:
        reason = f"rank {agreement.source_rank} is at emergency level {level.name}"
        message = f"{reason}; this rank ({ctx.rank}) was at {local.name} and follows"
        log.log(logging.CRITICAL if level == EmergencyLevel.HALT else logging.WARNING, message)
        emitter_or_default(telemetry).event(
            "emergency.remote_level",
            severity="critical" if level == EmergencyLevel.HALT else "warning",
            message=message,
            level=level.name,
            local_level=local.name,
            source_rank=agreement.source_rank,
        )
        if controller is not None:
            controller.escalate(level, reason)
    return agreement


def agree_on_emergency_level(
    local_level: EmergencyLevel | int,
    ctx: DistributedContext,
    *,
    controller: EmergencyController | None = None,
    telemetry: TelemetryEmitter | None = None,
) -> EmergencyLevel:
    """The highest emergency level over all ranks (see :func:`agree_on_emergency`): HALT on any rank
    is HALT on every rank, at the same step boundary."""
    return agree_on_emergency(local_level, ctx, controller=controller, telemetry=telemetry).level


# ---- checkpoints -----------------------------------------------------------------------------------


def _agree_all_succeeded(error: BaseException | None, ctx: DistributedContext, what: str) -> None:
    """Raises on every rank if ``what`` failed on any (the failing rank re-raises its own error)."""
    failed = _allreduce_ints([ctx.rank + 1 if error is not None else 0], ctx, dist.ReduceOp.MAX)[0]
    if error is not None:
        log.error("%s failed on this rank (%d): %s: %s", what, ctx.rank, type(error).__name__, error)
        raise error
    if failed:
        raise DistributedError(
            f"{what} failed on rank {failed - 1} (see that rank's log); this rank ({ctx.rank}) "
            "stops too so the replicas do not diverge"
        )


def _check_state_argument(state: Any, ctx: DistributedContext) -> StateManager | None:
    if state is not None and not isinstance(state, StateManager):
        raise TypeError(f"state must be a StateManager (or None on ranks other than 0), got {type(state).__name__}")
    if ctx.is_main and state is None:
        raise ValueError("rank 0 writes and reads the checkpoints: it needs a StateManager, got None")
    return state


def checkpoint_barrier(
    state: StateManager | None,
    ctx: DistributedContext,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: Any = None,
    *,
    verify: bool = True,
    telemetry: TelemetryEmitter | None = None,
) -> CheckpointEntry:
    """Writes a durable checkpoint on rank 0 between two barriers; returns the committed entry on every rank.

    1. Barrier: every rank has finished the step, and all give the same ``step``; with ``verify``,
       :func:`verify_replicas` also confirms the replicas are bitwise identical (else every rank
       raises :class:`ReplicaMismatchError` and nothing is written).
    2. Rank 0 writes and commits through its ``state`` (ranks other than 0 may pass None; their own
       manager, if any, is not written to).
    3. Barrier carrying rank 0's outcome: when this returns, the checkpoint is committed, on every
       rank; if rank 0's write failed, every rank raises (rank 0 its own error, the others a
       :class:`~tolaria.state.CheckpointError` quoting it).

    The replicas are identical, so rank 0's model and optimizer stand for all of them; other ranks
    need no access to the checkpoint folder. Communication: a few small collectives (plus, with
    ``verify``, one pass over the model and an all-gather of two ints per tensor); rank 0's write time
    is spent by every rank waiting (keep ``timeout_s`` of the context above it).
    """
    _check_context(ctx)
    state = _check_state_argument(state, ctx)
    _check_step(step)
    if not ctx._live():
        assert state is not None
        return state.checkpoint(step, model, optimizer, extra=extra)
    high, negated_low = _allreduce_ints([step, -step], ctx, dist.ReduceOp.MAX)
    if high != -negated_low:
        raise ReplicaMismatchError(
            f"ranks disagree on the step to checkpoint: steps {-negated_low}..{high} "
            f"(this rank {ctx.rank} is at {step}); nothing was written"
        )
    if verify:
        verify_replicas(model, ctx)

    def write() -> dict[str, Any]:
        assert state is not None
        return asdict(state.checkpoint(step, model, optimizer, extra=extra))

    committed = CheckpointEntry.from_json(
        _from_main(write, ctx, f"write the checkpoint of step {step}", CheckpointError)
    )
    if not ctx.is_main:
        emitter_or_default(telemetry).event(
            "distributed.checkpoint_committed",
            message=f"rank 0 committed the checkpoint of step {step} ({committed.file})",
            checkpoint_step=step,
            file=committed.file,
            sequence=committed.sequence,
        )
    return committed


def resume_from_checkpoint(
    state: StateManager | None,
    ctx: DistributedContext,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    telemetry: TelemetryEmitter | None = None,
) -> RestoredState:
    """Restores the newest committed checkpoint on rank 0 and the same state on every rank.

    Rank 0 restores through ``state.restore_latest_with_extra`` (verified, all-or-nothing); then its
    model and optimizer state and the checkpoint's ``extra`` are broadcast, and every other rank
    applies them with the same checks (keys, shapes, dtypes, optimizer layout). Returns the
    :class:`~tolaria.state.RestoredState` (step, extra, file, sequence) on every rank. If rank 0 finds
    no usable checkpoint, or any rank cannot apply it, every rank raises (rank 0 / the failing rank its
    own error, the others :class:`~tolaria.state.CheckpointError` or :class:`DistributedError`).

    Communication: the model and optimizer state once (rank 0 to all), plus a few small collectives.
    """
    _check_context(ctx)
    state = _check_state_argument(state, ctx)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not ctx._live():
        assert state is not None
        return state.restore_latest_with_extra(model, optimizer)
    restored: RestoredState | None = None

    def restore_on_main() -> dict[str, Any]:
        nonlocal restored
        assert state is not None
        restored = state.restore_latest_with_extra(model, optimizer)
        return {"step": restored.step, "file": restored.file, "sequence": restored.sequence}

    outcome = _from_main(restore_on_main, ctx, "restore a checkpoint", CheckpointError)
    step, file, sequence = int(outcome["step"]), str(outcome["file"]), int(outcome["sequence"])
    payload = broadcast_tree(capture(model, optimizer, restored.extra) if restored is not None else None, ctx)
    local_error: Exception | None = None
    if not ctx.is_main:
        try:
            restore(model, optimizer, payload, f"checkpoint of step {step} ({file}) broadcast from rank 0")
        except Exception as exc:  # agreed on below, then re-raised on this rank
            local_error = exc
    _agree_all_succeeded(local_error, ctx, f"resuming from the checkpoint of step {step}")
    result = restored if restored is not None else RestoredState(step, payload["extra"], file, sequence)
    emitter_or_default(telemetry).event(
        "distributed.resumed",
        message=f"rank {ctx.rank} resumed from the checkpoint of step {step} ({file})",
        restored_step=step,
        file=file,
        sequence=sequence,
    )
    return result


# ---- rollbacks -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RollbackAgreement:
    """What :func:`agree_on_rollback` found.

    Attributes:
        restored_steps: per rank, in rank order, the step its rollback restored, or None where it
            restored nothing (it failed: its snapshot was missing, its read missed the deadline, ...).
    """

    restored_steps: tuple[int | None, ...]

    @property
    def consistent(self) -> bool:
        """Whether every rank did the same: all restored the same step, or none restored anything."""
        return len(set(self.restored_steps)) == 1

    @property
    def any_failed(self) -> bool:
        """Whether some rank restored nothing."""
        return None in self.restored_steps

    def describe(self) -> str:
        return ", ".join(
            f"rank {r} {'restored nothing' if s is None else f'restored step {s}'}"
            for r, s in enumerate(self.restored_steps)
        )


def agree_on_rollback(restored_step: int | None, ctx: DistributedContext) -> RollbackAgreement:
    """Every rank's rollback outcome, on every rank (one small all-gather; every rank must call it).

    A rollback is local (each rank restores its own snapshot, under its own deadline), so it can fail
    on one rank only, or restore another step there (a missing snapshot sends it to an older durable
    checkpoint). Taken apart, those outcomes would leave replicas that differ; see
    :func:`adopt_main_state` for the way back.
    """
    _check_context(ctx)
    if restored_step is not None:
        _check_step(restored_step)
    steps = all_gather_json(restored_step, ctx)
    return RollbackAgreement(tuple(None if s is None else int(s) for s in steps))


def adopt_main_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ctx: DistributedContext,
    *,
    extra: Any = None,
    what: str = "rank 0's state",
) -> Any:
    """Makes rank 0's model and optimizer state (and its ``extra``) every rank's; returns rank 0's
    ``extra`` on every rank.

    Rank 0's state is broadcast (no pickle) and every other rank applies it with the same checks as a
    resume; if any rank cannot, every rank raises (:class:`DistributedError`, the failing rank its own
    error). Communication: the model and optimizer state once, rank 0 to all. A single-process
    context returns ``extra``.
    """
    _check_context(ctx)
    if not ctx._live():
        return extra
    payload = broadcast_tree(capture(model, optimizer, extra) if ctx.is_main else None, ctx)
    local_error: Exception | None = None
    if not ctx.is_main:
        try:
            restore(model, optimizer, payload, f"{what}, broadcast from rank 0")
        except Exception as exc:  # agreed on below, then re-raised on this rank
            local_error = exc
    _agree_all_succeeded(local_error, ctx, f"taking {what}")
    return payload["extra"]


__all__ = [
    "EmergencyAgreement",
    "RollbackAgreement",
    "adopt_main_state",
    "agree_on_emergency",
    "agree_on_emergency_level",
    "agree_on_rollback",
    "checkpoint_barrier",
    "resume_from_checkpoint",
]
