"""A full disk during a checkpoint (issue 18): the save fails with a clear error, the manifest lists
no partial file, the previous checkpoint restores bit for bit, and the trainer follows
``[checkpoint] on_failure`` instead of crashing. The trainer runs in a child process that lowers
its own ``RLIMIT_FSIZE`` (everywhere) and, where the test may mount one, fills a small tmpfs (see
``disk_full_child.py``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = Path(__file__).with_name("disk_full_child.py")


def _tmpfs_launcher(probe_dir: Path) -> list[str] | None:
    """A command prefix under which the child may mount a tmpfs (in its own mount namespace, as root
    of a user namespace when not root), or None where this machine allows neither."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    prefix = [unshare, "--mount"] if os.geteuid() == 0 else [unshare, "--user", "--map-root-user", "--mount"]
    probe = subprocess.run(
        [*prefix, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe_dir)], capture_output=True, timeout=30
    )
    return prefix if probe.returncode == 0 else None


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("disk_full")
    launcher = _tmpfs_launcher(tmp_path_factory.mktemp("probe"))
    command = [*(launcher or []), sys.executable, str(CHILD), str(base), *(["--tmpfs"] if launcher else [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check_common(outcome: dict, cause: str = "OSError: [Errno 27] File too large") -> None:
    assert outcome["status"] != "raised", outcome.get("error")
    assert outcome["unlisted_files"] == []  # no partial or temporary file left beside the manifest
    assert outcome["listed_files_exist"]
    assert outcome["restored_bitwise"] and outcome["restored_step"] == outcome["listed_steps"][-1]
    for message in outcome["failed"]:  # clear: the step, the file, the cause, what happens next
        assert "checkpoint at step" in message and f".pt failed: {cause}" in message
        assert "the previous checkpoints are unchanged" in message


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_retry_goes_on_and_commits_when_space_returns(outcomes):
    run = outcomes["retry_recovers"]
    _check_common(run)
    per_epoch = run["steps_per_epoch"]
    assert run["status"] == "completed" and run["last_checkpoint_step"] == 5 * per_epoch
    assert len(run["failed"]) == 2 and run["halting"] == [False, False] and run["recovered"] == 1
    assert "retrying at the next checkpoint (2 of 3 consecutive failures)" in run["failed"][1]
    # the two failed steps are absent; every committed one is listed (keep_last 3)
    assert run["listed_steps"] == [per_epoch, 4 * per_epoch, 5 * per_epoch]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("name", "failures"), [("retry_halts", 2), ("halt", 1)])
def test_consecutive_failures_halt_with_the_last_checkpoint_intact(outcomes, name, failures):
    run = outcomes[name]
    _check_common(run)
    per_epoch = run["steps_per_epoch"]
    assert run["status"] == "halted" and run["halt_reason"].startswith("checkpoints failing: periodic checkpoint")
    assert run["last_checkpoint_step"] == per_epoch == run["restored_step"]
    assert run["listed_steps"] == [per_epoch]
    # the periodic failures, the last of which halts, then the final one (expected to fail: reported)
    assert run["halting"] == [False] * (failures - 1) + [True, False]
    assert "the run was already halting because checkpoints kept failing" in run["failed"][-1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_emit_only_reports(outcomes):
    run = outcomes["emit"]
    _check_common(run)
    assert run["status"] == "completed" and len(run["failed"]) == 3 and not any(run["halting"])
    assert "training goes on (3 consecutive failure(s); on_failure='emit')" in run["failed"][-1]
    assert run["recovered"] == 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_really_full_filesystem(outcomes):
    if "tmpfs" not in outcomes:
        pytest.skip("this machine lets the test mount no tmpfs (not root, no user namespaces); RLIMIT_FSIZE ran")
    run = outcomes["tmpfs"]
    _check_common(run, cause="OSError: [Errno 28] No space left on device")
    per_epoch = run["steps_per_epoch"]
    # full at epoch end 2, space again at 3 (committed), full for good from 4: two in a row halt
    assert run["status"] == "halted" and run["listed_steps"] == [per_epoch, 3 * per_epoch]
    assert run["halting"] == [False, False, True, False] and run["recovered"] == 1
