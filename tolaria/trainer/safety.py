"""Safety: what the trainer does about non-finite values, emergencies and slow epochs.

- A step whose loss or gradient is not finite is skipped (no optimizer step); ``rollback_after``
  such steps in a row roll the model and optimizer back to the newest snapshot (``StateManager``,
  under a deadline). The first skipped step of a streak escalates to NOTICE, a rollback to ELEVATED;
  a failed rollback, or one more than ``max_rollbacks``, escalates to HALT.
- HALT (raised here, by user code through the controller, or by another process through the shared
  signal the controller writes to) stops the run cleanly: the trainer writes a final checkpoint.
- An epoch longer than ``epoch_time_budget_s`` is a ``safety.epoch_budget`` event.
- After a clean epoch, a level this guard raised (NOTICE/ELEVATED) is lowered back to NONE.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from tolaria.emergency import EmergencyController, EmergencyLevel
from tolaria.signals import SignalLayoutError
from tolaria.telemetry import TelemetryEmitter, emitter_or_default

from .config import SafetyConfig
from .gradient import SourceStats

log = logging.getLogger("tolaria.trainer.safety")

STEP, SKIP, ROLLED_BACK, HALT = "step", "skip", "rolled_back", "halt"


@dataclass(frozen=True)
class Verdict:
    """What to do with a step: ``action`` is ``"step"``, ``"skip"``, ``"rolled_back"`` or ``"halt"``.

    ``step`` is the global step restored by a rollback; ``reason`` explains a halt or a rollback.
    """

    action: str
    step: int | None = None
    reason: str | None = None


class SafetyGuard:
    """Decides, step by step, whether to apply, skip, roll back or halt; see the module docstring.

    Args:
        config: the ``[safety]`` section.
        state: the run's ``StateManager`` (its ``rollback`` is used).
        emergency: the run's ``EmergencyController``.
        rollback_deadline_s: the deadline of each rollback.
        telemetry: the emitter.
    """

    def __init__(
        self,
        config: SafetyConfig,
        state: Any,
        emergency: EmergencyController,
        *,
        rollback_deadline_s: float,
        telemetry: TelemetryEmitter | None = None,
    ):
        self.config = config
        self.state = state
        self.emergency = emergency
        self.rollback_deadline_s = rollback_deadline_s
        self.telemetry = emitter_or_default(telemetry)
        self.streak = 0
        self.skipped_steps = 0
        self.rollbacks = 0
        self.epoch_incidents = 0
        self._raised = False  # whether this guard raised the level (and may lower it again)

    def _escalate(self, level: EmergencyLevel, reason: str) -> None:
        record = self.emergency.escalate(level, reason)
        if record.changed:
            self._raised = True

    def check_step(self, stats: SourceStats, step: int, model: nn.Module, optimizer: Any) -> Verdict:
        """The verdict on a step whose gradients are in place but not yet applied."""
        if stats.finite:
            self.streak = 0
            return Verdict(STEP)
        self.streak += 1
        self.skipped_steps += 1
        self.epoch_incidents += 1
        bad = [n for n, loss, g in zip(stats.names, stats.losses, stats.norms) if not (_finite(loss) and _finite(g))]
        message = (
            f"step {step} skipped: non-finite loss or gradient in source(s) {', '.join(bad) or '(aggregate)'} "
            f"({self.streak} in a row; rollback after {self.config.rollback_after})"
        )
        log.warning(message)
        self.telemetry.count("safety.skipped_steps")
        self.telemetry.event(
            "safety.step_skipped",
            severity="warning",
            message=message,
            sources=bad,
            streak=self.streak,
            losses=dict(zip(stats.names, map(_jsonable, stats.losses))),
            norms=dict(zip(stats.names, map(_jsonable, stats.norms))),
        )
        if self.streak == 1:
            self._escalate(EmergencyLevel.NOTICE, f"non-finite values at step {step}")
        if self.streak < self.config.rollback_after:
            return Verdict(SKIP)
        return self._rollback(step, model, optimizer)

    def _rollback(self, step: int, model: nn.Module, optimizer: Any) -> Verdict:
        self.streak = 0
        if self.rollbacks >= self.config.max_rollbacks:
            reason = (
                f"non-finite values persist after {self.rollbacks} rollback(s) (max_rollbacks="
                f"{self.config.max_rollbacks}); halting"
            )
            self.telemetry.event("safety.rollback_limit", severity="critical", message=reason, rollbacks=self.rollbacks)
            self._escalate(EmergencyLevel.HALT, reason)
            return Verdict(HALT, reason=reason)
        self.rollbacks += 1
        self.telemetry.count("safety.rollbacks")
        result = self.state.rollback(step, model, optimizer, self.rollback_deadline_s)
        fields = dict(
            ok=result.ok,
            tier=result.tier,
            restored_step=result.step,
            reason=result.reason,
            elapsed_s=result.elapsed_s,
            deadline_at=result.deadline_at,
            rollback=self.rollbacks,
        )
        if result.ok:
            message = (
                f"rolled back from step {step} to step {result.step} "
                f"({result.tier} tier, {result.elapsed_s * 1e3:.1f} ms)"
            )
            log.warning(message)
            self.telemetry.event("safety.rollback", severity="warning", message=message, **fields)
            self._escalate(EmergencyLevel.ELEVATED, message)
            return Verdict(ROLLED_BACK, step=result.step, reason=message)
        reason = f"rollback from step {step} failed: {result.reason}; halting"
        log.critical(reason)
        self.telemetry.event("safety.rollback", severity="critical", message=reason, **fields)
        self._escalate(EmergencyLevel.HALT, reason)
        return Verdict(HALT, reason=reason)

    def halt_reason(self) -> str | None:
        """Why the run must stop now (the level is HALT: local or from the shared signal), or None."""
        try:
            level = self.emergency.level
            if level < EmergencyLevel.HALT:
                return None
            signal = self.emergency.signal
            reason = signal.read().reason if signal is not None else ""
        except (SignalLayoutError, RuntimeError) as exc:
            # A signal that cannot be read may be hiding a HALT (corrupted, or its writer stuck): stop
            # at this step boundary, with the last committed checkpoint intact, rather than train blind.
            reason = f"emergency signal unreadable ({type(exc).__name__}: {exc}); halting"
            log.critical(reason)
            self.telemetry.event("safety.signal_unreadable", severity="critical", message=reason)
            return reason
        return reason or "emergency level HALT"

    def check_epoch_time(self, epoch: int, elapsed_s: float) -> bool:
        """Reports an epoch over its time budget; returns whether it was over."""
        budget = self.config.epoch_time_budget_s
        if budget is None or elapsed_s <= budget:
            return False
        message = f"epoch {epoch + 1} took {elapsed_s:.2f} s, over its budget of {budget:.2f} s"
        log.warning(message)
        self.telemetry.count("safety.epoch_budget_breaches")
        self.telemetry.event(
            "safety.epoch_budget", severity="warning", message=message, elapsed_s=elapsed_s, budget_s=budget
        )
        return True

    def end_epoch(self, epoch: int) -> None:
        """After a clean epoch, lowers a NOTICE/ELEVATED level this guard raised back to NONE."""
        clean = self.epoch_incidents == 0
        self.epoch_incidents = 0
        if not (clean and self._raised):
            return
        level = self.emergency.level
        if EmergencyLevel.NONE < level <= EmergencyLevel.ELEVATED:
            self.emergency.deescalate(EmergencyLevel.NONE, f"epoch {epoch + 1} ran clean")
        self._raised = False


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


def _jsonable(x: float) -> float | str:
    return x if _finite(x) else str(x)


__all__ = ["HALT", "ROLLED_BACK", "SKIP", "STEP", "SafetyGuard", "Verdict"]
