"""The control mediator: policy and executor calls on one long-lived worker, each under a timeout.

A *policy* looks at a :class:`ControlState` and returns commands (``policy.evaluate(state)``); an
*executor* carries a command out (``executor.apply(command)``). Both are user code that may be slow,
hang or raise, so the training loop never calls them directly. The mediator runs each call on one
long-lived daemon worker thread and waits at most ``timeout_s`` for it:

- A call that times out is abandoned together with its worker (a Python thread cannot be killed);
  the next call gets a fresh worker. Up to ``max_abandoned`` hung workers are replaced that way; with
  more still hung, calls are refused (and reported) until one of them finishes. Workers are daemons, and shutdown
  never joins a hung one, so a hung call never holds the loop beyond its timeout nor blocks exit.
- A timeout, an error, or a refused call is a telemetry event and a log line, counts toward a circuit
  breaker, and moves the mediator into *conservative mode*: commands are withheld (reported, not
  applied) until calls succeed again (``recovery_calls`` successful evaluations whose commands are
  withheld, then normal operation).
- The circuit breaker opens after ``failure_threshold`` consecutive failures and refuses calls for
  ``cooldown_s``; then one probe call is let through (half-open) and its outcome closes or reopens it.

A call that declares a ``cancel`` parameter gets a :class:`~.isolation.CancellationToken`, set when
it times out, so that it can stop; with ``policy_isolation="process"`` the policy runs in a child
process that is killed on a timeout (see :mod:`.isolation`). Otherwise an abandoned call keeps
running in its thread until it returns; its result is discarded (and
reported), but whatever it already did cannot be undone. Executors that change the model should
therefore prepare their change first and apply it in one final, quick operation. The policy only
ever sees a :class:`ControlState` of plain values, never live tensors.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from tolaria.optim import CircuitBreaker
from tolaria.telemetry import TelemetryEmitter, emitter_or_default

from .isolation import CancellationToken, PolicyProcess, accepts_cancel

log = logging.getLogger("tolaria.trainer.mediator")


@dataclass(frozen=True)
class ControlState:
    """What a policy sees: a read-only summary of the run (plain values, never live tensors).

    Attributes:
        epoch: the current epoch (0-based).
        step: global optimizer steps taken.
        losses: mean loss per gradient source over the epoch (or since the last consultation).
        metrics: evaluation metrics of the last epoch end, if any.
        lr: the current learning rate of each param group.
        conflict_rate: conflicting projections per source pair per step (None for a single source).
        emergency_level: the emergency controller's level, by name.
        conservative: whether the mediator is in conservative mode.
        elapsed_s: seconds since the run started.
    """

    epoch: int
    step: int
    losses: Mapping[str, float]
    metrics: Mapping[str, float]
    lr: tuple[float, ...]
    conflict_rate: float | None
    emergency_level: str
    conservative: bool
    elapsed_s: float


@runtime_checkable
class Policy(Protocol):
    """Decides what to do: ``evaluate(state) -> commands`` (an iterable; empty for "nothing").

    An ``evaluate(state, *, cancel)`` is passed a :class:`~.isolation.CancellationToken` (set on a timeout)."""

    def evaluate(self, state: ControlState) -> Iterable[Any]: ...


@runtime_checkable
class Executor(Protocol):
    """Carries out one command: ``apply(command)``; the return value is reported, not interpreted.

    An ``apply(command, *, cancel)`` is passed a :class:`~.isolation.CancellationToken` (set on a timeout)."""

    def apply(self, command: Any) -> Any: ...


@dataclass(frozen=True)
class CallOutcome:
    """How one mediated call ended."""

    ok: bool
    value: Any = None
    error: str | None = None
    timed_out: bool = False
    refused: bool = False
    elapsed_s: float = 0.0


@dataclass
class ControlReport:
    """What one control round did."""

    evaluated: bool = False
    applied: list[Any] = field(default_factory=list)
    withheld: list[Any] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    skipped: str | None = None
    conservative: bool = False


class _Job:
    def __init__(self, name: str, fn: Callable[..., Any], args: tuple[Any, ...]):
        self.name = name
        self.fn = fn
        self.args = args
        self.token = CancellationToken()
        self.cooperative = accepts_cancel(fn)  # it declares ``cancel``: it gets the token
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.finished: float | None = None

    def run(self) -> None:
        try:
            self.value = self.fn(*self.args, cancel=self.token) if self.cooperative else self.fn(*self.args)
        except BaseException as exc:  # handed to the waiting caller, who reports it
            self.error = exc
        finally:
            self.finished = time.monotonic()
            self.done.set()


class _Worker:
    """One daemon thread running jobs one at a time, until told to stop."""

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"tolaria-control-{next(self._ids)}", daemon=True)
        self.thread.start()

    def submit(self, job: _Job) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        """Asks the thread to exit after its current job (never waits for it)."""
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            job.run()

    def alive(self) -> bool:
        return self.thread.is_alive()


class ControlMediator:
    """Runs ``policy.evaluate`` and ``executor.apply`` with timeouts; see the module docstring.

    Args:
        policy: the policy, or None (rounds then do nothing).
        executor: carries out commands; a command arriving with no executor is a reported failure.
        timeout_s: per-call timeout.
        failure_threshold, cooldown_s: the circuit breaker's.
        recovery_calls: successful evaluations whose commands are withheld before conservative mode
            ends (0: the first successful call ends it and its commands are applied).
        max_abandoned: hung workers that may be abandoned and replaced; with more still hung, calls
            are refused (reported) until one finishes. So at most ``max_abandoned + 1`` threads hang.
        policy_isolation: ``"thread"`` (default: the policy runs on the worker thread) or
            ``"process"`` (in a child process, killed on a timeout; see :mod:`.isolation`).
        telemetry: the emitter for ``control.*`` events and metrics.
    """

    def __init__(
        self,
        policy: Policy | None,
        executor: Executor | None = None,
        *,
        timeout_s: float = 5.0,
        failure_threshold: int = 3,
        cooldown_s: float = 30.0,
        recovery_calls: int = 1,
        max_abandoned: int = 2,
        policy_isolation: str = "thread",
        telemetry: TelemetryEmitter | None = None,
    ):
        if policy is not None and not callable(getattr(policy, "evaluate", None)):
            raise TypeError(f"policy {type(policy).__name__} has no evaluate(state) method")
        if executor is not None and not callable(getattr(executor, "apply", None)):
            raise TypeError(f"executor {type(executor).__name__} has no apply(command) method")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if recovery_calls < 0 or max_abandoned < 0:
            raise ValueError(f"recovery_calls and max_abandoned must be >= 0, got {recovery_calls}, {max_abandoned}")
        if policy_isolation not in ("thread", "process"):
            raise ValueError(f'policy_isolation must be "thread" or "process", got {policy_isolation!r}')
        self.policy = policy
        self.executor = executor
        self.timeout_s = float(timeout_s)
        self.recovery_calls = recovery_calls
        self.max_abandoned = max_abandoned
        self.telemetry = emitter_or_default(telemetry)
        self.breaker = CircuitBreaker(failure_threshold, cooldown_s, on_transition=self._on_breaker)
        self.conservative = False
        self.conservative_reason: str | None = None
        self._withheld_calls = 0
        self._worker: _Worker | None = None
        self._abandoned: list[tuple[_Worker, _Job]] = []
        self._refusing = False
        self._closed = False
        self.calls = 0
        self.failures = 0
        # Started now, so that its start-up overlaps training rather than the first call.
        self.policy_process = PolicyProcess(policy) if policy is not None and policy_isolation == "process" else None

    def _on_breaker(self, old: str, new: str) -> None:
        severity = "warning" if new == "open" else "info"
        message = f"control circuit breaker {old} -> {new}"
        (log.warning if new == "open" else log.info)(message)
        self.telemetry.event("control.breaker", severity=severity, message=message, previous=old, state=new)

    # ---- one call ------------------------------------------------------------------------------

    def call(self, name: str, fn: Callable[..., Any], *args: Any) -> CallOutcome:
        """Runs ``fn(*args)`` on the worker; returns within ``timeout_s`` whatever ``fn`` does."""
        if self._closed:
            raise RuntimeError(f"control mediator is closed; cannot run {name}")
        self._reap()
        if self._worker is None:
            hung = len(self._abandoned)
            if hung > self.max_abandoned:
                return self._refuse(name, hung)
            self._worker = _Worker()
        if self._refusing:
            self._refusing = False
            self.telemetry.event(
                "control.resumed",
                message="hung control calls finished; control calls run again",
                abandoned_alive=len(self._abandoned),
            )
        self.calls += 1
        job = _Job(name, fn, args)
        self._worker.submit(job)
        finished = job.done.wait(self.timeout_s)
        elapsed = time.monotonic() - job.started
        self.telemetry.metric("control.latency_s", elapsed, call=name, timed_out=not finished)
        if not finished:
            job.token.cancel(f"{name} timed out after {self.timeout_s:g} s")
            worker = self._worker
            worker.stop()  # it exits once the hung call returns, if ever
            self._abandoned.append((worker, job))
            self._worker = None
            self.telemetry.count("control.abandoned_workers")
            return CallOutcome(
                ok=False,
                timed_out=True,
                elapsed_s=elapsed,
                error=f"{name} did not return within {self.timeout_s:g} s; its worker thread was abandoned"
                + (" (its cancel token is set)" if job.cooperative else ""),
            )
        if job.error is not None:
            return CallOutcome(
                ok=False, elapsed_s=elapsed, error=f"{name} raised {type(job.error).__name__}: {job.error}"
            )
        return CallOutcome(ok=True, value=job.value, elapsed_s=elapsed)

    def _call_isolated(self, state: ControlState) -> CallOutcome:
        """``policy.evaluate(state)`` in the policy's child process; a timeout kills the process."""
        assert self.policy_process is not None
        if self._closed:
            raise RuntimeError("control mediator is closed; cannot run policy.evaluate")
        self.calls += 1
        started = time.monotonic()
        result = self.policy_process.evaluate(state, self.timeout_s)
        elapsed = time.monotonic() - started
        self.telemetry.metric("control.latency_s", elapsed, call="policy.evaluate", timed_out=result.kind == "timeout")
        if result.kind == "ok":
            return CallOutcome(ok=True, value=result.value, elapsed_s=elapsed)
        error = f"policy.evaluate {result.error}"
        if result.kind != "raised":  # the process was killed (timeout) or died: a fresh one is starting
            self.telemetry.count("control.killed_processes" if result.kind == "timeout" else "control.died_processes")
            self.telemetry.event(f"control.policy_{result.kind}", severity="warning", message=error, pid=result.pid)
        return CallOutcome(ok=False, timed_out=result.kind == "timeout", elapsed_s=elapsed, error=error)

    def _refuse(self, name: str, hung: int) -> CallOutcome:
        if not self._refusing:
            self._refusing = True
            msg = (
                f"{hung} hung control worker(s) still running (at most {self.max_abandoned} are replaced); "
                "control calls are refused until one finishes"
            )
            self.telemetry.event("control.disabled", severity="error", message=msg, abandoned_alive=hung)
            log.error(msg)
        self.telemetry.count("control.refused")
        return CallOutcome(ok=False, refused=True, error=f"{name} refused: {hung} hung control worker(s) still running")

    def _reap(self) -> None:
        """Reports abandoned calls that have finished since, and forgets their workers."""
        still = []
        for worker, job in self._abandoned:
            if job.done.is_set() and not worker.alive():
                assert job.finished is not None
                self.telemetry.event(
                    "control.abandoned_call_finished",
                    severity="warning",
                    message=f"abandoned {job.name} call returned after {job.finished - job.started:.2f} s; "
                    "its result was discarded",
                    call=job.name,
                    cooperative=job.cooperative,
                    duration_s=job.finished - job.started,
                    error=None if job.error is None else f"{type(job.error).__name__}: {job.error}",
                )
            else:
                still.append((worker, job))
        self._abandoned = still

    @property
    def abandoned_alive(self) -> int:
        """Hung workers still running."""
        self._reap()
        return len(self._abandoned)

    # ---- a control round ---------------------------------------------------------------------

    def consult(self, state: ControlState) -> ControlReport:
        """One round: evaluate the policy, then apply its commands (unless conservative)."""
        report = ControlReport(conservative=self.conservative)
        if self.policy is None:
            report.skipped = "no policy"
            return report
        if not self.breaker.allow():
            report.skipped = f"circuit breaker open ({self.breaker.consecutive_failures} consecutive failures)"
            self.telemetry.count("control.skipped")
            self.telemetry.event(
                "control.skipped", severity="warning", message=report.skipped, breaker=self.breaker.state
            )
            return report
        if self.policy_process is not None:
            outcome = self._call_isolated(state)
        else:
            outcome = self.call("policy.evaluate", self.policy.evaluate, state)
        if not outcome.ok:
            self._failure("policy.evaluate", outcome, report)
            return report
        try:
            commands = _as_commands(outcome.value)
        except TypeError as exc:
            self._failure("policy.evaluate", CallOutcome(ok=False, error=str(exc), elapsed_s=outcome.elapsed_s), report)
            return report
        self._success()
        report.evaluated = True
        if self.conservative:
            if self._withheld_calls < self.recovery_calls:
                self._withhold(commands, report, "conservative mode: a successful probe call's commands are withheld")
                self._withheld_calls += 1
                if self._withheld_calls >= self.recovery_calls:
                    self._recover()
                report.conservative = self.conservative
                return report
            self._recover()
        for i, command in enumerate(commands):
            if self.executor is None:
                outcome = CallOutcome(
                    ok=False, error=f"policy returned command {_describe(command)} but no executor was given"
                )
            else:
                outcome = self.call("executor.apply", self.executor.apply, command)
            if not outcome.ok:
                self._failure("executor.apply", outcome, report, command=command)
                self._withhold(commands[i + 1 :], report, "conservative mode after a failed apply")
                break
            self._success()
            report.applied.append(command)
            self.telemetry.event(
                "control.applied",
                message=f"applied {_describe(command)}",
                command=_describe(command),
                result=_describe(outcome.value),
                latency_s=outcome.elapsed_s,
            )
        report.conservative = self.conservative
        return report

    def _success(self) -> None:
        self.breaker.record_success()

    def _failure(self, call: str, outcome: CallOutcome, report: ControlReport, command: Any = None) -> None:
        self.failures += 1
        self.breaker.record_failure()
        kind = "control.timeout" if outcome.timed_out else "control.refused" if outcome.refused else "control.error"
        assert outcome.error is not None
        report.failures.append(outcome.error)
        self.telemetry.count(kind)
        self.telemetry.event(
            kind,
            severity="error",
            message=outcome.error,
            call=call,
            latency_s=outcome.elapsed_s,
            command=None if command is None else _describe(command),
            breaker=self.breaker.state,
            consecutive_failures=self.breaker.consecutive_failures,
        )
        log.error("control %s failed: %s", call, outcome.error)
        if not self.conservative:
            self.conservative = True
            self.conservative_reason = outcome.error
            self.telemetry.event(
                "control.conservative",
                severity="warning",
                message=f"conservative mode: no new commands until control calls succeed again ({outcome.error})",
            )
        self._withheld_calls = 0
        report.conservative = True

    def _withhold(self, commands: list[Any], report: ControlReport, why: str) -> None:
        if not commands:
            return
        report.withheld.extend(commands)
        log.warning("%d control command(s) withheld: %s", len(commands), why)
        self.telemetry.count("control.withheld", len(commands))
        self.telemetry.event(
            "control.withheld",
            severity="warning",
            message=f"{len(commands)} command(s) withheld: {why}",
            commands=[_describe(c) for c in commands],
        )

    def _recover(self) -> None:
        self.conservative = False
        log.info("control calls succeed again; conservative mode ended")
        self.telemetry.event(
            "control.recovered",
            message="control calls succeed again; conservative mode ended",
            after=self.conservative_reason,
        )
        self.conservative_reason = None

    # ---- shutdown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stops the worker without waiting on a hung call; hung workers left behind are reported."""
        if self._closed:
            return
        self._closed = True
        if self.policy_process is not None:
            self.policy_process.close()
        if self._worker is not None:
            self._worker.stop()
            self._worker.thread.join(timeout=min(1.0, self.timeout_s))  # idle: returns at once
            self._worker = None
        self._reap()
        if self._abandoned:
            msg = (
                f"{len(self._abandoned)} hung control call(s) still running at shutdown; left behind as daemon threads"
            )
            self.telemetry.event(
                "control.hung_at_shutdown",
                severity="warning",
                message=msg,
                calls=[job.name for _, job in self._abandoned],
            )
            log.warning(msg)

    def __enter__(self) -> ControlMediator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_commands(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"policy.evaluate must return an iterable of commands (or None), got {type(value).__name__}")
    return list(value)


def _describe(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "CallOutcome",
    "ControlMediator",
    "ControlReport",
    "ControlState",
    "Executor",
    "Policy",
]
