"""EmergencyLevel, LocalEmergencySignal and EmergencyController."""

import os
import threading
import time

import pytest

from tolaria.emergency import (
    BROADCAST_WINDOW_S,
    EmergencyController,
    EmergencyLevel,
    Escalation,
    LocalEmergencySignal,
    as_level,
)
from tolaria.signals import SharedEmergencySignal, SignalState
from tolaria.telemetry import MemorySink, TelemetryEmitter

from .waiting import assert_close_ends_a_waiter

L = EmergencyLevel
BAD_LEVELS = [5, -1, True, 2.0, "HALT", None, object()]


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def sink():
    return MemorySink()


@pytest.fixture
def telemetry(sink):
    return TelemetryEmitter([sink])


@pytest.fixture(params=["local", "shared"])
def signal(request, signal_name):
    if request.param == "local":
        sig = LocalEmergencySignal()
        yield sig
        sig.close()
    else:
        with SharedEmergencySignal.create(signal_name) as sig:
            yield sig


# ---- levels -------------------------------------------------------------------------------------


def test_levels_are_ordered():
    assert [level.name for level in L] == ["NONE", "NOTICE", "ELEVATED", "CONSERVATIVE", "HALT"]
    assert [int(level) for level in L] == [0, 1, 2, 3, 4]
    assert as_level(4) is L.HALT and as_level(L.NOTICE) is L.NOTICE


@pytest.mark.parametrize("bad", BAD_LEVELS)
def test_anything_else_is_not_a_level(bad):
    with pytest.raises(ValueError, match="invalid emergency level"):
        as_level(bad)


# ---- LocalEmergencySignal -----------------------------------------------------------------------


def test_local_trigger_stamps_the_time_and_clear_resets_everything():
    sig = LocalEmergencySignal()
    before = time.monotonic() * 1e3
    assert sig.trigger(L.HALT, "halt") == 1
    state = sig.read()
    assert state.level == 4 and state.reason == "halt" and state.is_set and state.generation == 1
    assert before <= state.timestamp_ms <= time.monotonic() * 1e3
    assert sig.trigger(L.NOTICE, "given time", monotonic_ms=5.0) == 2
    assert sig.read().timestamp_ms == 5.0
    assert sig.clear() == 3
    assert sig.read() == SignalState(level=0, reason="", timestamp_ms=0.0, generation=3, is_set=False)
    assert not sig.is_set() and sig.generation == 3


@pytest.mark.parametrize("bad", [*BAD_LEVELS, 0])
def test_local_rejects_bad_levels(bad):
    sig = LocalEmergencySignal()
    with pytest.raises(ValueError, match="emergency level"):
        sig.trigger(bad, "r")
    with pytest.raises(ValueError, match="emergency level"):
        sig.raise_level(bad, "r")
    assert sig.generation == 0


def test_local_rejects_bad_arguments():
    sig = LocalEmergencySignal()
    for bad in (float("nan"), -1.0, float("inf")):
        with pytest.raises(ValueError, match="monotonic_ms"):
            sig.trigger(1, "r", bad)
    with pytest.raises(ValueError, match="timeout_s"):
        sig.wait(-1)
    with pytest.raises(ValueError, match="after_generation"):
        sig.wait(0, after_generation=-3)
    with pytest.raises(TypeError):
        sig.trigger(1, b"bytes")


@pytest.mark.parametrize("reason", ["a" * 300, "a" * 255 + "é", "a" * 254 + "€x", "a" * 253 + "🔥", "é" * 200, "ok"])
def test_local_cuts_reasons_exactly_like_the_shared_signal(signal_name, reason):
    local = LocalEmergencySignal()
    local.trigger(1, reason)
    with SharedEmergencySignal.create(signal_name) as shared:
        shared.trigger(1, reason)
        assert local.read().reason == shared.read().reason


def test_local_wait_semantics():
    sig = LocalEmergencySignal()
    assert sig.wait(0.01) is False
    sig.trigger(2, "r")
    assert sig.wait(0, after_generation=0) is True
    result = []
    waiter = threading.Thread(target=lambda: result.append(sig.wait(30.0)))
    waiter.start()
    time.sleep(0.05)
    sig.clear()  # does not release the waiter
    time.sleep(0.05)
    assert waiter.is_alive()
    sig.trigger(4, "wake")
    waiter.join(10)
    assert result == [True]


