"""Faults the shared signal must survive (issue 18): corrupted or hostile segments, segments of
another user, and several processes creating one signal at once. The random loops run in a
subprocess (tests/emergency/signal_faults.py), so that an interpreter crash fails the test instead
of killing pytest, and under a timeout, so that a hang fails it too."""

import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tolaria.emergency import EmergencyController, EmergencyLevel
from tolaria.signals import SharedDeadlineSignal, SharedEmergencySignal, SignalLayoutError
from tolaria.telemetry import MemorySink, TelemetryEmitter

from .workers import KINDS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pokes segments through /dev/shm"),
]

REPO = Path(__file__).resolve().parents[2]
REPETITIONS = 20


def run_fault_loop(mode: str, seed: int, repetitions: int, count: int, timeout_s: float) -> dict:
    """Runs one fault loop in a fresh interpreter; its exit code says whether it survived."""
    args = [sys.executable, "-m", "tests.emergency.signal_faults", mode, str(seed), str(repetitions), str(count)]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    reproduce = f"reproduce: {' '.join(args[1:])}"
    # A negative code is a signal: -11 a segfault, -7 a SIGBUS (a read past the segment's file).
    assert done.returncode == 0, f"exit code {done.returncode} ({reproduce})\n{done.stdout}\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_corrupted_segments_never_crash_hang_or_read_past_the_segment():
    seed = random.randrange(2**32)
    report = run_fault_loop("corrupt", seed, REPETITIONS, 100, timeout_s=120)
    outcomes = report["outcomes"]
    assert report["repetitions"] == REPETITIONS and report["corruptions"] == REPETITIONS * 100
    assert report["unexpected"] == {} and report["problems"] == [], f"seed {seed}"
    # Every read ended in a valid record, SignalLayoutError or a torn-record RuntimeError; each of
    # them happened (the corruptions reach every check), and every read was accounted for.
    assert outcomes["read:ok"] > 0 and outcomes["read:SignalLayoutError"] > 0 and outcomes["read:RuntimeError:torn"] > 0
    assert sum(v for k, v in outcomes.items() if k.startswith("read:")) == report["corruptions"]
    # A successful write always left a record the next read takes.
    writes_ok = sum(outcomes.get(f"{op}:ok", 0) for op in ("raise_level", "trigger", "lower_level", "clear"))
    assert outcomes["read-after-write:ok"] <= writes_ok and "read-after-write:SignalLayoutError" not in outcomes
    # A record stuck mid-write under a live writer: reads and writes give up, a wait times out.
    assert outcomes["stuck-live-writer-read:RuntimeError:torn"] == 1
    assert outcomes["stuck-live-writer-trigger:RuntimeError:torn"] == 1
    assert outcomes["stuck-live-writer-wait:ok:False"] == 1
    assert sum(v for k, v in outcomes.items() if k.startswith("concurrent-read:")) == REPETITIONS * 40


def test_ranks_creating_one_signal_at_once_make_exactly_one_creator():
    report = run_fault_loop("create", random.randrange(2**32), REPETITIONS, 8, timeout_s=120)
    assert report["problems"] == []
    assert (report["created"], report["attached"], report["failed"]) == (REPETITIONS, REPETITIONS * 7, 0)


def test_create_or_attach_creates_then_attaches(signal_name):
    with SharedEmergencySignal.create_or_attach(signal_name) as first:
        assert first.created
        first.trigger(4, "from the creator")
        with SharedEmergencySignal.create_or_attach(signal_name) as second:
            assert not second.created and second.read().reason == "from the creator"
    assert not os.path.exists(f"/dev/shm/{signal_name}")  # the creator unlinked it on exit


@pytest.mark.parametrize("mode", [0o666, 0o622, 0o620, 0o602])
def test_a_segment_others_may_write_is_refused(signal_name, mode):
    with SharedEmergencySignal.create(signal_name) as sig:
        os.chmod(f"/dev/shm/{signal_name}", mode)
        for call in (SharedEmergencySignal.attach, SharedEmergencySignal.create_or_attach):
            with pytest.raises(PermissionError, match=f"mode {mode:04o} lets other users write it"):
                call(signal_name)
        sig.trigger(2, "the handle opened before keeps working")
        os.chmod(f"/dev/shm/{signal_name}", 0o640)  # group-readable is fine: no one else can write
        with SharedEmergencySignal.attach(signal_name) as other:
            assert other.read().reason == "the handle opened before keeps working"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a segment to another user needs root")
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_segment_of_another_user_is_refused(kind, signal_name):
    cls = KINDS[kind]
    path = f"/dev/shm/{signal_name}"
    with cls.create(signal_name):
        os.chown(path, 12345, 12345)
        for call in (cls.attach, cls.create_or_attach, cls.create):
            with pytest.raises(PermissionError, match="belongs to uid 12345, not to this process's uid 0"):
                call(signal_name)
        assert os.path.exists(path)  # refused, not reclaimed or removed


def test_a_short_segment_is_refused_without_reading_past_it(signal_name):
    with SharedEmergencySignal.create(signal_name):
        os.truncate(f"/dev/shm/{signal_name}", SharedEmergencySignal.SEGMENT_SIZE - 8)
        with pytest.raises(SignalLayoutError, match="records a size"):
            SharedEmergencySignal.attach(signal_name)


def test_a_header_overwritten_after_attach_is_reported_on_every_call(signal_name):
    with SharedDeadlineSignal.create(signal_name) as sig:
        with open(f"/dev/shm/{signal_name}", "r+b") as f:
            f.write(b"GARBAGE!")
        for call in (sig.read, lambda: sig.trigger("x"), sig.clear, lambda: sig.wait(1.0, after_generation=0)):
            with pytest.raises(SignalLayoutError, match="header overwritten since it was attached"):
                call()


def test_a_halt_reaches_a_corrupted_signal_and_the_corruption_is_reported(signal_name):
    with SharedEmergencySignal.create(signal_name) as sig:
        sig.trigger(EmergencyLevel.ELEVATED, "before")
        with open(f"/dev/shm/{signal_name}", "r+b") as f:  # the level word: 77, no level at all
            f.seek(SharedEmergencySignal.LAYOUT["payload"] + 8)
            f.write(struct.pack("<i", 77))
        with pytest.raises(SignalLayoutError, match="level 77 outside 1..4"):
            sig.read()
        sink = MemorySink()
        controller = EmergencyController(signal=sig, telemetry=TelemetryEmitter([sink]))
        record = controller.escalate(EmergencyLevel.HALT, "loss exploded")
        # The read failed loudly, and the HALT replaced the corrupted record all the same.
        assert record.changed and isinstance(record.signal_error, SignalLayoutError)
        assert sig.read().level == EmergencyLevel.HALT and sig.read().reason == "loss exploded"
        assert [event["op"] for event in sink.of_kind("emergency.signal_failed")] == ["read"]
        # A lowering over a corrupted record is refused: it might hide a higher level.
        with open(f"/dev/shm/{signal_name}", "r+b") as f:
            f.seek(SharedEmergencySignal.LAYOUT["payload"] + 8)
            f.write(struct.pack("<i", -3))
        assert sig.lower_level(EmergencyLevel.HALT, EmergencyLevel.NONE, "all clear?") is None
