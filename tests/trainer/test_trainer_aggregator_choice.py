"""The trainer takes an aggregator instance or a name, and a shared trunk whose heads get plain gradients."""

import copy
import json

import pytest
import torch

from tolaria.aggregation import GradientBuffer, Mean, UPGrad
from tolaria.trainer import Trainer, TrainerConfig
from tolaria.trainer.config import ConfigError, SafetyConfig

from .helpers import make_problem, two_task_loss


def config(tmp_path, **kw):
    kw.setdefault("epochs", 1)
    return TrainerConfig(device="cpu", run_dir=str(tmp_path / "run"), **kw)


def test_an_instance_is_used_as_given_and_recorded_by_name(tmp_path):
    model, optimizer, data, loss_fn = make_problem()
    instance = UPGrad()
    trainer = Trainer(model, optimizer, data, loss_fn, config(tmp_path), aggregator=instance)
    assert trainer.aggregator is instance
    trainer.fit()
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["aggregator"] == "upgrad"


def test_a_name_overrides_the_configs():
    model, optimizer, data, loss_fn = make_problem()
    with Trainer(model, optimizer, data, loss_fn, TrainerConfig(device="cpu", run_dir=None), aggregator="mean") as t:
        assert isinstance(t.aggregator, Mean)


def test_mistakes_say_what_to_do(tmp_path):
    model, optimizer, data, loss_fn = make_problem()
    with pytest.raises(ConfigError, match=r"Trainer\(\.\.\., aggregator=instance\)"):
        TrainerConfig(aggregator=UPGrad())
    with pytest.raises(ConfigError, match="pass its options to its constructor"):
        Trainer(
            model, optimizer, data, loss_fn, config(tmp_path, aggregator_options={"reg_eps": 1e-4}), aggregator=UPGrad()
        )
    with pytest.raises(TypeError, match="Aggregator or a name"):
        Trainer(model, optimizer, data, loss_fn, config(tmp_path), aggregator=lambda m: m.sum(0))


def test_with_a_shared_trunk_the_heads_get_their_plain_gradient(tmp_path):
    model, _, data, _ = make_problem()
    manual = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    Trainer(model, optimizer, data[:1], two_task_loss, config(tmp_path), aggregator=UPGrad(), shared=model.trunk).fit()
    # The same step by hand: trunk aggregated by UPGrad, each head's own loss gradient.
    buf = GradientBuffer(manual, 2, shared=manual.trunk)
    x, _ = data[0]
    losses = two_task_loss(manual(x), data[0])
    buf.backward(losses)
    buf.aggregate(UPGrad())
    with torch.no_grad():
        for p in manual.parameters():
            p -= 0.05 * p.grad
    for p, q in zip(model.parameters(), manual.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # And it is not what aggregating every parameter gives.
    everything, _, _, _ = make_problem()
    Trainer(
        everything,
        torch.optim.SGD(everything.parameters(), lr=0.05),
        data[:1],
        two_task_loss,
        TrainerConfig(device="cpu", run_dir=str(tmp_path / "all"), epochs=1),
        aggregator=UPGrad(),
    ).fit()
    assert not torch.allclose(everything.a.weight, model.a.weight)


def test_clipping_counts_the_heads_too(tmp_path):
    model, _, data, _ = make_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    trainer = Trainer(
        model,
        optimizer,
        data[:1],
        two_task_loss,
        config(tmp_path, safety=SafetyConfig(max_grad_norm=1e-3)),
        shared=model.trunk,
    )
    trainer.fit()
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert total <= 1e-3 * (1 + 1e-5)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.a.parameters())
