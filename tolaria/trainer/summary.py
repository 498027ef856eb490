"""``RunSummary``: what a finished run reports (status, steps, losses, metrics, conflict rate)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["COMPLETED", "HALTED", "INTERRUPTED", "MAX_STEPS", "RunSummary"]

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
        rows.append(
            ("conflict rate", "n/a (one source)" if self.conflict_rate is None else f"{self.conflict_rate:.3f}")
        )
        rows.append(("skipped steps / rollbacks", f"{self.skipped_steps} / {self.rollbacks}"))
        rows.append(("control failures", str(self.control_failures)))
        rows.append(("time", f"{self.wall_time_s:.1f} s"))
        rows.append(("run folder", str(self.run_dir)))
        width = max(len(k) for k, _ in rows)
        rule = "-" * (width + 3 + max(len(v) for _, v in rows))
        return "\n".join([rule, *(f"{k.ljust(width)} | {v}" for k, v in rows), rule])
