"""A stateful aggregator's state travels with the trainer's checkpoints and rollback snapshots."""

import json

import pytest
import torch

import tolaria.aggregation as aggregation
from tolaria.aggregation import Aggregator, Weights
from tolaria.trainer import Trainer, TrainerConfig
from tolaria.trainer.config import CheckpointConfig, SafetyConfig

from .helpers import NaNLoss, make_problem


class MovingAverageWeights(Aggregator):
    """Weights = a moving average of the normalised squared norms: each step's weights depend on
    every step before it, so a lost or stale state changes the run."""

    stateful = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.average = None
        self.calls = 0

    def weighting(self, gram):
        norms = gram.diagonal() / gram.diagonal().sum()
        if torch.isfinite(norms).all():  # a non-finite step leaves the state untouched
            self.average = norms if self.average is None else 0.7 * self.average + 0.3 * norms
            self.calls += 1
        return Weights(1.0 + self.average, torch.zeros((), dtype=torch.int64))

    def state_dict(self):
        return {"average": None if self.average is None else self.average.clone(), "calls": self.calls}

    def load_state_dict(self, state):
        self.average, self.calls = state["average"], state["calls"]

    def reset(self):
        self.average, self.calls = None, 0


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(aggregation._REGISTRY, "moving_average", MovingAverageWeights)


def config(tmp_path, name="run", **kw):
    return TrainerConfig(device="cpu", run_dir=str(tmp_path / name), aggregator="moving_average", **kw)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "telemetry.jsonl").read_text().splitlines()]


def test_a_resumed_run_repeats_the_uninterrupted_one_bit_for_bit(tmp_path):
    model, optimizer, data, loss_fn = make_problem()
    straight = Trainer(model, optimizer, data, loss_fn, config(tmp_path, "straight", epochs=3))
    straight.fit()

    model1, optimizer1, _, _ = make_problem()
    Trainer(model1, optimizer1, data, loss_fn, config(tmp_path, "split", epochs=1)).fit()
    model2, optimizer2, _, _ = make_problem(seed=7)
    resumed = Trainer(
        model2, optimizer2, data, loss_fn, config(tmp_path, "split", epochs=3, checkpoint=CheckpointConfig(resume=True))
    )
    resumed.fit()
    assert resumed.aggregator.calls == straight.aggregator.calls
    assert torch.equal(resumed.aggregator.average, straight.aggregator.average)
    for p, q in zip(model2.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_a_rollback_restores_the_state_of_the_snapshot(tmp_path, monkeypatch):
    model, optimizer, data, _ = make_problem()
    cfg = config(
        tmp_path, epochs=2, checkpoint=CheckpointConfig(snapshot_every_steps=4), safety=SafetyConfig(rollback_after=3)
    )
    trainer = Trainer(model, optimizer, data, NaNLoss(start=7, count=3), cfg)
    at_step_4 = {}
    snapshot = trainer._snapshot

    def remember():
        snapshot()
        if trainer.step == 4:
            at_step_4.update(trainer.aggregator.state_dict())

    monkeypatch.setattr(trainer, "_snapshot", remember)
    restored = []
    load = trainer.aggregator.load_state_dict
    monkeypatch.setattr(trainer.aggregator, "load_state_dict", lambda state: (restored.append(state), load(state)))
    summary = trainer.fit()
    assert summary.rollbacks == 1
    # Steps 5 and 6 moved the average on; the rollback to step 4 brought back the snapshot's.
    [state] = restored
    assert state["calls"] == at_step_4["calls"] == 4 and torch.equal(state["average"], at_step_4["average"])
    assert trainer.aggregator.calls == 4 + (2 * len(data) - 9)  # then the batches after the NaN streak


def test_a_checkpoint_without_the_aggregators_state_is_said_loudly(tmp_path):
    model, optimizer, data, loss_fn = make_problem()
    cfg = TrainerConfig(device="cpu", run_dir=str(tmp_path / "run"), aggregator="mean", epochs=1)
    Trainer(model, optimizer, data, loss_fn, cfg).fit()
    model2, optimizer2, _, _ = make_problem()
    trainer = Trainer(
        model2, optimizer2, data, loss_fn, config(tmp_path, epochs=2, checkpoint=CheckpointConfig(resume=True))
    )
    summary = trainer.fit()
    [event] = [r for r in records(summary.run_dir) if r["kind"] == "train.aggregator_state_missing"]
    assert event["severity"] == "warning" and event["aggregator"] == "MovingAverageWeights"
    assert "starts from its initial state" in event["message"]
    assert trainer.aggregator.calls == len(data)  # trained on from a fresh state


def test_every_randomised_aggregator_gets_the_trainers_generator_and_stateless_ones_none(tmp_path):
    model, optimizer, data, loss_fn = make_problem()
    for name in aggregation.AGGREGATOR_NAMES:
        cls = aggregation.aggregator_class(name)
        if name in ("weighted", "constant") or (name == "krum"):
            continue
        trainer = Trainer(
            model,
            optimizer,
            data,
            loss_fn,
            TrainerConfig(device="cpu", run_dir=str(tmp_path / name), aggregator=name, epochs=1),
        )
        try:
            assert (trainer.generator is not None) == cls.takes_generator()
            if trainer.generator is not None:
                assert trainer.aggregator.generator is trainer.generator
        finally:
            trainer.close()