def test_local_close_ends_waiters():
    sig = LocalEmergencySignal()

    def close_by_leaving_its_context():
        with sig:
            pass

    assert_close_ends_a_waiter(sig, close_by_leaving_its_context)
    with pytest.raises(ValueError, match="closed"):
        sig.read()


def test_local_raise_level_never_lowers():
    sig = LocalEmergencySignal()
    assert sig.raise_level(2, "a") == 1
    assert sig.raise_level(2, "b") is None and sig.raise_level(1, "c") is None
    assert sig.raise_level(3, "d") == 2 and sig.read().reason == "d"


# ---- controller ---------------------------------------------------------------------------------


def test_escalate_writes_the_signal_and_returns_a_record(signal, telemetry, sink):
    sent = []
    ctrl = EmergencyController(broadcaster=sent.append, signal=signal, telemetry=telemetry)
    record = ctrl.escalate(L.ELEVATED, "loss spike")
    assert isinstance(record, Escalation)
    assert (record.action, record.level, record.previous_level, record.reason) == ("escalate", 2, 0, "loss spike")
    assert ctrl.flush_pending() == [record]  # the delivery thread sent it
    assert record.changed and record.broadcasted and record.error is None and not record.deferred
    assert record.latency >= 0 and record.broadcast_delay is not None
    assert sent == [record]
    state = signal.read()
    assert (state.level, state.reason, state.is_set) == (2, "loss spike", True)
    assert state.timestamp_ms == record.monotonic_ms and state.generation == record.signal_generation
    assert ctrl.level is L.ELEVATED
    assert len(sink.of_kind("emergency.escalated")) == 1
    assert telemetry.counters["emergency.escalations"] == 1


def test_lower_or_equal_escalation_is_a_reported_noop(signal, telemetry, sink):
    sent = []
    ctrl = EmergencyController(broadcaster=sent.append, signal=signal, telemetry=telemetry)
    ctrl.escalate(L.CONSERVATIVE, "first")
    generation = signal.read().generation
    for level in (L.CONSERVATIVE, L.NOTICE):
        record = ctrl.escalate(level, "weaker")
        assert not record.changed and not record.broadcasted
        assert record.previous_level is L.CONSERVATIVE and record.level is level
    ctrl.flush_pending()
    assert signal.read().generation == generation and len(sent) == 1
    noops = sink.of_kind("emergency.noop")
    assert len(noops) == 2 and "not above the current level CONSERVATIVE" in noops[0]["message"]


def test_deescalate_lowers_and_clears_at_none(signal, telemetry, sink):
    sent = []
    ctrl = EmergencyController(broadcaster=sent.append, signal=signal, telemetry=telemetry)
    ctrl.escalate(L.HALT, "nan loss")
    record = ctrl.deescalate(L.NOTICE, "recovered")
    assert record.changed and (record.level, record.previous_level) == (L.NOTICE, L.HALT)
    state = signal.read()
    assert (state.level, state.reason, state.is_set) == (1, "recovered", True)
    assert ctrl.deescalate(L.NOTICE, "same").changed is False
    assert ctrl.deescalate(L.HALT, "higher").changed is False
    record = ctrl.deescalate(L.NONE, "all clear")
    assert record.changed and ctrl.level is L.NONE
    cleared = SignalState(level=0, reason="", timestamp_ms=0.0, generation=state.generation + 1, is_set=False)
    assert signal.read() == cleared
    ctrl.flush_pending()
    assert [r.level for r in sent] == [L.HALT, L.NOTICE, L.NONE]
    assert len(sink.of_kind("emergency.deescalated")) == 2


def test_controller_without_signal_keeps_the_level_itself(telemetry):
    ctrl = EmergencyController(telemetry=telemetry)
    assert ctrl.escalate(L.NOTICE, "a").changed and ctrl.level is L.NOTICE
    record = ctrl.escalate(L.HALT, "b")
    assert record.changed and not record.broadcasted and record.signal_generation is None
    assert ctrl.deescalate(L.NONE, "c").changed and ctrl.level is L.NONE


def test_controller_follows_a_level_raised_elsewhere(telemetry):
    sig = LocalEmergencySignal()
    ctrl = EmergencyController(signal=sig, telemetry=telemetry)
    sig.trigger(L.HALT, "another process")
    record = ctrl.escalate(L.ELEVATED, "would lower the host's level")
    assert not record.changed and record.previous_level is L.HALT
    assert sig.read().level == L.HALT


