"""The shared signals across spawned processes: wake-up, no torn records, clear, crash recovery."""

import os
import signal as posix_signal
import sys
import time

import pytest

from tolaria.signals import SharedEmergencySignal, SignalState

from . import workers
from .workers import KINDS, RECORD_A, RECORD_B, trigger

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="futex wake-up and /dev/shm are Linux's"),
]

CHILD_TIMEOUT_S = 8.0


def start(spawn, target, *args):
    child = spawn.Process(target=target, args=args, daemon=True)
    child.start()
    return child


def finish(child):
    child.join(CHILD_TIMEOUT_S)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"child {child.name} did not finish within {CHILD_TIMEOUT_S} s")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_trigger_wakes_a_waiter_in_another_process(kind, signal_name, spawn):
    with KINDS[kind].create(signal_name) as sig:
        ready, results = spawn.Event(), spawn.Queue()
        child = start(spawn, workers.wait_for_trigger, kind, signal_name, ready, results, CHILD_TIMEOUT_S)
        assert ready.wait(CHILD_TIMEOUT_S), "waiter never attached"
        time.sleep(0.05)  # let it reach the futex
        generation = trigger(sig, kind, 4, "halt from the parent", 123.5)
        woke, state, pid = results.get(timeout=CHILD_TIMEOUT_S)
        finish(child)
    assert pid == child.pid != os.getpid()
    assert woke is True
    assert (state.reason, state.timestamp_ms, state.generation, state.is_set) == (
        "halt from the parent",
        123.5,
        generation,
        True,
    )
    if kind == "emergency":
        assert state.level == 4


def test_reader_never_sees_a_torn_record(signal_name, spawn):
    valid = {RECORD_A, RECORD_B}
    with SharedEmergencySignal.create(signal_name) as sig:
        ready, stop, results = spawn.Event(), spawn.Event(), spawn.Queue()
        writer = start(spawn, workers.hammer, signal_name, ready, stop, results)
        assert ready.wait(CHILD_TIMEOUT_S), "writer never attached"
        seen = {RECORD_A: 0, RECORD_B: 0}
        reads, last_generation = 0, 0
        deadline = time.monotonic() + 1.2
        try:
            while time.monotonic() < deadline:
                state = sig.read()
                reads += 1
                if state.generation == 0:
                    continue  # before the writer's first trigger
                record = (state.level, state.reason, state.timestamp_ms)
                assert record in valid, f"torn record after {reads} reads: {state!r}"
                assert state.is_set
                assert state.generation >= last_generation
                # The writer alternates A (odd generations) and B (even): the generation belongs to the record.
                assert (record == RECORD_A) == (state.generation % 2 == 1), f"generation from another record: {state!r}"
                last_generation = state.generation
                seen[record] += 1
        finally:
            stop.set()
        writes = results.get(timeout=CHILD_TIMEOUT_S)
        finish(writer)
    assert writes >= 1000 and last_generation >= 1000, "the writer barely ran; the test proved nothing"
    assert seen[RECORD_A] > 0 and seen[RECORD_B] > 0


def test_clear_in_another_process_resets_the_record(signal_name, spawn):
    with SharedEmergencySignal.create(signal_name) as sig:
        sig.trigger(3, "conservative", 50.0)
        results = spawn.Queue()
        child = start(spawn, workers.clear_after_trigger, signal_name, results)
        before, after = results.get(timeout=CHILD_TIMEOUT_S)
        finish(child)
        assert before == SignalState(level=3, reason="conservative", timestamp_ms=50.0, generation=1, is_set=True)
        cleared = SignalState(level=0, reason="", timestamp_ms=0.0, generation=2, is_set=False)
        assert after == cleared and sig.read() == cleared


def test_clear_does_not_wake_a_waiter_in_another_process(signal_name, spawn):
    with SharedEmergencySignal.create(signal_name) as sig:
        ready, results = spawn.Event(), spawn.Queue()
        child = start(spawn, workers.wait_for_trigger, "emergency", signal_name, ready, results, 0.5)
        assert ready.wait(CHILD_TIMEOUT_S)
        sig.clear()
        woke, state, _ = results.get(timeout=CHILD_TIMEOUT_S)
        finish(child)
    assert woke is False and state.generation == 1 and not state.is_set


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("how", ["exit", "kill"])
def test_crash_left_segment_is_reclaimed(kind, how, signal_name, spawn):
    child = start(spawn, workers.create_and_die, kind, signal_name, how)
    finish(child)
    assert child.exitcode == (-posix_signal.SIGKILL if how == "kill" else 0)
    assert os.path.exists(f"/dev/shm/{signal_name}"), "the child should have left its segment behind"
    survivor = KINDS[kind].attach(signal_name)
    assert survivor.read().reason == "about to crash"
    with KINDS[kind].create(signal_name) as sig:
        assert sig.reclaimed_pid == child.pid
        state = sig.read()
        assert not state.is_set and state.reason == "" and state.generation == 2
        trigger(sig, kind, 2, "fresh")
        assert survivor.read().reason == "fresh"  # attached processes stay connected
    survivor.close()


def test_live_creator_in_another_process_is_not_reclaimed(signal_name, spawn):
    ready, release = spawn.Event(), spawn.Event()
    child = start(spawn, workers.create_and_hold, signal_name, ready, release)
    try:
        assert ready.wait(CHILD_TIMEOUT_S)
        with pytest.raises(FileExistsError, match=f"pid {child.pid}"):
            SharedEmergencySignal.create(signal_name)
    finally:
        release.set()
        finish(child)
    with pytest.raises(FileNotFoundError):  # the creator's context manager unlinked it
        SharedEmergencySignal.attach(signal_name)


def test_bad_names_and_levels_are_rejected_in_a_child(signal_name, spawn):
    # Validation is the same in every process: a child's bad calls fail without touching the record.
    with SharedEmergencySignal.create(signal_name) as sig:
        results = spawn.Queue()
        child = start(spawn, workers.bad_calls, signal_name, results)
        outcomes = results.get(timeout=CHILD_TIMEOUT_S)
        finish(child)
        assert outcomes == ["ValueError"] * 4
        assert sig.read().generation == 0
