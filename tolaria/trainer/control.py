"""The trainer's control step: consulting the policy through the mediator, and acting on it.

In one process the trainer consults the mediator and acts on its outcome directly. With several
ranks only rank 0 consults (the mediator's calls are timed, so their outcomes could differ per
rank) and broadcasts a JSON decision; every rank then applies the same decision at the same step,
so the replicas stay identical. The decision is all a rank needs: whether the mediator entered or
left its conservative mode, whether the executor changed the parameters, and the LRs now set.

The ranks also agree here on the emergency level (the highest wins) and on a step's safety verdict:
every rank must stop at the same step, and the replicas must stay identical through a rollback that
went differently on some rank (see :func:`agree_on_verdict`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tolaria.distributed import (
    DistributedError,
    adopt_main_state,
    agree_on_emergency_level,
    agree_on_rollback,
    broadcast_json,
)
from tolaria.emergency import EmergencyController, EmergencyLevel

from .gradient import SourceAccumulator
from .mediator import ControlState
from .safety import HALT, ROLLED_BACK, Verdict

if TYPE_CHECKING:
    from torch import nn

    from .loop import Trainer

__all__ = [
    "agree_on_emergency",
    "agree_on_verdict",
    "apply_conservative",
    "consult",
    "control",
    "control_distributed",
    "control_state",
    "param_ids",
    "rebuild_optimizer",
]

log = logging.getLogger("tolaria.trainer")


def control(trainer: Trainer, stats: SourceAccumulator, metrics: Mapping[str, float], elapsed_s: float) -> None:
    """One control step (a no-op without a policy)."""
    if trainer.mediator.policy is None:
        return
    if trainer.ctx.is_distributed:
        control_distributed(trainer, stats, metrics, elapsed_s)
        return
    decision = consult(trainer, stats, metrics, elapsed_s)
    apply_conservative(trainer.emergency, decision)
    if decision["params_changed"]:
        rebuild_optimizer(trainer)


def consult(
    trainer: Trainer, stats: SourceAccumulator, metrics: Mapping[str, float], elapsed_s: float
) -> dict[str, Any]:
    """Consults the mediator once; returns what changed (a JSON-able dict, broadcast by rank 0)."""
    mediator = trainer.mediator
    was_conservative, params_before = mediator.conservative, param_ids(trainer.model)
    mediator.consult(control_state(trainer, stats, metrics, elapsed_s))  # losses: all-reduced per step
    return {
        "was_conservative": was_conservative,
        "conservative": mediator.conservative,
        "reason": mediator.conservative_reason,
        "params_changed": param_ids(trainer.model) != params_before,
        "lrs": [float(g["lr"]) for g in trainer.optimizer.param_groups],
    }


def apply_conservative(emergency: EmergencyController, decision: Mapping[str, Any], where: str = "") -> None:
    """Enters or leaves the conservative emergency level as the mediator did (``where``: " on rank 0")."""
    if decision["conservative"] and not decision["was_conservative"]:
        emergency.escalate(EmergencyLevel.CONSERVATIVE, f"control calls failing{where}: {decision['reason']}")
    elif (
        decision["was_conservative"] and not decision["conservative"] and emergency.level == EmergencyLevel.CONSERVATIVE
    ):
        emergency.deescalate(EmergencyLevel.NONE, f"control calls succeed again{where}")


def control_state(
    trainer: Trainer, stats: SourceAccumulator, metrics: Mapping[str, float], elapsed_s: float
) -> ControlState:
    """What the policy sees: the run's position, losses, metrics, LRs and emergency level."""
    lr = trainer.lr
    # Before the first step the controller has set no LR yet: the policy sees the optimizer's.
    lrs = (
        tuple(lr.get_last_lr()) if lr.last_step is not None else tuple(g["lr"] for g in trainer.optimizer.param_groups)
    )
    return ControlState(
        epoch=trainer.epoch,
        step=trainer.step,
        losses=dict(stats.losses),
        metrics=dict(metrics),
        lr=lrs,
        conflict_rate=stats.conflict_rate,
        emergency_level=trainer.emergency.level.name,
        conservative=trainer.mediator.conservative,
        elapsed_s=elapsed_s,
    )


def control_distributed(
    trainer: Trainer, stats: SourceAccumulator, metrics: Mapping[str, float], elapsed_s: float
) -> None:
    """Rank 0 consults the mediator (its calls are timed, so outcomes could differ per rank) and
    broadcasts the outcome; every rank then takes the same decisions at the same step."""
    ctx = trainer.ctx
    decision: dict[str, Any] | None = None
    if ctx.is_main:
        decision = consult(trainer, stats, metrics, elapsed_s)
    decision = broadcast_json(decision, ctx)
    optimizer = trainer.optimizer
    if decision["params_changed"]:
        raise DistributedError(
            "the control executor changed the model's parameters on rank 0; grafting modules is not supported "
            "with several ranks (the other ranks' replicas would differ); stopping every rank"
        )
    if len(decision["lrs"]) != len(optimizer.param_groups):
        raise DistributedError(
            f"rank 0 has {len(decision['lrs'])} param groups, rank {ctx.rank} has {len(optimizer.param_groups)}"
        )
    for group, lr in zip(optimizer.param_groups, decision["lrs"]):
        group["lr"] = lr  # an LR a command set on rank 0 holds everywhere
    apply_conservative(trainer.emergency, decision, where=" on rank 0")


