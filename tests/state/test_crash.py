"""Crash consistency: a process checkpointing in a loop is SIGKILLed at random moments, many times.

After every kill the newest committed checkpoint must restore, hold exactly the state of its step,
and every checkpoint the manifest lists must verify. The child processes come from a fork server
that has already imported torch, so each one starts in milliseconds.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest

from tolaria.signals import SharedDeadlineSignal
from tolaria.state import StateManager
from tolaria.telemetry import MemorySink, TelemetryEmitter

from . import crash_child

KILLS = 20
BUDGET_S = 25.0


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_a_committed_checkpoint(tmp_path, monkeypatch, request):
    # The fork server must import this test package to preload it; it inherits the environment.
    package_dir = Path(crash_child.__file__).parents[len(crash_child.__name__.split(".")) - 1]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(package_dir), os.environ.get("PYTHONPATH", "")]))
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "tolaria.state", crash_child.__name__])
    rng = random.Random(1234)
    model, optimizer = crash_child.make_objects()
    root = str(tmp_path / "state")
    next_step, kills, start = 0, 0, time.monotonic()
    leftovers_seen = 0
    deadline = SharedDeadlineSignal.create(f"tolaria-test-crash-{os.getpid()}")
    request.addfinalizer(lambda: (deadline.close(), deadline.unlink()))
    while kills < KILLS and time.monotonic() - start < BUDGET_S:
        committed = ctx.RawValue("q", -1)
        args = (root, next_step, committed, deadline.name)
        child = ctx.Process(target=crash_child.checkpoint_forever, args=args, daemon=True)
        child.start()
        ready_by = time.monotonic() + 60.0
        while committed.value < next_step:  # wait for its first commit: it is writing in a loop now
            assert child.is_alive(), f"checkpoint child exited with {child.exitcode}"
            assert time.monotonic() < ready_by, "checkpoint child made no commit in 60 s"
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.04))
        os.kill(child.pid, signal.SIGKILL)
        child.join(10.0)
        assert child.exitcode == -signal.SIGKILL
        kills += 1
        last_reported = committed.value

        sink = MemorySink()
        with StateManager(
            root, fast_cache_mb=0, keep_last=3, telemetry=TelemetryEmitter([sink], batch_size=1)
        ) as manager:
            leftovers_seen += len(sink.of_kind("state.leftovers_removed"))
            step = manager.restore_latest(model, optimizer)
            assert step >= last_reported, f"kill {kills}: restored step {step}, but step {last_reported} had committed"
            assert manager.last_restored_extra == {"step": step}
            assert crash_child.check(model, optimizer, step) == [], f"kill {kills}: restored state is not step {step}'s"
            problems = [(e.step, err) for e, err in manager.verify_checkpoints() if err is not None]
            assert problems == [], f"kill {kills}: committed checkpoints do not verify: {problems}"
            assert not sink.of_kind("state.checkpoint_invalid")
        next_step = step + 1
    assert kills >= 10, f"only {kills} kills fit in {BUDGET_S} s"
    # With kills landing mid-write, some must have left a temporary or uncommitted file behind.
    print(f"{kills} kills, {leftovers_seen} of them left uncommitted files, last step {next_step - 1}")