@pytest.mark.parametrize("bad", BAD_LEVELS)
def test_controller_rejects_bad_levels(bad, telemetry):
    ctrl = EmergencyController(telemetry=telemetry)
    with pytest.raises(ValueError, match="invalid emergency level"):
        ctrl.escalate(bad, "r")
    with pytest.raises(ValueError, match="invalid emergency level"):
        ctrl.deescalate(bad, "r")


def test_controller_rejects_a_reason_that_is_not_text(telemetry):
    ctrl = EmergencyController(telemetry=telemetry)
    with pytest.raises(TypeError, match="reason must be a str"):
        ctrl.escalate(L.HALT, b"bytes")
    assert ctrl.level is L.NONE


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, None])
def test_controller_rejects_a_bad_cap(bad):
    with pytest.raises(ValueError, match="max_broadcasts_per_min"):
        EmergencyController(max_broadcasts_per_min=bad)


def test_failing_broadcaster_is_recorded_logged_and_counted(signal, telemetry, sink, caplog):
    def broken(record):
        raise ConnectionError("bus down")

    ctrl = EmergencyController(broadcaster=broken, signal=signal, telemetry=telemetry)
    with caplog.at_level("ERROR", logger="tolaria.emergency"):
        record = ctrl.escalate(L.HALT, "divergence")
        ctrl.flush_pending()
    assert isinstance(record.error, ConnectionError) and not record.broadcasted
    assert "bus down" in caplog.text
    failures = sink.of_kind("emergency.broadcast_failed")
    assert len(failures) == 1 and "ConnectionError: bus down" in failures[0]["error"]
    assert telemetry.counters["emergency.broadcast_errors"] == 1
    assert signal.read().level == L.HALT  # the level still reached the signal


def test_failing_signal_is_recorded_and_the_broadcast_still_goes_out(telemetry, sink, caplog):
    sig = LocalEmergencySignal()
    sent = []
    ctrl = EmergencyController(broadcaster=sent.append, signal=sig, telemetry=telemetry)
    ctrl.escalate(L.ELEVATED, "before")
    sig.close()
    with caplog.at_level("CRITICAL", logger="tolaria.emergency"):
        record = ctrl.escalate(L.HALT, "signal is gone")
    ctrl.flush_pending()
    assert record.changed and record.previous_level is L.ELEVATED  # the last known level
    assert isinstance(record.signal_error, ValueError) and "closed" in str(record.signal_error)
    assert record.broadcasted and sent[-1] is record
    assert "signal read failed" in caplog.text and "signal write failed" in caplog.text
    failures = sink.of_kind("emergency.signal_failed")
    assert [f["op"] for f in failures] == ["read", "write"]
    assert telemetry.counters["emergency.signal_errors"] == 2


def test_rate_cap_defers_in_order_and_drops_nothing(telemetry, sink):
    clock = FakeClock()
    sent = []
    ctrl = EmergencyController(broadcaster=sent.append, max_broadcasts_per_min=2, telemetry=telemetry, clock=clock)
    records = [
        ctrl.escalate(L.NOTICE, "1"),
        ctrl.escalate(L.ELEVATED, "2"),
        ctrl.escalate(L.CONSERVATIVE, "3"),
        ctrl.escalate(L.HALT, "4"),
        ctrl.deescalate(L.NONE, "5"),
    ]
    assert ctrl.flush_pending() == records[:2]  # the cap holds the rest back
    assert sent == records[:2]
    assert [r.deferred for r in records] == [False, False, True, True, True]
    assert not any(r.broadcasted for r in records[2:])
    assert ctrl.pending == tuple(records[2:])
    assert len(sink.of_kind("emergency.broadcast_deferred")) == 3

    clock.now += BROADCAST_WINDOW_S - 1  # still inside the window: nothing goes out
    assert ctrl.flush_pending() == []
    clock.now += 1
    assert ctrl.flush_pending() == records[2:4]
    assert sent == records[:4] and ctrl.pending == (records[4],)

    # The next call flushes first, and its own broadcast queues behind what still waits.
    clock.now += BROADCAST_WINDOW_S
    record = ctrl.escalate(L.ELEVATED, "6")
    assert ctrl.flush_pending() == [records[4], record]
    assert sent == [*records, record][:6] and ctrl.pending == ()
    assert all(r.broadcasted for r in [*records, record])
    assert records[4].broadcast_delay == pytest.approx(2 * BROADCAST_WINDOW_S)


