"""Multi-process faults: HALT from another process through the shared signal; SIGKILL and --resume."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tolaria.cli import main
from tolaria.emergency import EmergencyLevel
from tolaria.signals import SharedEmergencySignal
from tolaria.state import StateManager
from tolaria.trainer.tasks import DigitsTaskConfig, build_default_task

CONFIG = """
epochs = {epochs}
{extra}
[task]
train_pairs = 1280
test_pairs = 500
hidden = 32
"""

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def write_config(tmp_path, epochs, extra=""):
    path = tmp_path / "run.toml"
    path.write_text(CONFIG.format(epochs=epochs, extra=extra))
    return str(path)


def train_process(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "tolaria.cli", "train", "--no-progress", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "telemetry.jsonl").read_text().splitlines()]


def wait_for(path, proc, timeout_s=90):
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"trainer exited ({proc.returncode}) before {path} appeared:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout_s} s")
        time.sleep(0.05)


def test_halt_from_another_process_stops_the_run_with_a_final_checkpoint(tmp_path):
    name = f"tolaria-test-halt-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    run_dir = tmp_path / "run"
    with SharedEmergencySignal.create(name) as shared:
        config = write_config(tmp_path, epochs=1000, extra=f'[safety]\nemergency_signal = "{name}"\n')
        proc = train_process("--config", config, "--out", str(run_dir))
        try:
            wait_for(run_dir / "checkpoints" / "manifest.json", proc)  # epoch 1 is done: it is training
            shared.trigger(EmergencyLevel.HALT, "halt from the test process")
            out, err = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 3, err
    assert "halted (halt from the test process)" in out
    recs = records(run_dir)
    [end] = [r for r in recs if r["kind"] == "train.end"]
    assert end["status"] == "halted" and end["halt_reason"] == "halt from the test process"
    assert end["epochs"] < 1000
    # The last committed checkpoint holds the state the run stopped in (a final one, unless the
    # HALT arrived right after an epoch-end checkpoint of that very step), and it restores.
    committed = [r["step"] for r in recs if r["kind"] == "state.checkpoint_committed"]
    assert committed[-1] == end["steps"]
    task = build_default_task(DigitsTaskConfig(train_pairs=1280, test_pairs=500, hidden=32))
    with StateManager(run_dir / "checkpoints") as state:
        assert state.restore_latest(task.model, task.optimizer) == end["steps"]


def test_kill_then_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, epochs=3)
    proc = train_process("--config", config, "--out", str(run_dir), "--inject-fault", "kill")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    assert f"Resume with: tolaria train --resume --out {run_dir}" in err
    assert main(["train", "--config", config, "--out", str(run_dir), "--resume", "--no-progress"]) == 0
    assert "resumed from step" in capsys.readouterr().out
    [end] = [r for r in records(run_dir) if r["kind"] == "train.end"]
    [resume] = [r for r in records(run_dir) if r["kind"] == "train.resume"]
    assert resume["restored_step"] == 10  # the checkpoint of epoch 1 (1280 pairs / 128 per step)
    assert end["status"] == "completed" and end["epochs"] == 3 and end["steps"] == 30