def param_ids(model: nn.Module) -> tuple[int, ...]:
    """The identities of the trainable parameters: they change when an executor grafts modules."""
    return tuple(id(p) for p in model.parameters() if p.requires_grad)


def rebuild_optimizer(trainer: Trainer) -> None:
    """After the executor changed the parameters: a new optimizer, LR controller and gradient stage
    on the new parameter set. A failed rebuild halts the run (final checkpoint, status "halted"):
    going on with the old optimizer would leave the new parameters untrained while reporting success."""
    result = trainer.optim.rebuild(trainer.model)
    if not result.success:
        message = (
            f"the model's parameters changed but the optimizer rebuild failed: {result.error}; the new "
            "parameters would never train, so the run halts"
        )
        log.critical(message)
        trainer.telemetry.event("train.rebuild_failed", severity="critical", message=message)
        trainer.emergency.escalate(EmergencyLevel.HALT, message)
        return
    trainer.lr.attach(trainer.optim.optimizer)
    trainer.stage.rebind(trainer.model)
    trainer._confirm_rebuild = True  # the next step tells the breaker whether the rebuild really worked
    # Through the trainer (not checkpointing.snapshot): the trainer's method is what tests replace.
    trainer._snapshot()  # older snapshots hold the old parameter set; give rollbacks a matching target
    trainer.telemetry.event(
        "train.rebuilt",
        message=f"parameters changed: optimizer rebuilt (+{result.added} / -{result.removed})",
        added=result.added,
        removed=result.removed,
    )


def agree_on_emergency(trainer: Trainer) -> None:
    """The highest emergency level over the ranks becomes this rank's (no-op in one process)."""
    if trainer.ctx.is_distributed:
        agree_on_emergency_level(
            trainer.emergency.level, trainer.ctx, controller=trainer.emergency, telemetry=trainer.telemetry
        )


def agree_on_verdict(trainer: Trainer, verdict: Verdict) -> Verdict:
    """The step's safety verdict, the same on every rank, with identical replicas (``verdict`` itself
    in one process).

    The stats are identical on every rank, so every rank reaches the same verdict, except for a
    rollback: it is local (each rank's own snapshot, its own deadline), so one rank's can fail (its
    snapshot missing, its read stalled past the deadline) or restore another step (a missing snapshot
    sends it to an older durable checkpoint). The ranks compare what their rollbacks restored; when
    they differ, **rank 0's state wins**: its model, optimizer and aggregator state are broadcast and
    every rank takes them, so the replicas never differ. Then:

    - every rank's rollback restored something (only the steps differ): every rank goes on from rank
      0's restored step, as after any rollback;
    - a rollback failed on some rank: every rank halts, from identical replicas (rank 0's restored
      state, or its untouched one if its own rollback failed), so the final checkpoint is written and
      the committed ones stay as they are.

    With ``sharding = "fsdp"`` each rank holds its own shard, so rank 0's state is not the others':
    on a disagreement every rank halts and no checkpoint is written from the shards, which now
    belong to different steps; the newest committed checkpoint stays the run's last common state.
    """
    ctx = trainer.ctx
    if not ctx.is_distributed or verdict.action not in (ROLLED_BACK, HALT):
        return verdict
    agreement = agree_on_rollback(verdict.step if verdict.action == ROLLED_BACK else None, ctx)
    if agreement.consistent:
        return verdict
    if trainer.config.distributed.sharding == "fsdp":
        reason = (
            f"the ranks' rollbacks differ ({agreement.describe()}) and each rank holds its own shard, so no "
            "rank's state can stand for the others': every rank halts, and no checkpoint is written from shards "
            "of different steps"
        )
        log.critical(reason)
        trainer.telemetry.event(
            "distributed.rollback_disagreed",
            severity="critical",
            message=reason,
            restored_steps=list(agreement.restored_steps),
            halting=True,
        )
        trainer._state_split = reason
        trainer.emergency.escalate(EmergencyLevel.HALT, reason)
        return type(verdict)(HALT, reason=reason)
    main_step = agreement.restored_steps[0]
    # Rank 0 sends the aggregator state it restored; if it restored nothing, every rank's aggregator
    # is still the same (the loop restores it only after this agreement), so none travels.
    sent = trainer.state.last_restored_extra if ctx.is_main and main_step is not None else None
    extra = adopt_main_state(
        trainer.model, trainer.optimizer, ctx, extra=sent, what=f"rank 0's state after its rollback ({verdict.action})"
    )
    if main_step is not None:
        trainer.state.last_restored_step, trainer.state.last_restored_extra = main_step, extra
    halting = agreement.any_failed
    reason = f"the ranks' rollbacks differ ({agreement.describe()}): every rank took rank 0's state" + (
        "; a rollback failed, so every rank halts" if halting else f" and goes on from step {main_step}"
    )
    log.log(logging.CRITICAL if halting else logging.WARNING, reason)
    trainer.telemetry.event(
        "distributed.rollback_disagreed",
        severity="critical" if halting else "warning",
        message=reason,
        restored_steps=list(agreement.restored_steps),
        halting=halting,
    )
    if halting:
        trainer.emergency.escalate(EmergencyLevel.HALT, reason)
    if main_step is not None:
        # Rank 0's rollback is every rank's; a halt then stops the run at the next check, before any step.
        return type(verdict)(ROLLED_BACK, step=main_step, reason=reason)
    return type(verdict)(HALT, reason=reason)