def test_rate_cap_keeps_later_broadcasts_behind_queued_ones(telemetry):
    clock = FakeClock()
    sent = []
    ctrl = EmergencyController(broadcaster=sent.append, max_broadcasts_per_min=1, telemetry=telemetry, clock=clock)
    first = ctrl.escalate(L.NOTICE, "1")
    second = ctrl.escalate(L.ELEVATED, "2")
    assert ctrl.flush_pending() == [first]
    clock.now += BROADCAST_WINDOW_S
    third = ctrl.escalate(L.HALT, "3")  # room for one: the older queued record goes first
    assert ctrl.flush_pending() == [second]
    assert sent == [first, second] and ctrl.pending == (third,)
    clock.now += BROADCAST_WINDOW_S
    assert ctrl.flush_pending() == [third]


def test_close_waits_for_room_and_sends_everything_queued(telemetry, sink):
    clock = FakeClock()
    waits, closing = [], threading.Event()

    def sleep(seconds):  # the delivery thread's wait for room: the fake clock moves once close() runs
        waits.append(seconds)
        assert closing.wait(10.0)
        clock.now += seconds

    sent = []
    ctrl = EmergencyController(
        broadcaster=sent.append, max_broadcasts_per_min=1, telemetry=telemetry, clock=clock, sleep=sleep
    )
    records = [ctrl.escalate(L.NOTICE, "1"), ctrl.escalate(L.ELEVATED, "2"), ctrl.escalate(L.HALT, "3")]
    assert ctrl.flush_pending() == records[:1] and ctrl.pending == tuple(records[1:])
    closing.set()
    assert ctrl.close(timeout_s=3 * BROADCAST_WINDOW_S) == []
    assert sent == records and ctrl.pending == () and all(r.broadcasted for r in records)
    assert waits == [BROADCAST_WINDOW_S, BROADCAST_WINDOW_S]
    assert sink.of_kind("emergency.broadcasts_undelivered") == []


def test_close_reports_what_it_could_not_send_by_the_deadline(telemetry, sink, caplog):
    clock = FakeClock()
    released = threading.Event()
    sent = []
    ctrl = EmergencyController(
        broadcaster=sent.append,
        max_broadcasts_per_min=1,
        telemetry=telemetry,
        clock=clock,
        sleep=lambda s: released.wait(10.0),  # the clock never moves: room never comes
    )
    first, second = ctrl.escalate(L.NOTICE, "1"), ctrl.escalate(L.HALT, "disk on fire")
    assert ctrl.flush_pending() == [first]
    with caplog.at_level("ERROR"):
        assert ctrl.close(timeout_s=1.0) == [second]  # room at +60 s: past the deadline, no wait
    released.set()
    assert sent == [first] and ctrl.pending == () and ctrl.closed
    assert not second.broadcasted and "undelivered" in str(second.error)
    (event,) = sink.of_kind("emergency.broadcasts_undelivered")
    assert "escalate to HALT (disk on fire)" in event["message"] and event["severity"] == "error"
    assert telemetry.counters["emergency.broadcasts_undelivered"] == 1
    assert "undelivered" in caplog.text


class _StaleReads:
    """A signal whose first read is stale: another process raises the level right after it."""

    def __init__(self, inner, raise_to):
        self.inner, self.raise_to, self.reads = inner, raise_to, 0

    def read(self):
        state = self.inner.read()
        self.reads += 1
        if self.reads == 1:
            self.inner.raise_level(self.raise_to, "another process")
        return state

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("kind", ["local", "shared"])
def test_deescalate_never_undoes_a_concurrent_escalation(kind, telemetry, sink):
    inner = (
        LocalEmergencySignal() if kind == "local" else SharedEmergencySignal.create(f"tolaria-test-lower-{os.getpid()}")
    )
    try:
        inner.trigger(L.ELEVATED, "start")
        ctrl = EmergencyController(signal=_StaleReads(inner, L.HALT), telemetry=telemetry)
        record = ctrl.deescalate(L.NONE, "looks fine")
        assert not record.changed and record.previous_level == L.HALT
        assert inner.read().level == L.HALT  # the HALT raised in between stands
        (event,) = sink.of_kind("emergency.noop")
        assert "moved from ELEVATED to HALT" in event["message"]
    finally:
        inner.close()
        if kind == "shared":
            inner.unlink()


