r"""Delivery of emergency broadcasts off the caller's path: a bounded queue, a per-minute cap, and
one daemon thread that hands records to the broadcaster.

:class:`~tolaria.emergency.EmergencyController` writes a new level to its signal, then
:meth:`BroadcastDelivery.submit`\ s the record and returns; it never waits for the broadcaster. The
delivery thread (started with the first record) sends records oldest first, at most
``max_per_min`` per rolling :data:`BROADCAST_WINDOW_S`, and fills in each record's ``broadcasted``,
``error`` and ``broadcast_delay``. A slow or hung broadcaster delays only the records behind it.
At most ``max_pending`` wait; past that the oldest is dropped, loudly. :meth:`BroadcastDelivery.close`
waits, bounded, for the queue to drain and reports what it could not deliver. No lock is held while
the broadcaster runs or while the thread waits for room under the cap.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from tolaria._validation import check_timeout
from tolaria.telemetry import TelemetryEmitter

if TYPE_CHECKING:
    from tolaria.emergency import Escalation

__all__ = ["BROADCAST_WINDOW_S", "BroadcastDelivery"]

log = logging.getLogger("tolaria.emergency")

BROADCAST_WINDOW_S = 60.0


class BroadcastDelivery:
    """The broadcast queue and its delivery thread (see the module docstring).

    Args:
        broadcaster: called with each record, on the delivery thread.
        max_per_min: broadcasts per rolling 60 s window; the rest wait in order.
        max_pending: how many may wait; past that the oldest is dropped, loudly.
        telemetry: the emitter for events and counters.
        clock: seconds, monotonic.
        sleep: how the thread waits a number of seconds (on ``clock``) for room under the cap; None:
            on a condition that ``flush`` and ``close`` wake early.
    """

    def __init__(
        self,
        broadcaster: Callable[[Escalation], None],
        max_per_min: int,
        max_pending: int,
        telemetry: TelemetryEmitter,
        clock: Callable[[], float],
        sleep: Callable[[float], None] | None,
    ):
        self.broadcaster = broadcaster
        self.max_broadcasts_per_min = max_per_min
        self.max_pending_broadcasts = max_pending
        self.telemetry = telemetry
        self._clock = clock
        self._sleep = sleep
        # Never held while broadcasting or sleeping: submit() waits at most for another submit.
        self._cond = threading.Condition(threading.RLock())
        self._sent_at: deque[float] = deque()  # clock times of broadcasts in the current window
        self._outbox: deque[tuple[Escalation, float]] = deque()  # (record, clock time of its call)
        self._in_flight: Escalation | None = None  # the record the broadcaster holds now
        # Delivered since the last flush (which returns them); bounded like the queue.
        self._delivered: deque[Escalation] = deque(maxlen=max_pending)
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def pending(self) -> tuple[Escalation, ...]:
        """Records queued and not yet handed to the broadcaster, oldest first."""
        with self._cond:
            return tuple(record for record, _ in self._outbox)

    @property
    def in_flight(self) -> Escalation | None:
        """The record the broadcaster is handling right now, if any."""
        with self._cond:
            return self._in_flight

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- the queue (caller side; lock held) ------------------------------------------------------

    def _room(self, now: float) -> int:
        """Broadcasts the cap allows now."""
        while self._sent_at and now - self._sent_at[0] >= BROADCAST_WINDOW_S:
            self._sent_at.popleft()
        return self.max_broadcasts_per_min - len(self._sent_at)

    def submit(self, record: Escalation, started: float) -> None:
        """Queues ``record`` (its call began at ``started`` on the clock) and returns at once."""
        with self._cond:
            self._submit(record, started)

    def _submit(self, record: Escalation, started: float) -> None:
        if self._closed:
            record.error = RuntimeError("the emergency controller is closed: broadcast not sent")
            self._report_undelivered([record], "after close()")
            return
        if len(self._outbox) >= self._room(self._clock()):
            self._defer(record)
        if len(self._outbox) >= self.max_pending_broadcasts:
            self._drop_oldest()
        self._outbox.append((record, started))
        if self._thread is None:
            self._thread = threading.Thread(target=self._deliver_forever, name="tolaria-emergency-broadcast")
            self._thread.daemon = True  # a hung broadcaster must not keep the process alive
            self._thread.start()
        self._cond.notify_all()

    def _defer(self, record: Escalation) -> None:
        record.deferred = True
        message = (
            f"broadcast of {record.action} to {record.level.name} deferred: cap of "
            f"{self.max_broadcasts_per_min} per minute reached; {len(self._outbox) + 1} waiting"
        )
        log.warning(message)
        self.telemetry.event(
            "emergency.broadcast_deferred",
            severity="warning",
            message=message,
            level=record.level.name,
            pending=len(self._outbox) + 1,
        )
        self.telemetry.count("emergency.broadcasts_deferred")

    def _drop_oldest(self) -> None:
        dropped, _ = self._outbox.popleft()
        message = (
            f"broadcast of {dropped.action} to {dropped.level.name} ({dropped.reason}) dropped: "
            f"{self.max_pending_broadcasts} broadcasts already waiting (the broadcaster is slow or hung, or the "
            "cap is too low); the signal holds the newer level"
        )
        dropped.error = RuntimeError(message)
        log.error(message)
        self.telemetry.event("emergency.broadcast_dropped", severity="error", message=message, level=dropped.level.name)
        self.telemetry.count("emergency.broadcasts_dropped")

    # ---- the delivery thread ----------------------------------------------------------------------

    def _deliver_forever(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                wait_s: float | None = None
                job = None
                if self._outbox:
                    now = self._clock()
                    if self._room(now) > 0:
                        job = self._outbox.popleft()
                        self._sent_at.append(now)
                        self._in_flight = job[0]
                    else:
                        wait_s = self._sent_at[0] + BROADCAST_WINDOW_S - now
                if job is None and (self._sleep is None or wait_s is None):
                    self._cond.wait(wait_s)  # woken by a new record, flush or close
                    continue
            if job is None:
                assert wait_s is not None and self._sleep is not None
                self._sleep(max(0.0, wait_s))
                continue
            self._deliver(*job)

    def _deliver(self, record: Escalation, started: float) -> None:
        error: BaseException | None = None
        try:
            self.broadcaster(record)
        except BaseException as exc:  # recorded on the record, logged and counted: never swallowed
            error = exc
        delay = self._clock() - started
        if error is not None:
            message = f"broadcast of {record.action} to {record.level.name} failed: {type(error).__name__}: {error}"
            log.error(message)
            self.telemetry.event(
                "emergency.broadcast_failed",
                severity="error",
                message=message,
                level=record.level.name,
                action=record.action,
                error=f"{type(error).__name__}: {error}",
            )
            self.telemetry.count("emergency.broadcast_errors")
        else:
            self.telemetry.count("emergency.broadcasts")
        with self._cond:
            record.error = error
            record.broadcasted = error is None
            record.broadcast_delay = delay
            self._in_flight = None
            self._delivered.append(record)
            self._cond.notify_all()

    # ---- waiting for delivery ----------------------------------------------------------------------

    def flush(self, timeout_s: float | None = 10.0) -> list[Escalation]:
        """Wakes the delivery thread and waits until it has sent every queued record the per-minute
        cap allows now (records still held back by the cap stay queued), for up to ``timeout_s``
        seconds (None: no limit). Returns the records the broadcaster finished since the previous
        ``flush`` (at most ``max_pending_broadcasts``), oldest first, their ``broadcasted``
        and ``error`` set. A timeout (a slow or hung broadcaster) is logged, naming the record it holds."""
        timeout = check_timeout(timeout_s)
        deadline = time.monotonic() + (timeout if timeout is not None else math.inf)
        with self._cond:
            self._cond.notify_all()
            while self._in_flight is not None or (self._outbox and self._room(self._clock()) > 0):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    held = self._in_flight
                    log.warning(
                        "flush_pending gave up after %s s: %s; %d broadcast(s) still queued",
                        timeout_s,
                        f"the broadcaster still holds {held.action} to {held.level.name} ({held.reason})"
                        if held is not None
                        else "the delivery thread did not get to them",
                        len(self._outbox),
                    )
                    break
                self._cond.wait(None if math.isinf(remaining) else remaining)
            delivered = list(self._delivered)
            self._delivered.clear()
            if delivered:
                self.telemetry.event(
                    "emergency.broadcasts_flushed",
                    severity="info",
                    message=f"{len(delivered)} broadcasts sent; {len(self._outbox)} still waiting",
                    flushed=len(delivered),
                    pending=len(self._outbox),
                )
        return delivered

    def close(self, timeout_s: float | None = 60.0) -> list[Escalation]:
        """Waits up to ``timeout_s`` seconds (None: as long as it takes) for the queue to drain, then
        stops the thread; gives up at once when the cap cannot let the next record out before the
        deadline. Returns the records not delivered (queued, or held by a slow or hung broadcaster),
        each reported (log, event, ``emergency.broadcasts_undelivered`` counter). Waits without the
        lock, so ``submit`` goes on meanwhile; records submitted later are reported undelivered."""
        timeout = check_timeout(timeout_s)
        wait = timeout if timeout is not None else math.inf
        deadline, clock_deadline = time.monotonic() + wait, self._clock() + wait
        with self._cond:
            while self._in_flight is not None or self._outbox:
                now = self._clock()
                room_at = self._sent_at[0] + BROADCAST_WINDOW_S if self._outbox and self._room(now) <= 0 else now
                remaining = deadline - time.monotonic()
                if room_at > clock_deadline or remaining <= 0:
                    break
                self._cond.wait(None if math.isinf(remaining) else remaining)
            undelivered = [record for record, _ in self._outbox]
            held = self._in_flight
            self._outbox.clear()
            self._closed = True
            self._cond.notify_all()
        if held is not None:
            undelivered.insert(0, held)
        for record in undelivered:
            if record.error is None and record is not held:
                record.error = RuntimeError("broadcast undelivered when the emergency controller closed")
        if undelivered:
            self._report_undelivered(undelivered, "at close()", held=held)
        return undelivered

    def _report_undelivered(self, records: list[Escalation], when: str, held: Escalation | None = None) -> None:
        message = (
            f"emergency controller: {len(records)} broadcast(s) undelivered {when} (cap of "
            f"{self.max_broadcasts_per_min} per minute): "
            + "; ".join(
                f"{r.action} to {r.level.name} ({r.reason})"
                + (" [still held by the broadcaster: outcome unknown]" if r is held else "")
                for r in records
            )
        )
        log.error(message)
        self.telemetry.event(
            "emergency.broadcasts_undelivered",
            severity="error",
            message=message,
            levels=[r.level.name for r in records],
        )
        self.telemetry.count("emergency.broadcasts_undelivered", len(records))
