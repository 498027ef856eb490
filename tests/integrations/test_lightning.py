"""tolaria.integrations.lightning with the real ``lightning`` package, on the CPU, in float64."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from tolaria.aggregation import GradVac, Mean, NashMTL, PCGrad, UPGrad
from tolaria.integrations.lightning import CHECKPOINT_KEY

from .lightning_models import BATCH, TwoHeads, batches, dataset, flat_params, hand_written, loader, quiet_trainer

WORKER = Path(__file__).with_name("lightning_ddp_worker.py")
REPO = Path(__file__).resolve().parents[2]


class Recorder(L.Callback):
    """Keeps every step's logged metrics."""

    def __init__(self):
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


CASES = {
    "pcgrad-trunk": (
        dict(aggregator="pcgrad", shared="trunk"),
        lambda: PCGrad(generator=torch.Generator().manual_seed(0)),
        dict(),
    ),
    "upgrad-instance-all-shared": (dict(aggregator=UPGrad()), UPGrad, dict(shared=False)),
    "mean-clip-accumulate": (
        dict(aggregator="mean", shared="trunk", gradient_clip_val=0.05, accumulate_grad_batches=2),
        Mean,
        dict(clip=0.05, accumulate=2),
    ),
    "pcgrad-step-scheduler": (
        dict(aggregator="pcgrad", shared="trunk", scheduler="step"),
        lambda: PCGrad(generator=torch.Generator().manual_seed(0)),
        dict(scheduler_every=1),
    ),
    "mean-epoch-scheduler": (
        dict(aggregator="mean", shared="trunk", scheduler="epoch"),
        Mean,
        dict(scheduler_every=4),
    ),  # 4 batches an epoch
}


@pytest.mark.parametrize("case", list(CASES))
def test_trainer_fit_equals_the_same_steps_by_hand(case):
    options, reference_aggregator, reference_options = CASES[case]
    steps = 10  # crosses epoch boundaries (4 batches an epoch)
    model = TwoHeads(**options)
    initial = flat_params(model)
    recorder = Recorder()
    trainer = quiet_trainer(max_steps=steps, callbacks=[recorder])
    trainer.fit(model, loader())

    reference = hand_written(TwoHeads(), batches(dataset()), reference_aggregator(), steps=steps, **reference_options)
    assert trainer.global_step == steps
    assert not torch.equal(flat_params(model), initial), "training must have moved the parameters"
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=0, atol=1e-10)
    # Per-source statistics reach Lightning's logging.
    last = recorder.metrics[-1]
    for key in (
        "tolaria/loss/left",
        "tolaria/loss/right",
        "tolaria/weight/left",
        "tolaria/norm/right",
        "tolaria/conflicts",
    ):
        assert key in last
    if case.startswith("pcgrad"):
        assert sum(m["tolaria/conflicts"] for m in recorder.metrics) > 0, "the problem must make PCGrad project"


class ScalingOnly(MixedPrecision):
    """fp16 AMP's loss scaling without its autocast: the result must be the unscaled run's."""

    def forward_context(self):
        return contextlib.nullcontext()


def scaling_plugin(init_scale: float) -> ScalingOnly:
    return ScalingOnly("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def test_a_grad_scaler_is_undone_before_aggregating():
    # Nash-MTL's update does not scale with its gradients: aggregating the scaled buffer would be wrong.
    model = TwoHeads(aggregator="nash_mtl", shared="trunk")
    plugin = scaling_plugin(2.0**12)
    quiet_trainer(max_steps=4, plugins=[plugin]).fit(model, loader())
    reference = hand_written(TwoHeads(), batches(dataset()), NashMTL(), steps=4)
    assert plugin.scaler.get_scale() == 2.0**12
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=0, atol=1e-10)


