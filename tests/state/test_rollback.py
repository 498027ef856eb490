"""Deadline-bound rollback: slow and stuck reads, untouched state on a miss, the deadline signal, threads."""

from __future__ import annotations

import threading
import time

import pytest

from tolaria.state import StateManager
from tolaria.state import checkpoints as checkpoints_module
from tolaria.telemetry import TelemetryEmitter

from .helpers import assert_state_equal, full_state, make_adam, make_model, train_steps

# Liveness bound for "returns by the deadline even if the read never ends": generous, because the
# machine is shared; a stuck read would otherwise block for the whole 30 s the test allows it.
MARGIN_S = 1.0
real_read_chunk = checkpoints_module._read_chunk


@pytest.fixture
def setup(tmp_path, sink):
    """A manager with checkpoints of steps 1 and 2 (no snapshots), a model and optimizer past them."""
    manager = StateManager(
        tmp_path, fast_cache_mb=1, keep_last=3, telemetry=TelemetryEmitter([sink], batch_size=1), max_abandoned_reads=2
    )
    model = make_model()
    opt = make_adam(model)
    states = {}
    for step in (1, 2):
        train_steps(model, opt, 1, seed=step)
        manager.checkpoint(step, model, opt, extra={"step": step})
        states[step] = full_state(model, opt)
    train_steps(model, opt, 2, seed=7)
    yield manager, model, opt, states
    manager.close()


class StuckReader:
    """Replaces the checkpoint reader with one that blocks until released (at most 30 s)."""

    def __init__(self, monkeypatch):
        self.release = threading.Event()
        self.entered = 0
        monkeypatch.setattr(checkpoints_module, "_read_chunk", self)

    def __call__(self, file, view):
        self.entered += 1
        self.release.wait(30.0)
        return real_read_chunk(file, view)


