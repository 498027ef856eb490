"""Deadline-bound rollback: fast snapshot first, else a durable checkpoint, never past the deadline.

``rollback(step, model, optimizer, deadline_s)``:

1. The fast tier: the cached snapshot with the largest step <= ``step``. It is checked against the
   model and optimizer, then copied in (a memory copy, done on the caller's thread).
2. Otherwise the durable tier: the most recently committed checkpoint of step <= ``step`` that
   verifies, read, verified and loaded into staging memory by a background worker
   (:mod:`tolaria.state.staging`) while the caller waits with a timeout.

Nothing is applied to the model or the optimizer until the staged state is complete and checked,
and nothing at all once the deadline has passed: a missed deadline leaves them exactly as they were.
A miss triggers the shared deadline signal (:class:`tolaria.signals.SharedDeadlineSignal`) with the
time and the reason, reported by the result too. A mismatched model or optimizer (including
optimizer state that will not load) gives a failed result naming the error; training never goes on
from a fresh optimizer without being told.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tolaria.signals import SharedDeadlineSignal
from tolaria.state.checkpoints import CheckpointStore
from tolaria.state.errors import StagingBusyError, StateMismatchError
from tolaria.state.reporting import report
from tolaria.state.restore import apply_restore, plan_restore
from tolaria.state.snapshots import SnapshotCache
from tolaria.state.staging import StagingWorkers
from tolaria.state.trees import clone_tree
from tolaria.telemetry import TelemetryEmitter

__all__ = ["RollbackResult", "DeadlineRollback"]


@dataclass(frozen=True)
class RollbackResult:
    """What a rollback did.

    Attributes:
        ok: True if the model and optimizer now hold the restored state.
        tier: ``"fast"`` (in-memory snapshot), ``"durable"`` (checkpoint file), or None if no
            source was found.
        step: the step restored (or being restored when it failed); None if no source was found.
        reason: what happened, in words (always set; names the error on failure).
        elapsed_s: seconds from the call to the result.
        deadline_at: the deadline, on the :func:`time.monotonic` clock (seconds).
        requested_step: the ``step`` asked for.
        deadline_missed: True if the deadline passed before the state could be applied.
        deadline_signal: name of the shared deadline signal triggered by the miss (else None).
        signal_generation: the signal's generation after the trigger (else None).
        signal_timestamp_ms: the trigger time, milliseconds on the :func:`time.monotonic` clock.
        error: type name of the exception behind a failure, if one was.
        extra: the ``extra`` state saved with the restored snapshot or checkpoint (a private copy).
    """

    ok: bool
    tier: str | None
    step: int | None
    reason: str
    elapsed_s: float
    deadline_at: float
    requested_step: int
    deadline_missed: bool = False
    deadline_signal: str | None = None
    signal_generation: int | None = None
    signal_timestamp_ms: float | None = None
    error: str | None = None
    extra: Any = None


class DeadlineRollback:
    """Runs rollbacks for a :class:`~tolaria.state.StateManager` (one at a time)."""

    def __init__(
        self,
        snapshots: SnapshotCache,
        store: CheckpointStore,
        signal: SharedDeadlineSignal | Callable[[], SharedDeadlineSignal],
        telemetry: TelemetryEmitter,
        *,
        max_abandoned_reads: int = 2,
    ):
        self.snapshots = snapshots
        self.store = store
        # The signal, or the function that makes it when first needed (the manager's own segment).
        self._signal = signal
        self.telemetry = telemetry
        self.workers = StagingWorkers(max_abandoned=max_abandoned_reads, telemetry=telemetry)
        self._lock = threading.Lock()

    @property
    def signal(self) -> SharedDeadlineSignal:
        return self._signal if isinstance(self._signal, SharedDeadlineSignal) else self._signal()

    def close(self) -> None:
        self.workers.close()

    def run(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, deadline_s: float) -> RollbackResult:
        start = time.monotonic()
        deadline_at = start + deadline_s
        outcome = _Outcome(self, start, deadline_at, step, deadline_s)
        if not self._lock.acquire(timeout=deadline_s):
            return outcome.missed(None, None, "another rollback held the state manager until the deadline")
        try:
            return self._run(step, model, optimizer, outcome)
        finally:
            self._lock.release()

    def _run(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, outcome: _Outcome) -> RollbackResult:
        snapshot = self.snapshots.nearest_at_or_before(step)
        if snapshot is not None:
            if not snapshot.packed.wait(outcome.deadline_at):
                landing = f"the device-to-host copy of the snapshot of step {snapshot.step} had not landed"
                return outcome.missed("fast", snapshot.step, landing)
            tree = snapshot.packed.unpack()
            source = f"fast snapshot of step {snapshot.step}"
            return self._apply(model, optimizer, tree, "fast", snapshot.step, source, outcome)

        entries = [e for e in self.store.entries if e.step <= step]
        if not entries:
            return outcome.failed(
                None,
                None,
                f"no snapshot or checkpoint at or before step {step} "
                f"(fast tier holds steps {self.snapshots.steps()}, durable tier holds steps "
                f"{sorted(e.step for e in self.store.entries)})",
                error=None,
            )
        newest = max(entries, key=lambda e: e.sequence)
        label = f"durable restore for a rollback to step {step} (newest candidate: step {newest.step}, {newest.file})"
        try:
            job = self.workers.submit(lambda cancel: self.store.load_newest(entries, cancel=cancel), label)
        except StagingBusyError as exc:
            return outcome.missed("durable", newest.step, str(exc))
        finished = job.done.wait(max(0.0, outcome.deadline_at - time.monotonic()))
        if not finished:
            self.workers.abandon(job)
            return outcome.missed("durable", newest.step, f"the {label} did not finish; it was abandoned and cancelled")
        if job.error is not None:
            if not isinstance(job.error, Exception):
                raise job.error
            return outcome.failed("durable", newest.step, str(job.error), error=type(job.error).__name__)
        entry, payload = job.result
        job.result = None
        return self._apply(
            model, optimizer, payload, "durable", entry.step, f"checkpoint of step {entry.step} ({entry.file})", outcome
        )

    def _apply(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: dict[str, Any],
        tier: str,
        step: int,
        source: str,
        outcome: _Outcome,
    ) -> RollbackResult:
        try:
            plan = plan_restore(model, optimizer, state, source)
        except StateMismatchError as exc:
            return outcome.failed(tier, step, str(exc), error=type(exc).__name__)
        if time.monotonic() >= outcome.deadline_at:
            return outcome.missed(
                tier, step, f"the {source} was staged and checked only after the deadline; not applied"
            )
        try:
            apply_restore(plan)
        except StateMismatchError as exc:  # the optimizer refused in load_state_dict: nothing was applied
            return outcome.failed(tier, step, str(exc), error=type(exc).__name__)
        return outcome.succeeded(tier, step, source, clone_tree(state.get("extra")))


class _Outcome:
    """Builds a :class:`RollbackResult`, reporting it (and triggering the signal on a miss)."""

    def __init__(self, owner: DeadlineRollback, start: float, deadline_at: float, requested: int, deadline_s: float):
        self.owner = owner
        self.start = start
        self.deadline_at = deadline_at
        self.requested = requested
        self.deadline_s = deadline_s

    def _result(self, ok: bool, tier: str | None, step: int | None, reason: str, **fields: Any) -> RollbackResult:
        return RollbackResult(
            ok=ok,
            tier=tier,
            step=step,
            reason=reason,
            elapsed_s=time.monotonic() - self.start,
            deadline_at=self.deadline_at,
            requested_step=self.requested,
            **fields,
        )

    def succeeded(self, tier: str, step: int, source: str, extra: Any) -> RollbackResult:
        result = self._result(True, tier, step, f"restored the {source}", extra=extra)
        telemetry = self.owner.telemetry
        telemetry.event(
            "state.rollback",
            message=result.reason,
            tier=tier,
            step=step,
            requested_step=self.requested,
            elapsed_s=result.elapsed_s,
        )
        telemetry.metric("state.rollback_s", result.elapsed_s, tier=tier)
        return result

    def failed(self, tier: str | None, step: int | None, reason: str, *, error: str | None) -> RollbackResult:
        result = self._result(False, tier, step, f"rollback to step {self.requested} failed: {reason}", error=error)
        report(
            self.owner.telemetry,
            "state.rollback_failed",
            "error",
            result.reason,
            tier=tier,
            step=step,
            requested_step=self.requested,
            error=error,
        )
        return result

    def missed(self, tier: str | None, step: int | None, reason: str) -> RollbackResult:
        now_ms = time.monotonic() * 1000.0
        text = f"rollback to step {self.requested} missed its {self.deadline_s:.3f}s deadline: {reason}"
        signal = self.owner.signal
        generation = signal.trigger(text, monotonic_ms=now_ms)
        result = self._result(
            False,
            tier,
            step,
            text,
            deadline_missed=True,
            deadline_signal=signal.name,
            signal_generation=generation,
            signal_timestamp_ms=now_ms,
        )
        report(
            self.owner.telemetry,
            "state.rollback_deadline_missed",
            "critical",
            text,
            tier=tier,
            step=step,
            requested_step=self.requested,
            deadline_s=self.deadline_s,
            elapsed_s=result.elapsed_s,
            deadline_signal=signal.name,
            signal_generation=generation,
            signal_timestamp_ms=now_ms,
        )
        return result
