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
    errors = []

    def wait():
        try:
            sig.wait(30.0)
        except ValueError as exc:
            errors.append(str(exc))

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.05)
    with sig:
        pass
    waiter.join(10)
    assert len(errors) == 1 and "closed" in errors[0]
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
    assert sent == [*records, record][:6] and ctrl.pending == ()
    assert all(r.broadcasted for r in [*records, record])
    assert records[4].broadcast_delay == pytest.approx(2 * BROADCAST_WINDOW_S)


def test_rate_cap_keeps_later_broadcasts_behind_queued_ones(telemetry):
    clock = FakeClock()
    sent = []
    ctrl = EmergencyController(broadcaster=sent.append, max_broadcasts_per_min=1, telemetry=telemetry, clock=clock)
    first = ctrl.escalate(L.NOTICE, "1")
    second = ctrl.escalate(L.ELEVATED, "2")
    clock.now += BROADCAST_WINDOW_S
    third = ctrl.escalate(L.HALT, "3")  # room for one: the older queued record goes first
    assert sent == [first, second] and ctrl.pending == (third,)
    clock.now += BROADCAST_WINDOW_S
    assert ctrl.flush_pending() == [third]


def test_close_waits_for_room_and_sends_everything_queued(telemetry, sink):
    clock = FakeClock()
    waits = []

    def sleep(seconds):  # the fake clock moves only when the controller waits
        waits.append(seconds)
        clock.now += seconds

    sent = []
    ctrl = EmergencyController(
        broadcaster=sent.append, max_broadcasts_per_min=1, telemetry=telemetry, clock=clock, sleep=sleep
    )
    records = [ctrl.escalate(L.NOTICE, "1"), ctrl.escalate(L.ELEVATED, "2"), ctrl.escalate(L.HALT, "3")]
    assert sent == records[:1]
    assert ctrl.close(timeout_s=3 * BROADCAST_WINDOW_S) == []
    assert sent == records and ctrl.pending == ()
    assert waits == [BROADCAST_WINDOW_S, BROADCAST_WINDOW_S]
    assert sink.of_kind("emergency.broadcasts_undelivered") == []


def test_close_reports_what_it_could_not_send_by_the_deadline(telemetry, sink, caplog):
    clock = FakeClock()
    sent = []
    ctrl = EmergencyController(
        broadcaster=sent.append,
        max_broadcasts_per_min=1,
        telemetry=telemetry,
        clock=clock,
        sleep=lambda s: pytest.fail("must not wait past the deadline"),
    )
    first, second = ctrl.escalate(L.NOTICE, "1"), ctrl.escalate(L.HALT, "disk on fire")
    with caplog.at_level("ERROR"):
        assert ctrl.close(timeout_s=1.0) == [second]
    assert sent == [first] and ctrl.pending == ()
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
    controller.escalate(EmergencyLevel.ELEVATED, "second")  # deferred: the cap is reached
    clock.now = 61.0  # room again: the next transition sends the deferred one first
    controller.escalate(EmergencyLevel.HALT, "third")
    # When the deferred ELEVATED broadcast went out, the signal already read HALT.
    assert seen[:2] == [("NOTICE", "NOTICE"), ("ELEVATED", "HALT")]


def test_an_escalation_during_close_does_not_wait_out_closes_sleep():
    signal = LocalEmergencySignal()
    sleeping, release = threading.Event(), threading.Event()

    def sleep(seconds):
        sleeping.set()
        release.wait(10.0)

    controller = EmergencyController(broadcaster=lambda r: None, signal=signal, max_broadcasts_per_min=1, sleep=sleep)
    controller.escalate(EmergencyLevel.NOTICE, "sent")
    controller.escalate(EmergencyLevel.ELEVATED, "waits under the cap")
    closer = threading.Thread(target=controller.close, kwargs={"timeout_s": 120.0})
    closer.start()
    assert sleeping.wait(5.0)
    started = time.monotonic()
    controller.escalate(EmergencyLevel.HALT, "during shutdown")
    assert time.monotonic() - started < 1.0 and signal.read().level == EmergencyLevel.HALT
    release.set()
    closer.join(10.0)
