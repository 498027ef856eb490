"""Code run in spawned child processes by the cross-process tests (importable by the children)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal as posix_signal

from tolaria.signals import SharedDeadlineSignal, SharedEmergencySignal

SPAWN = mp.get_context("spawn")

KINDS = {"emergency": SharedEmergencySignal, "deadline": SharedDeadlineSignal}

# The two records the torn-read test alternates between: every field differs, including the reason's
# length, so any mix of the two is detectable.
RECORD_A = (4, "A" * 256, 1111.25)
RECORD_B = (1, "b" * 37, 2222.5)


def trigger(sig, kind: str, level: int, reason: str, monotonic_ms: float | None = None) -> int:
    if kind == "emergency":
        return sig.trigger(level, reason, monotonic_ms)
    return sig.trigger(reason, monotonic_ms)


def wait_for_trigger(kind: str, name: str, ready, results, timeout_s: float) -> None:
    """Attaches, reports ready, waits for the next trigger and reports (woke, state, pid)."""
    with KINDS[kind].attach(name) as sig:
        generation = sig.read().generation
        ready.set()
        woke = sig.wait(timeout_s, after_generation=generation)
        results.put((woke, sig.read(), os.getpid()))


def hammer(name: str, ready, stop, results) -> None:
    """Alternates RECORD_A and RECORD_B as fast as it can until `stop`; reports how many it wrote."""
    with SharedEmergencySignal.attach(name) as sig:
        ready.set()
        writes = 0
        while not stop.is_set():
            for _ in range(200):
                sig.trigger(*RECORD_A)
                sig.trigger(*RECORD_B)
            writes += 400
        results.put(writes)


def clear_after_trigger(name: str, results) -> None:
    """Reads the record the parent triggered, clears it, reports (state before, state after)."""
    with SharedEmergencySignal.attach(name) as sig:
        before = sig.read()
        sig.clear()
        results.put((before, sig.read()))


def create_and_die(kind: str, name: str, how: str) -> None:
    """Creates the signal, triggers it, then dies without close() or unlink(): ``os._exit`` or SIGKILL."""
    sig = KINDS[kind].create(name)
    trigger(sig, kind, 4, "about to crash")
    if how == "kill":
        os.kill(os.getpid(), posix_signal.SIGKILL)
    os._exit(0)


def create_and_hold(name: str, ready, release) -> None:
    """Creates the signal and keeps it (alive creator) until `release`."""
    with SharedEmergencySignal.create(name):
        ready.set()
        release.wait(10)


def bad_calls(name: str, results) -> None:
    """Makes invalid calls; reports, per call, whether it was refused with ValueError."""
    outcomes = []
    with SharedEmergencySignal.attach(name) as sig:
        for call in (
            lambda: SharedEmergencySignal.attach("bad/name"),
            lambda: sig.trigger(7, "x"),
            lambda: sig.trigger(0, "x"),
            lambda: sig.trigger("HALT", "x"),
        ):
            try:
                call()
                outcomes.append("accepted")
            except ValueError:
                outcomes.append("ValueError")
    results.put(outcomes)
