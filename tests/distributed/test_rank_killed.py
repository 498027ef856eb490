"""A rank SIGKILLed mid-run under ``torchrun --max-restarts 1``: torchrun restarts the group, the run
resumes from its newest committed checkpoint and ends bitwise equal to the uninterrupted run.

Each repetition draws the kill step and the killed rank from a seeded generator (see
``kill_worker.py``). CI runs ``TOLARIA_FAULT_REPEATS`` repetitions (default 2, one torchrun launch
each); ``tools/fault_repeat.py`` runs 20 and records the outcome.
"""

from __future__ import annotations

import os
import random

import pytest

from distributed import kill_worker

pytestmark = [pytest.mark.slow]

REPEATS = int(os.environ.get("TOLARIA_FAULT_REPEATS", "2"))
SEED = int(os.environ.get("TOLARIA_FAULT_SEED", "18"))


def faults() -> list[tuple[int, int]]:
    rng = random.Random(SEED)
    return [kill_worker.draw_fault(rng) for _ in range(REPEATS)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("kill_step", "kill_rank"), faults())
def test_a_killed_rank_resumes_bitwise_after_torchrun_restarts_the_group(tmp_path, kill_step, kill_rank):
    pytest.importorskip("torch.distributed.run")
    run = kill_worker.launch(tmp_path, kill_step, kill_rank, timeout_s=240)
    found = kill_worker.problems(run, tmp_path)
    assert not found, f"{found}\n--- torchrun output (tail) ---\n{run.output[-6000:]}"
