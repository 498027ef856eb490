"""The state manager's deadline segment: created when needed, removed at exit, reclaimed after a crash."""

import os
import subprocess
import sys

import torch

from tolaria.state import StateManager
from tolaria.state.deadline_segments import PREFIX, SHM_DIR, reclaim_dead_segments


def _segments() -> set[str]:
    return {p.name for p in SHM_DIR.glob(PREFIX + "*")} if SHM_DIR.is_dir() else set()


def test_no_segment_until_a_deadline_is_armed(tmp_path):
    before = _segments()
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with StateManager(tmp_path / "a") as state:
        state.snapshot(0, model, optimizer)
        state.checkpoint(1, model, optimizer)
        assert _segments() == before  # no rollback yet: nothing in /dev/shm
        state.rollback(1, model, optimizer, deadline_s=5.0)
        name = state.deadline_signal.name
        assert name.lstrip("/") in {n.lstrip("/") for n in _segments()} or not SHM_DIR.is_dir()
    assert _segments() == before  # close() unlinked it


def test_a_process_that_never_closes_leaves_nothing_behind(tmp_path):
    code = (
        "import sys, torch\nfrom tolaria.state import StateManager\n"
        f"state = StateManager({str(tmp_path / 'b')!r})\n"
        "print(state.deadline_signal.name)\n"  # created, never closed: the exit finaliser unlinks it
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out.lstrip("/") not in {n.lstrip("/") for n in _segments()}


def test_segments_of_dead_processes_are_reclaimed(tmp_path):
    # A killed process cannot run its finaliser: its segment stays until the next manager is made.
    code = (
        "import os, signal, torch\nfrom tolaria.state import StateManager\n"
        f"state = StateManager({str(tmp_path / 'c')!r})\n"
        "print(state.deadline_signal.name, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == -9
    name = result.stdout.strip().lstrip("/")
    if not SHM_DIR.is_dir():
        return
    assert name in {n.lstrip("/") for n in _segments()}  # left behind by the kill
    reclaimed = reclaim_dead_segments()
    assert name in {n.lstrip("/") for n in reclaimed}
    assert name not in {n.lstrip("/") for n in _segments()}
    alive = SHM_DIR / f"{PREFIX}{os.getpid()}-999999"  # our own (live) pid's name is never touched
    alive.write_bytes(b"")
    try:
        reclaim_dead_segments()
        assert alive.exists()
    finally:
        alive.unlink()


def test_a_report_after_telemetry_closed_is_logged_not_raised(caplog):
    # An abandoned staging read can finish after the trainer closed its telemetry: its report must
    # reach the log, not raise in the read's daemon thread (and be lost).
    from tolaria.state.reporting import report
    from tolaria.telemetry import MemorySink, TelemetryEmitter

    telemetry = TelemetryEmitter([MemorySink()])
    telemetry.close()
    report(telemetry, "state.staging_finished_late", "warning", "the read of step 7 finished after close")
    assert "the read of step 7 finished after close (after telemetry closed: logged only)" in caplog.text