@pytest.mark.parametrize("kind", ["local", "shared"])
def test_lower_level_only_from_the_level_named(kind):
    sig = (
        LocalEmergencySignal()
        if kind == "local"
        else SharedEmergencySignal.create(f"tolaria-test-lower2-{os.getpid()}")
    )
    try:
        assert sig.lower_level(L.ELEVATED, L.NONE, "nothing set") is None
        sig.trigger(L.CONSERVATIVE, "x")
        assert sig.lower_level(L.ELEVATED, L.NOTICE, "stale") is None and sig.read().level == L.CONSERVATIVE
        generation = sig.lower_level(L.CONSERVATIVE, L.NOTICE, "better")
        state = sig.read()
        assert state.generation == generation and state.level == L.NOTICE and state.reason == "better"
        assert sig.lower_level(L.NOTICE, L.NONE, "clear") is not None and not sig.read().is_set
        with pytest.raises(ValueError, match="below"):
            sig.lower_level(L.NOTICE, L.HALT, "up is not down")
    finally:
        sig.close()
        if kind == "shared":
            sig.unlink()


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _BlockingBroadcaster:
    """A broadcaster that holds every record until the test releases it (a slow or hung broadcaster),
    noting the signal's level when each record reached it."""

    def __init__(self, signal=None):
        self.signal = signal
        self.entered = threading.Event()
        self.release = threading.Event()
        self.seen = []

    def __call__(self, record):
        self.entered.set()
        level = EmergencyLevel(self.signal.read().level).name if self.signal is not None else None
        self.seen.append((record.level.name, level))
        assert self.release.wait(30.0), "the test never released the broadcaster"


def test_the_level_reaches_the_signal_before_older_broadcasts_go_out():
    signal = LocalEmergencySignal()
    seen = []
    clock = _Clock()
    controller = EmergencyController(
        broadcaster=lambda record: seen.append((record.level.name, EmergencyLevel(signal.read().level).name)),
        signal=signal,
        max_broadcasts_per_min=1,
        clock=clock,
    )
    controller.escalate(EmergencyLevel.NOTICE, "first")  # broadcast at once
    assert controller.flush_pending() != []
    controller.escalate(EmergencyLevel.ELEVATED, "second")  # deferred: the cap is reached
    clock.now = 61.0  # room again
    controller.escalate(EmergencyLevel.HALT, "third")
    controller.flush_pending()
    # When the deferred ELEVATED broadcast went out, the signal already read HALT.
    assert seen[:2] == [("NOTICE", "NOTICE"), ("ELEVATED", "HALT")]


@pytest.mark.parametrize("kind", ["local", "shared"])
def test_a_slow_broadcaster_never_delays_a_halt_from_reaching_the_signal(kind, signal_name):
    # The reproduction: a record waiting behind a slow broadcaster, then a HALT. The broadcaster
    # is held on an Event the test controls, so "still blocked" is a fact, not a timing.
    signal = LocalEmergencySignal() if kind == "local" else SharedEmergencySignal.create(signal_name)
    broadcaster = _BlockingBroadcaster(signal)
    controller = EmergencyController(broadcaster=broadcaster, signal=signal)
    try:
        first = controller.escalate(EmergencyLevel.NOTICE, "first")
        assert broadcaster.entered.wait(10.0)  # the broadcaster now holds NOTICE
        waiting = controller.escalate(EmergencyLevel.ELEVATED, "queued behind the slow broadcaster")
        halt = controller.escalate(EmergencyLevel.HALT, "loss exploded")
        # escalate returned while the broadcaster is still blocked, and the signal already reads HALT.
        assert not broadcaster.release.is_set() and controller.in_flight is first
        assert signal.read().level == EmergencyLevel.HALT and halt.changed
        assert controller.pending == (waiting, halt) and not halt.broadcasted
        broadcaster.release.set()
        assert controller.close(timeout_s=30.0) == []
        assert [r.broadcasted for r in (first, waiting, halt)] == [True, True, True]
        assert broadcaster.seen == [("NOTICE", "NOTICE"), ("ELEVATED", "HALT"), ("HALT", "HALT")]
    finally:
        broadcaster.release.set()
        signal.close()
        if kind == "shared":
            signal.unlink()


