"""The controller that raises and lowers the emergency level, and its broadcast delivery.

The level says how careful training must be, from :attr:`EmergencyLevel.NONE` to
:attr:`EmergencyLevel.HALT`. An :class:`EmergencyController` owns the transitions:

- ``escalate(level, reason)`` raises the level; a level at or below the current one is a no-op that
  is still reported (returned record, telemetry, log).
- ``deescalate(level, reason)`` lowers it explicitly (to NONE: the signal is cleared).
- Each call returns an :class:`Escalation` record. The new level is written to the controller's
  signal first, always (a :class:`~tolaria.signals.SharedEmergencySignal` reaches every process on
  the host; a :class:`LocalEmergencySignal` stays in this process); the call then queues the record
  for the broadcaster and returns. It never waits for the broadcaster.
- A delivery thread (daemon, started with the first broadcast) hands the records to the broadcaster,
  oldest first, and fills in the record's ``broadcasted``, ``error`` and ``broadcast_delay``. A
  broadcaster that raises is recorded on the record's ``error``, logged and counted in telemetry; a
  slow or hung one delays only the broadcasts behind it, never a transition or the signal.
- At most ``max_broadcasts_per_min`` broadcasts go out per rolling minute; later ones wait in the
  queue, in order, until the window allows. At most ``max_pending_broadcasts`` wait: past that the
  oldest waiting one is dropped, loudly (event, log, counter, its record's ``error``); the signal
  already holds the newer level.
- :meth:`EmergencyController.flush_pending` waits (bounded) until the thread has sent what the cap
  allows now; :meth:`EmergencyController.close` waits (bounded) for the queue to drain and reports
  every record it could not deliver.

The levels (:class:`EmergencyLevel`, :func:`as_level`) and both signals live in
:mod:`tolaria.signals`, beside the shared-memory signal they mirror; they are re-exported here, so
``from tolaria.emergency import EmergencyLevel, LocalEmergencySignal`` keeps working.
"""

from __future__ import annotations