def _wait_for(condition, timeout=15.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_stuck_read_misses_deadline_leaves_state_untouched_and_triggers_signal(setup, sink, monkeypatch):
    manager, model, opt, states = setup
    stuck = StuckReader(monkeypatch)
    before = full_state(model, opt)
    start = time.monotonic()
    result = manager.rollback(2, model, opt, deadline_s=0.2)
    elapsed = time.monotonic() - start
    assert elapsed < 0.2 + MARGIN_S
    assert not result.ok and result.deadline_missed and result.tier == "durable" and result.step == 2
    assert result.elapsed_s >= 0.2 and result.deadline_at == pytest.approx(start + 0.2, abs=0.05)
    assert "abandoned" in result.reason
    assert_state_equal(before, model, opt)

    signal = manager.deadline_signal.read()
    assert signal.is_set and signal.generation == result.signal_generation
    assert signal.timestamp_ms == pytest.approx(result.signal_timestamp_ms)
    assert result.reason.encode().startswith(signal.reason.encode()) and "missed its 0.200s deadline" in signal.reason
    assert result.deadline_signal == manager.deadline_signal.name
    (event,) = sink.of_kind("state.rollback_deadline_missed")
    assert event["severity"] == "critical" and event["signal_generation"] == result.signal_generation

    stuck.release.set()  # the abandoned read now ends; its result must never reach the model
    assert _wait_for(lambda: manager.outstanding_abandoned_reads == 0)
    assert _wait_for(lambda: sink.of_kind("state.staging_abandoned_finished"))
    assert_state_equal(before, model, opt)

    result = manager.rollback(2, model, opt, deadline_s=5.0)
    assert result.ok and result.tier == "durable" and result.step == 2 and result.extra == {"step": 2}
    assert_state_equal(states[2], model, opt)


def test_slow_read_is_cancelled_cooperatively(setup, sink, monkeypatch):
    manager, model, opt, _ = setup
    monkeypatch.setattr(checkpoints_module, "_CHUNK_BYTES", 1024)  # many chunks, a check between each
    reads = []

    def slow(file, view):
        reads.append(len(view))
        time.sleep(0.05)
        return real_read_chunk(file, view)

    monkeypatch.setattr(checkpoints_module, "_read_chunk", slow)
    before = full_state(model, opt)
    result = manager.rollback(2, model, opt, deadline_s=0.15)
    assert result.deadline_missed and not result.ok
    assert _wait_for(lambda: sink.of_kind("state.staging_abandoned_finished"))
    (finished,) = sink.of_kind("state.staging_abandoned_finished")
    assert "StagingCancelled" in finished["message"]
    size = manager.checkpoints[-1].nbytes
    assert len(reads) < size // 1024  # it stopped early instead of reading the whole file
    assert_state_equal(before, model, opt)


def test_repeated_timeouts_do_not_pile_up_threads(setup, sink, monkeypatch):
    manager, model, opt, states = setup
    manager.verify_checkpoints()  # starts the checksum helper thread, so the baseline includes it
    baseline = threading.active_count()
    stuck = StuckReader(monkeypatch)
    before = full_state(model, opt)
    results = []
    try:
        for _ in range(8):
            results.append(manager.rollback(2, model, opt, deadline_s=0.05))
            assert threading.active_count() <= baseline + 2  # max_abandoned_reads workers at most
    finally:
        stuck.release.set()
    assert all(r.deadline_missed and not r.ok for r in results)
    assert sum("abandoned and cancelled" in r.reason for r in results) == 2
    refused = [r for r in results if "still running (bound 2)" in r.reason]
    assert len(refused) == 6
    generations = [r.signal_generation for r in results]
    assert generations == sorted(generations) and len(set(generations)) == 8
    assert stuck.entered == 2  # refused rollbacks started no read at all
    assert_state_equal(before, model, opt)

    assert _wait_for(lambda: manager.outstanding_abandoned_reads == 0)
    assert _wait_for(lambda: manager.staging_threads == 1)  # surplus workers exit once idle
    assert _wait_for(lambda: threading.active_count() <= baseline + 1)
    result = manager.rollback(1, model, opt, deadline_s=5.0)
    assert result.ok and result.step == 1
    assert_state_equal(states[1], model, opt)


def test_close_does_not_wait_for_a_stuck_read(setup, monkeypatch):
    manager, model, opt, _ = setup
    stuck = StuckReader(monkeypatch)
    try:
        assert manager.rollback(2, model, opt, deadline_s=0.05).deadline_missed
        start = time.monotonic()
        manager.close()
        assert time.monotonic() - start < MARGIN_S
    finally:
        stuck.release.set()


def test_fast_tier_comes_first_then_durable(setup):
    manager, model, opt, states = setup
    manager.snapshot(3, model, opt)
    snap = full_state(model, opt)
    train_steps(model, opt, 1, seed=11)
    result = manager.rollback(2, model, opt, deadline_s=5.0)  # no snapshot at or before 2: durable
    assert result.ok and result.tier == "durable" and result.step == 2
    assert_state_equal(states[2], model, opt)
    result = manager.rollback(10, model, opt, deadline_s=5.0)
    assert result.ok and result.tier == "fast" and result.step == 3
    assert_state_equal(snap, model, opt)
    result = manager.rollback(0, model, opt, deadline_s=5.0)
    assert (
        not result.ok
        and not result.deadline_missed
        and "no snapshot or checkpoint at or before step 0" in result.reason
    )


def test_durable_rollback_skips_a_corrupt_checkpoint(setup, sink):
    manager, model, opt, states = setup
    newest = manager.root / manager.checkpoints[-1].file
    data = bytearray(newest.read_bytes())
    data[100] ^= 0xFF
    newest.write_bytes(bytes(data))
    result = manager.rollback(2, model, opt, deadline_s=5.0)
    assert result.ok and result.step == 1
    assert_state_equal(states[1], model, opt)
    (invalid,) = sink.of_kind("state.checkpoint_invalid")
    assert "checksum mismatch" in invalid["message"]


def test_durable_rollback_with_mismatched_optimizer_fails_by_name(setup):
    manager, model, opt, _ = setup
    import torch

    rms = torch.optim.RMSprop(model.parameters())
    before = full_state(model, rms)
    result = manager.rollback(2, model, rms, deadline_s=5.0)
    assert not result.ok and not result.deadline_missed and result.error == "OptimizerStateError"
    assert "RMSprop" in result.reason
    assert_state_equal(before, model, rms)


def test_every_durable_candidate_bad_is_a_failure_not_a_miss(setup):
    manager, model, opt, _ = setup
    for entry in manager.checkpoints:
        (manager.root / entry.file).unlink()
    result = manager.rollback(2, model, opt, deadline_s=5.0)
    assert not result.ok and not result.deadline_missed and result.error == "CheckpointError"
    assert "missing" in result.reason


@pytest.mark.parametrize("deadline", [0, -1.0, float("nan"), float("inf"), True])
def test_deadline_must_be_positive_and_finite(setup, deadline):
    manager, model, opt, _ = setup
    with pytest.raises(ValueError, match="deadline_s"):
        manager.rollback(2, model, opt, deadline_s=deadline)
