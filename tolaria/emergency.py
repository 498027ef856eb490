"""The controller that raises and lowers the emergency level, and its broadcast queue.

The level says how careful training must be, from :attr:`EmergencyLevel.NONE` to
:attr:`EmergencyLevel.HALT`. An :class:`EmergencyController` owns the transitions:

- ``escalate(level, reason)`` raises the level; a level at or below the current one is a no-op that
  is still reported (returned record, telemetry, log).
- ``deescalate(level, reason)`` lowers it explicitly (to NONE: the signal is cleared).
- Each call returns an :class:`Escalation` record. The new level is written to the controller's
  signal (a :class:`~tolaria.signals.SharedEmergencySignal` reaches every process on the host; a
  :class:`LocalEmergencySignal` stays in this process), then handed to the broadcaster.
- A broadcaster that raises is recorded on the record's ``error``, logged and counted in telemetry.
- At most ``max_broadcasts_per_min`` broadcasts go out per rolling minute; later ones wait in a
  queue, in order, and go out when the window allows: at the next ``escalate``/``deescalate`` or an
  explicit :meth:`EmergencyController.flush_pending`. Nothing is dropped.

The levels (:class:`EmergencyLevel`, :func:`as_level`) and both signals live in
:mod:`tolaria.signals`, beside the shared-memory signal they mirror; they are re-exported here, so
``from tolaria.emergency import EmergencyLevel, LocalEmergencySignal`` keeps working.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tolaria._validation import check_timeout
from tolaria.signals import EmergencyLevel, LocalEmergencySignal, SignalState, as_level
from tolaria.telemetry import TelemetryEmitter, emitter_or_default

__all__ = [
    "BROADCAST_WINDOW_S",
    "Broadcaster",
    "EmergencyController",
    "EmergencyLevel",
    "EmergencySignal",
    "Escalation",
    "LocalEmergencySignal",
    "as_level",
]

log = logging.getLogger("tolaria.emergency")

BROADCAST_WINDOW_S = 60.0


class EmergencySignal(Protocol):
    """What the controller needs from a signal; both signal classes provide it."""

    def raise_level(self, level: int, reason: str, monotonic_ms: float | None = None) -> int | None: ...

    def lower_level(
        self, from_level: int, to_level: int, reason: str, monotonic_ms: float | None = None
    ) -> int | None: ...

    def trigger(self, level: int, reason: str, monotonic_ms: float | None = None) -> int: ...

    def clear(self) -> int: ...

    def read(self) -> SignalState: ...


@dataclass
class Escalation:
    """What one ``escalate``/``deescalate`` call did.

    Attributes:
        action: ``"escalate"`` or ``"deescalate"``.
        level: the level asked for.
        previous_level: the level before the call.
        reason: the reason given.
        changed: whether the level changed (False: a reported no-op; nothing written or broadcast).
        broadcasted: whether the broadcaster accepted it (False while deferred by the rate cap, when
            it failed, or when there is no broadcaster).
        error: the exception the broadcaster raised, if it did.
        deferred: whether the rate cap queued the broadcast (it goes out later; see
            ``broadcast_delay``).
        latency: seconds from the call until the level was written to the signal and broadcast (or
            queued).
        broadcast_delay: seconds from the call until the broadcast was attempted; None until then.
        monotonic_ms: when the call was made (``time.monotonic``, milliseconds); the signal's timestamp.
        signal_generation: the signal's generation after the write, when one was made.
        signal_error: the exception the signal raised on read or write, if it did (the controller
            then goes on with its last known level, and still broadcasts).
    """

    action: str
    level: EmergencyLevel
    previous_level: EmergencyLevel
    reason: str
    changed: bool
    monotonic_ms: float
    broadcasted: bool = False
    error: BaseException | None = None
    deferred: bool = False
    latency: float = 0.0
    broadcast_delay: float | None = None
    signal_generation: int | None = None
    signal_error: BaseException | None = None


Broadcaster = Callable[[Escalation], None]


class EmergencyController:
    """Raises and lowers the emergency level, writes it to a signal and broadcasts every change.

    Args:
        broadcaster: called with each level change's :class:`Escalation` (e.g. to publish it to other
            hosts). May raise: the error is recorded on the record, logged and counted.
        signal: where the level lives. With a signal, the signal is the source of truth: another
            process's trigger is seen here, and ``escalate`` raises the level atomically
            (``raise_level``), so concurrent escalations never lower it. Without one, the
            controller keeps the level itself.
        max_broadcasts_per_min: broadcasts per rolling 60 s window; the rest wait in order.
        telemetry: the emitter for events and counters.
        clock: seconds, monotonic; injectable for tests.
        sleep: waits a number of seconds (``close`` waits for room under the cap); injectable for tests.

    Call :meth:`close` before the process ends: it sends the broadcasts still waiting under the cap
    (waiting for room up to a timeout) and reports any it could not send.
    """

    def __init__(
        self,
        broadcaster: Broadcaster | None = None,
        signal: EmergencySignal | None = None,
        max_broadcasts_per_min: int = 30,
        telemetry: TelemetryEmitter | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if isinstance(max_broadcasts_per_min, bool) or not isinstance(max_broadcasts_per_min, numbers.Integral):
            raise ValueError(f"max_broadcasts_per_min must be a positive int, got {max_broadcasts_per_min!r}")
        if max_broadcasts_per_min < 1:
            raise ValueError(f"max_broadcasts_per_min must be a positive int, got {max_broadcasts_per_min}")
        self.broadcaster = broadcaster
        self.signal = signal
        self.max_broadcasts_per_min = int(max_broadcasts_per_min)
        self.telemetry = emitter_or_default(telemetry)
        self._clock = clock
        self._sleep = sleep
        # Without a signal: the level. With one: the last level read or written, used when the
        # signal cannot be read.
        self._level = EmergencyLevel.NONE
        self._sent_at: deque[float] = deque()  # clock times of broadcasts in the current window
        self._pending: deque[tuple[Escalation, float]] = deque()  # (record, clock time of its call)
        self._lock = threading.RLock()

    # ---- state -----------------------------------------------------------------------------------

    @property
    def level(self) -> EmergencyLevel:
        """The current level (the signal's, when there is one)."""
        if self.signal is not None:
            return EmergencyLevel(self.signal.read().level)
        return self._level

    @property
    def pending(self) -> tuple[Escalation, ...]:
        """Broadcasts waiting for room under the per-minute cap, oldest first."""
        with self._lock:
            return tuple(record for record, _ in self._pending)

    # ---- transitions -----------------------------------------------------------------------------

    def escalate(self, level: int, reason: str) -> Escalation:
        """Raises the level to ``level``; a level at or below the current one is a reported no-op."""
        return self._transition("escalate", as_level(level), reason)

    def deescalate(self, level: int, reason: str) -> Escalation:
        """Lowers the level to ``level`` (to NONE: clears the signal); a level at or above the current
        one is a reported no-op."""
        return self._transition("deescalate", as_level(level), reason)

    def _transition(self, action: str, target: EmergencyLevel, reason: str) -> Escalation:
        if not isinstance(reason, str):
            raise TypeError(f"{action} reason must be a str, got {type(reason).__name__}")
        with self._lock:
            started = self._clock()
            record = Escalation(
                action, target, EmergencyLevel.NONE, reason, changed=False, monotonic_ms=time.monotonic() * 1e3
            )
            record.previous_level = self._known_level(record)
            raising = action == "escalate"
            if (target <= record.previous_level) if raising else (target >= record.previous_level):
                return self._noop(record, started)
            if self.signal is not None:
                signal = self.signal
                if raising:
                    write = lambda: signal.raise_level(target, reason, record.monotonic_ms)  # noqa: E731
                else:  # only from the level just read: an escalation elsewhere is never undone
                    previous = record.previous_level
                    write = lambda: signal.lower_level(previous, target, reason, record.monotonic_ms)  # noqa: E731
                generation = self._signal_call(record, "write", write)
                if record.signal_error is None and generation is None:
                    # Another process changed the level in the meantime (raised it at least this
                    # far, or moved it before this lowering): nothing is written over it.
                    read_before = record.previous_level
                    record.previous_level = self._known_level(record)
                    return self._noop(record, started, changed_from=None if raising else read_before)
                record.signal_generation = generation
            self._level = target
            record.changed = True
            # The level is in the signal first; only then do older broadcasts waiting under the
            # cap go out (a slow broadcaster must never delay a HALT from reaching the signal).
            self.flush_pending()
            return self._finish(record, started)

    def _known_level(self, record: Escalation) -> EmergencyLevel:
        """The signal's level (remembered), or the last known one when the signal cannot be read."""
        if self.signal is not None:
            state = self._signal_call(record, "read", self.signal.read)
            if record.signal_error is None:
                self._level = EmergencyLevel(state.level)
        return self._level

    def _noop(self, record: Escalation, started: float, changed_from: EmergencyLevel | None = None) -> Escalation:
        if changed_from is not None:
            message = (
                f"{record.action} to {record.level.name} ignored: the level moved from {changed_from.name} to "
                f"{record.previous_level.name} in another writer meanwhile, and is not overwritten ({record.reason})"
            )
        else:
            relation = "not above" if record.action == "escalate" else "not below"
            message = (
                f"{record.action} to {record.level.name} ignored: {relation} the current level "
                f"{record.previous_level.name} ({record.reason})"
            )
        log.info(message)
        self.telemetry.event(
            "emergency.noop",
            severity="info",
            message=message,
            action=record.action,
            level=record.level.name,
            current_level=record.previous_level.name,
            reason=record.reason,
        )
        self.telemetry.count("emergency.noops")
        record.latency = self._clock() - started
        return record

    def _signal_call(self, record: Escalation, op: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as exc:  # recorded, logged and counted; the transition and broadcast go on
            record.signal_error = exc
            message = (
                f"emergency signal {op} failed during {record.action} to {record.level.name}: "
                f"{type(exc).__name__}: {exc}"
            )
            log.critical(message)
            self.telemetry.event(
                "emergency.signal_failed",
                severity="critical",
                message=message,
                op=op,
                action=record.action,
                level=record.level.name,
                error=f"{type(exc).__name__}: {exc}",
            )
            self.telemetry.count("emergency.signal_errors")
            return None

    def _finish(self, record: Escalation, started: float) -> Escalation:
        severity = "critical" if record.level == EmergencyLevel.HALT else "warning"
        message = (
            f"emergency level {record.previous_level.name} -> {record.level.name} ({record.action}): {record.reason}"
        )
        log.log(logging.CRITICAL if severity == "critical" else logging.WARNING, message)
        self.telemetry.event(
            f"emergency.{record.action}d",
            severity=severity,
            message=message,
            level=record.level.name,
            previous_level=record.previous_level.name,
            reason=record.reason,
            signal_generation=record.signal_generation,
        )
        self.telemetry.count("emergency.escalations" if record.action == "escalate" else "emergency.deescalations")
        if self.broadcaster is not None:
            if self._pending or not self._has_room(self._clock()):
                self._defer(record, started)
            else:
                self._broadcast(record, started)
        record.latency = self._clock() - started
        return record

    # ---- broadcasting under the cap ----------------------------------------------------------------

    def _has_room(self, now: float) -> bool:
        while self._sent_at and now - self._sent_at[0] >= BROADCAST_WINDOW_S:
            self._sent_at.popleft()
        return len(self._sent_at) < self.max_broadcasts_per_min

    def _defer(self, record: Escalation, started: float) -> None:
        record.deferred = True
        self._pending.append((record, started))
        message = (
            f"broadcast of {record.action} to {record.level.name} deferred: cap of "
            f"{self.max_broadcasts_per_min} per minute reached; {len(self._pending)} waiting"
        )
        log.warning(message)
        self.telemetry.event(
            "emergency.broadcast_deferred",
            severity="warning",
            message=message,
            level=record.level.name,
            pending=len(self._pending),
        )
        self.telemetry.count("emergency.broadcasts_deferred")

    def _broadcast(self, record: Escalation, started: float) -> None:
        assert self.broadcaster is not None
        self._sent_at.append(self._clock())
        try:
            self.broadcaster(record)
        except Exception as exc:  # recorded on the record, logged and counted: never swallowed
            record.error = exc
            message = f"broadcast of {record.action} to {record.level.name} failed: {type(exc).__name__}: {exc}"
            log.error(message)
            self.telemetry.event(
                "emergency.broadcast_failed",
                severity="error",
                message=message,
                level=record.level.name,
                action=record.action,
                error=f"{type(exc).__name__}: {exc}",
            )
            self.telemetry.count("emergency.broadcast_errors")
        else:
            record.broadcasted = True
            self.telemetry.count("emergency.broadcasts")
        record.broadcast_delay = self._clock() - started

    def close(self, timeout_s: float | None = 60.0) -> list[Escalation]:
        """Sends every queued broadcast, waiting for room under the cap for up to ``timeout_s`` (None:
        as long as it takes);
        returns the records still unsent at the deadline, each reported (log, telemetry event and the
        ``emergency.broadcasts_undelivered`` counter). Nothing queued is dropped silently."""
        timeout_s = check_timeout(timeout_s)
        deadline = self._clock() + (timeout_s if timeout_s is not None else math.inf)
        while True:
            with self._lock:
                self.flush_pending()
                if not self._pending:
                    return []
                now = self._clock()
                room_at = self._sent_at[0] + BROADCAST_WINDOW_S if self._sent_at else now
                if room_at > deadline:
                    undelivered = [record for record, _ in self._pending]
                    self._pending.clear()
                    break
            # Waiting for room under the cap without the lock: an escalation meanwhile (a HALT
            # during shutdown) reaches the signal at once instead of waiting out this sleep.
            self._sleep(max(0.0, room_at - now))
        message = (
            f"emergency controller closed with {len(undelivered)} broadcast(s) undelivered under the cap of "
            f"{self.max_broadcasts_per_min} per minute: "
            + "; ".join(f"{r.action} to {r.level.name} ({r.reason})" for r in undelivered)
        )
        log.error(message)
        self.telemetry.event(
            "emergency.broadcasts_undelivered",
            severity="error",
            message=message,
            levels=[r.level.name for r in undelivered],
        )
        self.telemetry.count("emergency.broadcasts_undelivered", len(undelivered))
        return undelivered

    def flush_pending(self) -> list[Escalation]:
        """Broadcasts queued records, oldest first, while the per-minute cap allows; returns those
        broadcast (their ``broadcasted``/``error`` fields are updated). Records still waiting stay
        queued. Also runs at the start of every ``escalate``/``deescalate``."""
        flushed: list[Escalation] = []
        with self._lock:
            while self._pending and self._has_room(self._clock()):
                record, started = self._pending.popleft()
                self._broadcast(record, started)
                flushed.append(record)
            if flushed:
                self.telemetry.event(
                    "emergency.broadcasts_flushed",
                    severity="info",
                    message=f"{len(flushed)} deferred broadcasts sent; {len(self._pending)} still waiting",
                    flushed=len(flushed),
                    pending=len(self._pending),
                )
        return flushed