class OverflowsFirst(TwoHeads):
    """float32, and losses that overflow once scaled at the first batch."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = self.losses(x.float(), y.float())
        return {name: loss * 1e36 for name, loss in losses.items()} if batch_idx == 0 else losses


def test_an_overflowing_step_is_skipped_and_the_aggregator_state_is_untouched():
    model = OverflowsFirst(aggregator="gradvac", shared="trunk").float()
    initial, state = flat_params(model), model.aggregator.state_dict()
    plugin = scaling_plugin(2.0**16)
    quiet_trainer(max_steps=1, plugins=[plugin]).fit(model, loader())
    assert torch.equal(flat_params(model), initial)  # the scaler skipped the step ...
    assert plugin.scaler.get_scale() == 2.0**15  # ... and backed off
    assert str(model.aggregator.state_dict()) == str(state)  # GradVac never saw the non-finite rows

    quiet_trainer(max_steps=3, plugins=[plugin]).fit(model, loader())
    assert torch.isfinite(flat_params(model)).all() and not torch.equal(flat_params(model), initial)


@pytest.mark.parametrize("name", ["gradvac", "random"])
def test_checkpoint_and_resume_repeat_the_uninterrupted_run(tmp_path, name):
    full = TwoHeads(aggregator=name, shared="trunk")
    quiet_trainer(max_epochs=2).fit(full, loader())

    first = TwoHeads(aggregator=name, shared="trunk")
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(first, loader())
    path = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    saved = checkpoint[CHECKPOINT_KEY]
    assert saved["names"] == ["left", "right"]
    assert saved["aggregator"]["class"] == type(first.aggregator).__name__ and saved["aggregator"]["state"]

    resumed = TwoHeads(aggregator=name, shared="trunk")
    quiet_trainer(max_epochs=2).fit(resumed, loader(), ckpt_path=path)
    assert torch.equal(flat_params(resumed), flat_params(full))

    # Control: without Tolaria's entry the aggregator starts afresh, says so, and the run differs.
    del checkpoint[CHECKPOINT_KEY]
    torch.save(checkpoint, tmp_path / "bare.ckpt")
    bare = TwoHeads(aggregator=name, shared="trunk")
    with pytest.warns(RuntimeWarning, match="no state for the aggregator"):
        quiet_trainer(max_epochs=2).fit(bare, loader(), ckpt_path=tmp_path / "bare.ckpt")
    assert not torch.equal(flat_params(bare), flat_params(full))


def test_pcgrads_generator_travels_in_the_checkpoint():
    model = TwoHeads(aggregator="pcgrad")
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    expected = torch.rand(3, generator=model.aggregator.generator)
    model.on_load_checkpoint(checkpoint)
    assert torch.equal(torch.rand(3, generator=model.aggregator.generator), expected)
    assert "aggregator" in checkpoint[CHECKPOINT_KEY]  # PCGrad with shuffles is stateful: its generator


class RenamesSources(TwoHeads):
    def training_step(self, batch, batch_idx):
        losses = self.losses(*batch)
        return losses if batch_idx == 0 else dict(reversed(list(losses.items())))


class ReturnsOneTensor(TwoHeads):
    def training_step(self, batch, batch_idx):
        return sum(self.losses(*batch).values())


class CallsSuper(TwoHeads):
    """An override that calls the wrapped parent's training_step: the losses are consumed once."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(
    "cls, error, match",
    [
        (RenamesSources, ValueError, "same named losses every step"),
        (ReturnsOneTensor, TypeError, "mapping of named losses"),
    ],
)
def test_bad_training_step_outputs_are_refused(cls, error, match):
    with pytest.raises(error, match=match):
        quiet_trainer(max_steps=2).fit(cls(), loader())


def test_an_override_calling_super_steps_once():
    model = CallsSuper(aggregator="mean")
    quiet_trainer(max_steps=3).fit(model, loader())
    reference = hand_written(TwoHeads(), batches(dataset()), Mean(), steps=3, shared=False)
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=0, atol=1e-10)


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown aggregator"):
        TwoHeads(aggregator="nope")
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        TwoHeads(accumulate_grad_batches=0)
    with pytest.raises(ValueError, match="aggregator_options go with an aggregator name"):
        TwoHeads(aggregator=GradVac(), aggregator_options={"beta": 0.1})
    model = TwoHeads()
    assert model.automatic_optimization is False
    with pytest.raises(ValueError, match="automatic_optimization"):
        model.automatic_optimization = True


def test_importing_without_lightning_names_the_extra(monkeypatch):
    monkeypatch.delitem(sys.modules, "tolaria.integrations.lightning")
    for name in [m for m in sys.modules if m == "lightning" or m.startswith("lightning.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'tolaria\[lightning\]'"):
        importlib.import_module("tolaria.integrations.lightning")


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_ddp_two_ranks_end_identical_and_equal_one_process_on_the_combined_batch(tmp_path):
    steps = 4
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    torchrun = "-m torch.distributed.run --standalone --nproc-per-node 2"
    command = [sys.executable, *shlex.split(torchrun), str(WORKER), str(tmp_path), str(steps)]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=80, check=False)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))

    # Rank 1 started from other parameters: DDP broadcast rank 0's, and the replicas stayed identical.
    assert rank1["perturbed"] and rank0["params"] == rank1["params"]
    assert rank0["global_step"] == rank1["global_step"] == steps
    assert rank0["seen"] == rank1["seen"] == steps  # rank 0's module buffers, as DDP broadcasts them
    assert rank0["conflicts"] > 0
    # Each rank took half of every combined batch of 2 x BATCH rows: one process on the combined batches.
    reference = hand_written(
        TwoHeads(), batches(dataset(), 2 * BATCH), PCGrad(generator=torch.Generator().manual_seed(0)), steps=steps
    )
    params = torch.tensor([float.fromhex(h) for h in rank0["params"]], dtype=torch.float64)
    torch.testing.assert_close(params, flat_params(reference), rtol=0, atol=1e-10)
