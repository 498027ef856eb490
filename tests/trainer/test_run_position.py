"""A resumed run repeats the uninterrupted one bit for bit: the data position (mid-epoch included)
and the random states (torch, NumPy, Python, the loader's generator) travel in the checkpoints.

The problem draws from every generator a run can touch: the data set adds noise from torch, NumPy
and Python's ``random`` when a sample is read, the loader shuffles from the global torch generator,
and the model has dropout. Any state left out of the checkpoint changes the final parameters.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import kill_worker
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tolaria.state import CheckpointError
from tolaria.trainer import CheckpointConfig, TelemetryConfig, Trainer, TrainerConfig
from tolaria.trainer.run_position import capture_rng, restore_rng

SAMPLES, BATCH = 24, 4  # 6 batches per epoch


def noisy_data() -> Dataset:
    """The rank-killed test's data (each read draws from torch, NumPy and Python's generators), smaller."""
    return kill_worker.NoisyData(SAMPLES, features=5, targets=2)


def make_model() -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 2)).double()


def loss_fn(out, batch):
    _, y = batch
    return {"a": ((out[:, 0] - y[:, 0]) ** 2).mean(), "b": ((out[:, 1] - y[:, 1]) ** 2).mean()}


def train(run_dir: Path, *, generator: bool = False, **changes) -> tuple[list[str], Trainer]:
    np.random.seed(5)
    random.seed(5)
    net = make_model()
    loader = DataLoader(
        noisy_data(),
        batch_size=BATCH,
        shuffle=True,
        generator=torch.Generator().manual_seed(9) if generator else None,
    )
    base = dict(
        epochs=3,
        device="cpu",
        seed=4,
        run_dir=str(run_dir),
        aggregator="pcgrad",
        progress=False,
        telemetry=TelemetryConfig(log_every_steps=1000),
    )
    trainer = Trainer(
        net,
        torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
        loader,
        loss_fn,
        TrainerConfig(**{**base, **changes}),
    )
    trainer.fit()
    return [float(v).hex() for p in net.parameters() for v in p.detach().reshape(-1).tolist()], trainer


@pytest.mark.parametrize("stop_at", [3, 6, 8])  # mid-epoch 1, an epoch's last batch, mid-epoch 2
def test_resume_after_a_stop_repeats_the_uninterrupted_run_bitwise(tmp_path, stop_at):
    expected, _ = train(tmp_path / "whole")
    train(tmp_path / "cut", max_steps=stop_at)
    # Every generator is disturbed before the resume: the checkpoint must bring them back.
    got, resumed = train(tmp_path / "cut", checkpoint=CheckpointConfig(resume=True))
    assert resumed.step == 3 * SAMPLES // BATCH
    assert got == expected


def test_step_checkpoints_carry_the_batch_position_and_every_random_state(tmp_path):
    expected, _ = train(tmp_path / "whole", generator=True)
    train(tmp_path / "cut", generator=True, max_steps=8, checkpoint=CheckpointConfig(checkpoint_every_steps=4))
    # Steps 4 and 8 by the step cadence, 6 at the end of epoch 1; step 8's is the last (no final one on top).
    manifest = json.loads((tmp_path / "cut" / "checkpoints" / "manifest.json").read_text())
    assert [e["step"] for e in sorted(manifest["checkpoints"], key=lambda e: e["sequence"])] == [4, 6, 8]
    got, resumed = train(tmp_path / "cut", generator=True, checkpoint=CheckpointConfig(resume=True))
    assert got == expected
    extra = resumed.state.last_restored_extra
    assert extra["position"]["batches"] == 2  # step 8 is batch 2 of epoch 2
    [rank0] = extra["position"]["rng"]
    assert {"torch", "numpy", "python", "data_generator"} <= set(rank0["now"]) == set(rank0["epoch_start"])


def test_capture_and_restore_rng_round_trip():
    loader = DataLoader(noisy_data(), batch_size=2, generator=torch.Generator().manual_seed(1))
    saved = capture_rng(loader)
    draws = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=loader.generator))
    torch.rand(7), np.random.rand(7), random.random(), torch.rand(4, generator=loader.generator)
    restore_rng(json.loads(json.dumps(saved)), loader)  # JSON-able, as it travels and is stored
    again = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=loader.generator))
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1])
    assert draws[2] == again[2] and torch.equal(draws[3], again[3])


def test_a_resume_whose_data_is_shorter_than_the_checkpoint_says_so(tmp_path):
    train(tmp_path, max_steps=4)
    net = make_model()
    short = DataLoader(torch.utils.data.Subset(noisy_data(), range(8)), batch_size=BATCH, shuffle=True)
    cfg = TrainerConfig(
        epochs=3, device="cpu", run_dir=str(tmp_path), progress=False, checkpoint=CheckpointConfig(resume=True)
    )
    trainer = Trainer(net, torch.optim.SGD(net.parameters(), lr=0.05), short, loss_fn, cfg)
    with pytest.raises(CheckpointError, match="after batch 4 of epoch 1, but this run's data has only 2"):
        trainer.fit()