import logging
import numbers
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tolaria.broadcast_delivery import BROADCAST_WINDOW_S, BroadcastDelivery
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
        broadcasted: whether the broadcaster accepted it (False until the delivery thread sent it,
            when it failed, when it was dropped or undelivered, or when there is no broadcaster).
        error: the exception the broadcaster raised, or the error that says why the record was never
            handed to it (dropped from a full queue, controller closed).
        deferred: whether the rate cap held the broadcast back when it was queued (it goes out later;
            see ``broadcast_delay``).
        latency: seconds from the call until the level was written to the signal and the broadcast
            queued (the call never waits for the broadcaster).
        broadcast_delay: seconds from the call until the broadcaster returned; None until then.
        monotonic_ms: when the call was made (``time.monotonic``, milliseconds); the signal's timestamp.
        signal_generation: the signal's generation after the write, when one was made.
        signal_error: the exception the signal raised on read or write, if it did (the controller
            then goes on with its last known level, and still broadcasts).

    The delivery thread fills in ``broadcasted``, ``error`` and ``broadcast_delay`` after the call
    returned: read them after :meth:`EmergencyController.flush_pending` or ``close``.
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
    """Raises and lowers the emergency level, writes it to a signal, and broadcasts every change off
    the caller's path.

    Args:
        broadcaster: called with each level change's :class:`Escalation` (e.g. to publish it to other
            hosts), on the controller's delivery thread. May raise: the error is recorded on the
            record, logged and counted. May be slow or hang: only later broadcasts wait for it.
        signal: where the level lives. With a signal, the signal is the source of truth: another
            process's trigger is seen here, and ``escalate`` raises the level atomically
            (``raise_level``), so concurrent escalations never lower it. Without one, the
            controller keeps the level itself.
        max_broadcasts_per_min: broadcasts per rolling 60 s window; the rest wait in order.
        telemetry: the emitter for events and counters.
        max_pending_broadcasts: how many broadcasts may wait; past that the oldest is dropped, loudly.
        clock: seconds, monotonic; injectable for tests.
        sleep: how the delivery thread waits a number of seconds (on ``clock``) for room under the
            cap; injectable for tests. By default it waits on a condition that ``flush_pending`` and
            ``close`` wake early.

    Call :meth:`close` before the process ends: it waits (up to a timeout) for the broadcasts still
    queued and reports any it could not deliver.
    """

    def __init__(
        self,
        broadcaster: Broadcaster | None = None,
        signal: EmergencySignal | None = None,
        max_broadcasts_per_min: int = 30,
        telemetry: TelemetryEmitter | None = None,
        *,
        max_pending_broadcasts: int = 1000,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
    ):
        for name, value in (
            ("max_broadcasts_per_min", max_broadcasts_per_min),
            ("max_pending_broadcasts", max_pending_broadcasts),
        ):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.broadcaster = broadcaster
        self.signal = signal
        self.max_broadcasts_per_min = int(max_broadcasts_per_min)
        self.max_pending_broadcasts = int(max_pending_broadcasts)
        self.telemetry = emitter_or_default(telemetry)
        self._clock = clock
        # Without a signal: the level. With one: the last level read or written, used when the
        # signal cannot be read.
        self._level = EmergencyLevel.NONE
        self._lock = threading.RLock()  # serialises transitions; the delivery has its own lock
        self._closed = False
        self._delivery = (
            BroadcastDelivery(
                broadcaster, self.max_broadcasts_per_min, self.max_pending_broadcasts, self.telemetry, clock, sleep
            )
            if broadcaster is not None
            else None
        )

    # ---- state -----------------------------------------------------------------------------------

    @property
    def level(self) -> EmergencyLevel:
        """The current level (the signal's, when there is one)."""
        if self.signal is not None:
            return EmergencyLevel(self.signal.read().level)
        return self._level

    @property
    def pending(self) -> tuple[Escalation, ...]:
        """Broadcasts queued and not yet handed to the broadcaster, oldest first."""
        return self._delivery.pending if self._delivery is not None else ()

    @property
    def in_flight(self) -> Escalation | None:
        """The record the broadcaster is handling right now, if any."""
        return self._delivery.in_flight if self._delivery is not None else None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (transitions still write the signal; broadcasts stop)."""
        return self._closed

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
            # The level is in the signal; the broadcast only gets queued (the delivery thread sends it).
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
        if self._delivery is not None:
            self._delivery.submit(record, started)
        record.latency = self._clock() - started
        return record

    # ---- delivery ----------------------------------------------------------------------------------

    def flush_pending(self, timeout_s: float | None = 10.0) -> list[Escalation]:
        """Wakes the delivery thread and waits until it has sent every queued record the per-minute
        cap allows now (records still held back by the cap stay queued), for up to ``timeout_s``
        seconds (None: no limit). Returns the records the broadcaster finished since the previous
        ``flush_pending`` (at most ``max_pending_broadcasts``), oldest first, their ``broadcasted``
        and ``error`` set. A timeout (a slow or hung broadcaster) is logged, naming the record it holds."""
        return self._delivery.flush(timeout_s) if self._delivery is not None else []

    def close(self, timeout_s: float | None = 60.0) -> list[Escalation]:
        """Waits up to ``timeout_s`` seconds (None: as long as it takes) for every queued broadcast to
        be delivered, then stops the delivery thread. Gives up at once when the per-minute cap cannot
        let the next one out before the deadline. Returns the records not delivered (still queued, or
        still held by a slow or hung broadcaster), each reported: log, telemetry event and the
        ``emergency.broadcasts_undelivered`` counter. Nothing queued is dropped silently.

        Never holds a lock while waiting: an escalation during ``close`` (a HALT during shutdown)
        reaches the signal at once. Escalations after ``close`` still write the signal; their
        broadcasts are reported undelivered."""
        self._closed = True
        return self._delivery.close(timeout_s) if self._delivery is not None else []
