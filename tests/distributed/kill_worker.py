"""The rank-killed-mid-run fault, run under ``torchrun --nproc-per-node 2 --max-restarts 1`` (gloo).

:func:`launch` runs one repetition and :func:`problems` checks it (used by
``tests/distributed/test_rank_killed.py`` and ``tools/fault_repeat.py``). It runs ``python -m
torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 1 tests/distributed/kill_worker.py
OUT`` with the fault in the environment:

- ``TOLARIA_FAULT_KILL_STEP``: rank ``TOLARIA_FAULT_KILL_RANK`` SIGKILLs itself during the step
  after this many optimizer steps, in the first attempt only (torchrun's
  ``TORCHELASTIC_RESTART_COUNT`` is 0). Nothing in the library knows about it: the hook is the loss
  function below.

First attempt: both ranks train the reference run (uninterrupted) in ``OUT/reference``, then the
same run in ``OUT/faulty`` until the kill. torchrun then stops the surviving rank and restarts the
group; the second attempt resumes ``OUT/faulty`` from its newest committed checkpoint and finishes
it. Each rank writes ``OUT/<run>-rank<r>.json``: its final parameters as ``float.hex`` strings (so
equality is bitwise), its steps and where it resumed.

The problem draws from every random source a run has: the data set adds noise from torch, NumPy
and Python's ``random`` as each sample is read (the ranks read different samples, so their states
differ), the model has dropout, GradVac keeps a moving average and draws its orders from the
trainer's generator.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tolaria.distributed import LAUNCH_ENV_VARS, DistributedContext
from tolaria.trainer import CheckpointConfig, TelemetryConfig, Trainer, TrainerConfig

SAMPLES, BATCH, EPOCHS = 48, 4, 3  # 6 steps per epoch on 2 ranks, 18 in all
TOTAL_STEPS = EPOCHS * SAMPLES // (2 * BATCH)
CHECKPOINT_EVERY_STEPS = 2
SEED = 21
COLLECTIVE_TIMEOUT_S = 60  # a rank stuck in a collective fails instead of hanging


class NoisyData(Dataset):
    """Reading a sample draws from torch, NumPy and Python's generators (a random augmentation).
    Also the data of tests/trainer/test_run_position.py."""

    def __init__(self, samples: int = SAMPLES, features: int = 6, targets: int = 3) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(samples, features, generator=g, dtype=torch.float64)
        self.y = torch.randn(samples, targets, generator=g, dtype=torch.float64)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        noise = 0.01 * torch.randn(self.x.shape[1], dtype=torch.float64)
        return self.x[i] + noise + 1e-3 * (float(np.random.normal()) + random.random()), self.y[i]


def losses(out: torch.Tensor, batch) -> dict[str, torch.Tensor]:
    _, y = batch
    return {
        "a": ((out[:, 0] - y[:, 0]) ** 2).mean(),
        "b": ((out[:, 1] - y[:, 1]) ** 2).mean(),
        "c": ((out[:, 0] + y[:, 0]) ** 2).mean() + ((out[:, 2] - y[:, 2]) ** 2).mean(),
    }


def hexes(net: nn.Module) -> list[str]:
    return [float(v).hex() for p in net.parameters() for v in p.detach().reshape(-1).tolist()]


def train(ctx: DistributedContext, run_dir: Path, *, resume: bool, kill_at_step: int | None) -> dict:
    np.random.seed(100 + ctx.rank)  # rank-dependent on purpose; overwritten by a resume
    random.seed(200 + ctx.rank)
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3)).double()
    holder: dict[str, Trainer] = {}

    def loss_fn(out, batch):
        if kill_at_step is not None and holder["trainer"].step == kill_at_step:
            print(f"fault: rank {ctx.rank} SIGKILLs itself after step {kill_at_step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return losses(out, batch)

    config = TrainerConfig(
        epochs=EPOCHS,
        device="cpu",
        seed=SEED,
        run_dir=str(run_dir),
        aggregator="gradvac",
        progress=False,
        checkpoint=CheckpointConfig(checkpoint_every_steps=CHECKPOINT_EVERY_STEPS, resume=resume),
        telemetry=TelemetryConfig(log_every_steps=1000),
    )
    loader = DataLoader(NoisyData(), batch_size=BATCH, shuffle=True)  # the trainer shards it
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    trainer = holder["trainer"] = Trainer(net, optimizer, loader, loss_fn, config, ctx=ctx)
    summary = trainer.fit()
    return {
        "params": hexes(net),
        "status": summary.status,
        "steps": summary.steps,
        "resumed_from": summary.resumed_from_step,
        "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
    }


def main(out: Path) -> None:
    torch.set_num_threads(1)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    kill_step = int(os.environ["TOLARIA_FAULT_KILL_STEP"])
    kill_rank = int(os.environ["TOLARIA_FAULT_KILL_RANK"])
    if not CHECKPOINT_EVERY_STEPS <= kill_step < TOTAL_STEPS:
        raise ValueError(f"TOLARIA_FAULT_KILL_STEP must be in [{CHECKPOINT_EVERY_STEPS}, {TOTAL_STEPS}): {kill_step}")
    with DistributedContext.from_environment(backend="gloo", timeout_s=COLLECTIVE_TIMEOUT_S) as ctx:
        if restart == 0:
            reference = train(ctx, out / "reference", resume=False, kill_at_step=None)
            (out / f"reference-rank{ctx.rank}.json").write_text(json.dumps(reference))
        kill_at = kill_step if restart == 0 and ctx.rank == kill_rank else None
        faulty = train(ctx, out / "faulty", resume=restart > 0, kill_at_step=kill_at)
        (out / f"faulty-rank{ctx.rank}.json").write_text(json.dumps(faulty))


# ---- the launcher and the checks (run by the test process) ------------------------------------------

WORKERS = 2
# Exit codes of a worker that are the fault itself or its consequence: the killed rank (-9), the
# survivor torchrun terminates (-15), or the survivor's own error on the dead peer's socket (1).
EXPECTED_FAILURE_CODES = {"-9", "-15", "1"}


@dataclass
class Launch:
    """One repetition: what torchrun returned and printed, and how long it took."""

    kill_step: int
    kill_rank: int
    returncode: int | None  # None: it hung past the timeout and was killed
    output: str
    wall_s: float


def draw_fault(rng: random.Random) -> tuple[int, int]:
    """A kill step in ``[CHECKPOINT_EVERY_STEPS, TOTAL_STEPS)`` and a rank, from ``rng``."""
    return rng.randrange(CHECKPOINT_EVERY_STEPS, TOTAL_STEPS), rng.randrange(WORKERS)


def launch(out: Path, kill_step: int, kill_rank: int, *, timeout_s: float = 240.0) -> Launch:
    """Runs one repetition under torchrun; a run past ``timeout_s`` is killed (its whole session)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOLARIA_FAULT_KILL_STEP": str(kill_step),
        "TOLARIA_FAULT_KILL_RANK": str(kill_rank),
    }
    for name in LAUNCH_ENV_VARS:
        env.pop(name, None)
    torchrun = (
        f"-m torch.distributed.run --standalone --nproc-per-node {WORKERS} --max-restarts 1 --monitor-interval 0.1"
    )
    command = [sys.executable, *shlex.split(torchrun), str(Path(__file__).resolve()), str(out)]
    start = time.monotonic()
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
        returncode: int | None = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the agent and its workers: the session it leads
        output, _ = process.communicate()
        returncode = None
    return Launch(kill_step, kill_rank, returncode, output, time.monotonic() - start)


