"""What a failed durable checkpoint does to the run: ``[checkpoint] on_failure`` and ``max_failures``.

A checkpoint fails for reasons outside the run (a full disk, a quota, an I/O error); the store
leaves the previous checkpoints and the manifest as they were (see :mod:`tolaria.state.checkpoints`),
so training can go on with its last committed state intact. Every failure is a critical
``train.checkpoint_failed`` event, a log line, and the emergency level ELEVATED; then the policy:

- ``"retry"`` (default): the next checkpoint on the cadence is the retry; ``max_failures``
  consecutive failures escalate to HALT (the loop stops at its next halt check).
- ``"emit"``: report only; the run never halts for it.
- ``"halt"``: the first failure escalates to HALT.

A failed *final* checkpoint raises (the run's end state would be lost without a word), except when
the run is stopping because checkpoints kept failing: that one is expected to fail too, so it is
reported and the run ends "halted", its newest committed checkpoint named in the summary.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tolaria.emergency import EmergencyLevel

if TYPE_CHECKING:
    from .loop import Trainer

__all__ = ["checkpoint_failed", "checkpoint_succeeded", "consecutive_failures"]

log = logging.getLogger("tolaria.trainer")

_COUNT = "_checkpoint_failures"  # consecutive failures, kept on the trainer
_HALTED = "_halted_by_checkpoint_failures"


def consecutive_failures(trainer: Trainer) -> int:
    """Checkpoints failed in a row (0 after a success)."""
    return getattr(trainer, _COUNT, 0)


def checkpoint_failed(trainer: Trainer, message: str, *, final: bool) -> bool:
    """Reports a failed checkpoint and applies the policy; returns whether the caller must raise."""
    cfg = trainer.config.checkpoint
    failures = consecutive_failures(trainer) + 1
    setattr(trainer, _COUNT, failures)
    stopping = getattr(trainer, _HALTED, False)
    halt = not final and (cfg.on_failure == "halt" or (cfg.on_failure == "retry" and failures >= cfg.max_failures))
    if stopping and final:
        then = "the run was already halting because checkpoints kept failing"
    elif final:
        then = "the run's final state is not saved"
    elif halt:
        then = f"halting the run ({failures} consecutive failure(s); on_failure={cfg.on_failure!r})"
    elif cfg.on_failure == "retry":
        then = f"retrying at the next checkpoint ({failures} of {cfg.max_failures} consecutive failures)"
    else:
        then = f"training goes on ({failures} consecutive failure(s); on_failure='emit')"
    full = f"{message}; the previous checkpoints are unchanged; {then}"
    log.critical(full)
    trainer.telemetry.count("train.checkpoint_failures")
    trainer.telemetry.event(
        "train.checkpoint_failed",
        severity="critical",
        message=full,
        final=final,
        consecutive_failures=failures,
        on_failure=cfg.on_failure,
        halting=halt,
    )
    if final:
        return not stopping
    if halt:
        setattr(trainer, _HALTED, True)
        trainer.emergency.escalate(EmergencyLevel.HALT, f"checkpoints failing: {message}")
    else:
        trainer.emergency.escalate(EmergencyLevel.ELEVATED, message)
    return False


def checkpoint_succeeded(trainer: Trainer) -> None:
    """Ends a run of failures (reported: the retry worked)."""
    failures = consecutive_failures(trainer)
    if failures:
        setattr(trainer, _COUNT, 0)
        message = f"checkpoint at step {trainer.step} committed after {failures} failed one(s)"
        log.warning(message)
        trainer.telemetry.event("train.checkpoint_recovered", severity="warning", message=message, failures=failures)
