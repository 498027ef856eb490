"""tolaria.compat.pcgrad.PCGrad against a plain reimplementation of Pytorch-PCGrad's algorithm."""

import random

import pytest
import torch
from torch import nn

import tolaria.aggregation
from tolaria.compat.pcgrad import PCGrad

from .reference_pcgrad import ReferencePCGrad


class ThreeHeads(nn.Module):
    """A trunk shared by three heads, a head only some objectives reach, and a frozen layer."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(3))

    def forward(self, x):
        z = self.trunk(self.frozen(x))
        return [head(z).squeeze(-1) for head in self.heads]


def _objectives(model, x, y):
    a, b, c = model(x)
    # Objective 3 reaches head b too: head b is shared by two objectives, not by all three.
    return [((a - y[:, 0]) ** 2).mean(), ((b - y[:, 1]) ** 2).mean(), ((c + b - y[:, 0]) ** 2).mean()]


def _train(wrapper_class, reduction, steps=12, seed=0):
    torch.manual_seed(0)
    model = ThreeHeads().double()
    optimizer = torch.optim.Adam([p for p in model.parameters()], lr=1e-2, weight_decay=1e-3)
    wrapper = wrapper_class(optimizer, reduction=reduction)
    gen = torch.Generator().manual_seed(1)
    random.seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 6, generator=gen, dtype=torch.float64)
        y = torch.stack([x[:, 0] - x[:, 1], -x[:, 0] + 0.5 * x[:, 2]], 1)
        wrapper.pc_backward(_objectives(model, x, y))
        wrapper.step()
    return model, random.random()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_changing_the_import_reproduces_the_original_training(reduction):
    ours, our_next_draw = _train(PCGrad, reduction)
    reference, reference_next_draw = _train(ReferencePCGrad, reduction)
    for p, q in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert our_next_draw == reference_next_draw  # the same draws from Python's random, no more


def test_heads_get_the_sum_and_the_trunk_the_mean_and_unreached_parameters_zeros():
    torch.manual_seed(3)
    model = ThreeHeads().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapper = PCGrad(optimizer)
    x = torch.randn(8, 6, dtype=torch.float64)
    a, b, c = model(x)
    losses = [a.mean(), a.mean() * 0.5, b.mean()]  # head c is reached by no objective
    wrapper.pc_backward(losses)
    assert torch.equal(model.heads[2].weight.grad, torch.zeros_like(model.heads[2].weight))
    assert torch.equal(model.frozen.weight.grad, torch.zeros_like(model.frozen.weight))
    # No conflicts between these three: head a's gradient is the plain sum, head b's its own.
    ga = torch.autograd.grad(a.mean() * 1.5, model.heads[0].weight, retain_graph=True)[0]
    torch.testing.assert_close(model.heads[0].weight.grad, ga)
    trunk = torch.autograd.grad(sum(losses), model.trunk[0].weight)[0]
    torch.testing.assert_close(model.trunk[0].weight.grad, trunk / 3)


def test_torchs_global_generator_is_not_touched():
    torch.manual_seed(5)
    model = ThreeHeads()
    wrapper = PCGrad(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    state = torch.get_rng_state()
    wrapper.pc_backward(_objectives(model, x, y))
    assert torch.equal(torch.get_rng_state(), state)


def test_methods_of_the_original_delegate_to_the_optimizer():
    model = ThreeHeads()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    wrapper = PCGrad(optimizer)
    assert wrapper.optimizer is optimizer and wrapper.param_groups is optimizer.param_groups
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    wrapper.pc_backward(_objectives(model, x, y))
    wrapper.step()
    state = wrapper.state_dict()
    assert state["state"]  # Adam's moments after one step
    wrapper.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    fresh = PCGrad(torch.optim.Adam(ThreeHeads().parameters(), lr=1e-3))
    fresh.load_state_dict(state)
    assert fresh.state_dict()["state"].keys() == state["state"].keys()


def test_mistakes_say_what_to_do():
    with pytest.raises(TypeError, match="torch.optim.Optimizer.*tolaria.aggregation.PCGrad"):
        PCGrad(ThreeHeads())
    with pytest.raises(ValueError, match="valid reductions are mean, sum"):
        PCGrad(torch.optim.SGD(ThreeHeads().parameters(), lr=0.1), reduction="max")
    with pytest.raises(TypeError, match="tolaria.compat.pcgrad.PCGrad"):
        tolaria.aggregation.PCGrad(torch.optim.SGD(ThreeHeads().parameters(), lr=0.1))
    wrapper = PCGrad(torch.optim.SGD(ThreeHeads().parameters(), lr=0.1))
    with pytest.raises(TypeError, match="list of objectives"):
        wrapper.pc_backward(torch.zeros((), requires_grad=True))