def problems(run: Launch, out: Path) -> list[str]:
    """What went wrong in a repetition (empty: nothing lost, no hang, no crash, identical replicas)."""
    if run.returncode is None:
        return [f"hang: torchrun did not finish (killed after {run.wall_s:.0f} s)"]
    found = []
    if run.returncode != 0:
        found.append(f"torchrun exited with {run.returncode}")
    for code in re.findall(r"failed \(exitcode: (-?\d+)\)", run.output):
        if code not in EXPECTED_FAILURE_CODES:
            found.append(f"crash: a worker exited with {code}")
    if f"SIGKILLs itself after step {run.kill_step}" not in run.output:
        found.append("the fault did not fire")
    try:
        reference = [json.loads((out / f"reference-rank{r}.json").read_text()) for r in range(WORKERS)]
        faulty = [json.loads((out / f"faulty-rank{r}.json").read_text()) for r in range(WORKERS)]
    except (OSError, ValueError) as exc:
        return [*found, f"missing result: {exc}"]
    # Checkpoints every CHECKPOINT_EVERY_STEPS steps (epoch ends fall on them): the newest committed
    # one before the kill is the last multiple at or below the kill step.
    newest = run.kill_step - run.kill_step % CHECKPOINT_EVERY_STEPS
    for rank, (ref, got) in enumerate(zip(reference, faulty)):
        if got["restart"] != 1 or got["resumed_from"] != newest:
            found.append(f"rank {rank} resumed from {got['resumed_from']} in attempt {got['restart']}, not {newest}")
        if got["status"] != "completed" or not got["steps"] == ref["steps"] == TOTAL_STEPS:
            found.append(f"rank {rank}: {got['status']} after {got['steps']} steps, reference {ref['steps']}")
        if got["params"] != ref["params"]:
            found.append(f"data lost: rank {rank}'s final parameters differ from the uninterrupted run's")
    if faulty[0]["params"] != faulty[1]["params"]:
        found.append("replicas differ")
    return found


if __name__ == "__main__":
    main(Path(sys.argv[1]))