def test_an_escalation_during_close_is_not_blocked_by_closes_wait(telemetry, sink):
    signal = LocalEmergencySignal()
    broadcaster = _BlockingBroadcaster(signal)
    controller = EmergencyController(broadcaster=broadcaster, signal=signal, telemetry=telemetry)
    held = controller.escalate(EmergencyLevel.NOTICE, "sent, and held by the broadcaster")
    assert broadcaster.entered.wait(10.0)
    results = []
    closer = threading.Thread(target=lambda: results.append(controller.close(timeout_s=30.0)))
    closer.start()
    closer.join(0.2)  # close() now waits for the held broadcast
    assert closer.is_alive()
    halt = controller.escalate(EmergencyLevel.HALT, "during shutdown")
    # close() is still waiting (the broadcaster still blocked), and the HALT is in the signal already.
    assert closer.is_alive() and not broadcaster.release.is_set()
    assert signal.read().level == EmergencyLevel.HALT and halt.changed
    broadcaster.release.set()
    closer.join(30.0)
    assert not closer.is_alive() and results == [[]]  # the HALT queued during close went out too
    assert held.broadcasted and halt.broadcasted
    assert sink.of_kind("emergency.broadcasts_undelivered") == []


def test_close_reports_a_hung_broadcaster_and_what_waits_behind_it(telemetry, sink, caplog):
    signal = LocalEmergencySignal()
    broadcaster = _BlockingBroadcaster()
    controller = EmergencyController(broadcaster=broadcaster, signal=signal, telemetry=telemetry)
    try:
        held = controller.escalate(EmergencyLevel.NOTICE, "held")
        assert broadcaster.entered.wait(10.0)
        halt = controller.escalate(EmergencyLevel.HALT, "behind it")
        with caplog.at_level("ERROR", logger="tolaria.emergency"):
            assert controller.close(timeout_s=0.2) == [held, halt]  # bounded: the broadcaster never returns
        assert signal.read().level == EmergencyLevel.HALT
        (event,) = sink.of_kind("emergency.broadcasts_undelivered")
        assert "still held by the broadcaster" in event["message"] and event["levels"] == ["NOTICE", "HALT"]
        assert telemetry.counters["emergency.broadcasts_undelivered"] == 2
        assert "undelivered" in caplog.text and not halt.broadcasted
    finally:
        broadcaster.release.set()


def test_a_full_queue_drops_the_oldest_waiting_broadcast_loudly(telemetry, sink):
    broadcaster = _BlockingBroadcaster()
    controller = EmergencyController(broadcaster=broadcaster, max_pending_broadcasts=2, telemetry=telemetry)
    try:
        held = controller.escalate(EmergencyLevel.NOTICE, "held")
        assert broadcaster.entered.wait(10.0)
        dropped = controller.escalate(EmergencyLevel.ELEVATED, "oldest waiting")
        kept = [controller.escalate(EmergencyLevel.CONSERVATIVE, "b"), controller.escalate(EmergencyLevel.HALT, "c")]
        assert controller.pending == tuple(kept) and controller.in_flight is held
        assert "dropped" in str(dropped.error) and not dropped.broadcasted
        (event,) = sink.of_kind("emergency.broadcast_dropped")
        assert event["level"] == "ELEVATED" and event["severity"] == "error"
        assert telemetry.counters["emergency.broadcasts_dropped"] == 1
        broadcaster.release.set()
        assert controller.close(timeout_s=30.0) == []
        assert [name for name, _ in broadcaster.seen] == ["NOTICE", "CONSERVATIVE", "HALT"]
    finally:
        broadcaster.release.set()


def test_after_close_the_level_still_reaches_the_signal_and_the_broadcast_is_reported(telemetry, sink):
    signal = LocalEmergencySignal()
    sent = []
    controller = EmergencyController(broadcaster=sent.append, signal=signal, telemetry=telemetry)
    assert controller.close() == [] and controller.closed
    record = controller.escalate(EmergencyLevel.HALT, "after shutdown")
    assert signal.read().level == EmergencyLevel.HALT and record.changed
    assert sent == [] and not record.broadcasted and "closed" in str(record.error)
    (event,) = sink.of_kind("emergency.broadcasts_undelivered")
    assert "after close()" in event["message"]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, None])
def test_controller_rejects_a_bad_queue_bound(bad):
    with pytest.raises(ValueError, match="max_pending_broadcasts"):
        EmergencyController(max_pending_broadcasts=bad)
