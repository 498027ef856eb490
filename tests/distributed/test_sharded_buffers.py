"""The sharded gradient buffers and the stage's sharding in one process: a gloo group of one rank, where
the "zero" and "fsdp" buffers must give exactly what GradientBuffer gives, and refuse what they cannot do."""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from tolaria.aggregation import (
    ExcessMTL,
    FSDPGradientBuffer,
    GradDrop,
    GradientBuffer,
    Mean,
    PCGrad,
    UPGrad,
    ZeroGradientBuffer,
)
from tolaria.distributed import SHARDING_MODES, DistributedContext, check_sharding, release_process_groups
from tolaria.trainer.gradient import GradientStage


@pytest.fixture
def group_of_one(tmp_path):
    """A gloo process group of one rank, destroyed and freed after the test (others expect none; an
    FSDP2 model's caches would keep it, and its threads, alive in this process until it exits)."""
    assert not dist.is_initialized()
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=20))
    try:
        yield DistributedContext.from_process_group()
    finally:
        release_process_groups()


def _net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _losses(net: nn.Module, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    out = net(x)
    return [
        ((out[:, 0] - y[:, 0]) ** 2).mean(),
        ((out[:, 0] + y[:, 1]) ** 2).mean(),
        ((out[:, 2] - y[:, 2]) ** 2).mean(),
    ]


def _train(net, buffer, aggregator, steps=3):
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        opt.zero_grad()
        buffer.backward(_losses(net, step))
        buffer.aggregate(aggregator)
        opt.step()
    return torch.cat(
        [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1) for p in net.parameters()]
    )


@pytest.mark.parametrize(
    "make", [lambda: UPGrad(), lambda: PCGrad(seed=4), lambda: GradDrop(seed=4), lambda: ExcessMTL()]
)
def test_one_rank_buffers_equal_the_plain_buffer(group_of_one, make):
    reference_net = _net()
    expected = _train(reference_net, GradientBuffer(reference_net, 3), make())

    zero_net = _net()
    zero = ZeroGradientBuffer(zero_net, 3)
    torch.testing.assert_close(_train(zero_net, zero, make()), expected, rtol=0, atol=1e-14)
    assert zero.shard.shape == (3, zero.numel) and zero.columns == 0

    fsdp_net = _net()
    fully_shard(fsdp_net)
    fsdp = GradientBuffer(fsdp_net, 3)
    assert isinstance(fsdp, FSDPGradientBuffer)
    torch.testing.assert_close(_train(fsdp_net, fsdp, make()), expected, rtol=0, atol=1e-14)
    assert fsdp.columns == [(0, 35), (35, 7), (42, 21), (63, 3)]
    assert all(type(p.grad).__name__ == "DTensor" for p in fsdp_net.parameters())


def test_shared_trunk_heads_keep_their_plain_gradient_and_carries_are_added(group_of_one):
    net = _net()
    reference = copy.deepcopy(net)
    buf = ZeroGradientBuffer(net, 3, shared=net[0])
    ref_buf = GradientBuffer(reference, 3, shared=reference[0])
    for model, b in ((net, buf), (reference, ref_buf)):
        model[0].weight.grad = torch.ones_like(model[0].weight)  # found at the first source: carried
        b.backward(_losses(model, 0))
        b.aggregate(Mean())
    for p, q in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-15)
    assert buf.unshared_params == list(net[2].parameters())


def test_a_source_entered_twice_accumulates_like_gradient_buffer(group_of_one):
    net, reference = _net(), _net()
    buf, ref_buf = ZeroGradientBuffer(net, 3), GradientBuffer(reference, 3)
    for model, b in ((net, buf), (reference, ref_buf)):
        for seed in (0, 1):  # two micro-batches
            b.backward(_losses(model, seed))
        b.aggregate(UPGrad())
    torch.testing.assert_close(buf.output, ref_buf.output, rtol=0, atol=1e-14)


def test_what_the_sharded_buffers_refuse(group_of_one):
    net = _net()
    with pytest.raises(TypeError, match=r"ZeroGradientBuffer does not take \['accumulate'\]"):
        ZeroGradientBuffer(net, 3, accumulate=False)
    buf = ZeroGradientBuffer(net, 3)
    with pytest.raises(TypeError, match="foreign callable"):
        buf.aggregate(lambda j: j.sum(0))
    with pytest.raises(RuntimeError, match="parameter 0's .grad was replaced while source 1"), buf.source(1):
        net[0].weight.grad = torch.zeros_like(net[0].weight)
    with pytest.raises(ValueError, match="not a function of the Gram matrix|cannot run on column shards"):
        buf.aggregate(GradDrop(f=torch.sigmoid, backend="torch"))
    with pytest.raises(ValueError, match="FSDPGradientBuffer needs every shared parameter sharded on dim 0"):
        FSDPGradientBuffer(_net(), 3)


def test_the_stage_picks_the_buffer_of_its_sharding_and_says_what_fsdp_needs(group_of_one):
    assert SHARDING_MODES == ("none", "zero", "fsdp") and check_sharding("zero") == "zero"
    with pytest.raises(ValueError, match="unknown sharding 'ddp'; valid modes are none, zero, fsdp"):
        check_sharding("ddp")
    ctx = group_of_one
    net = _net()
    stage = GradientStage(net, UPGrad(nonfinite="propagate"), ctx=ctx, sharding="zero")
    stats = stage.backward({f"s{i}": loss for i, loss in enumerate(_losses(net, 0))})
    assert isinstance(stage.buffer, ZeroGradientBuffer) and stats.finite
    with pytest.raises(
        ValueError, match=r"sharding='fsdp' needs a model wrapped by torch.distributed.fsdp.fully_shard"
    ):
        GradientStage(net, UPGrad(), ctx=ctx, sharding="fsdp")  # at construction, before any step
    with pytest.raises(ValueError, match=r"GradDrop\(f=.*cannot run on column shards"):
        GradientStage(net, GradDrop(f=torch.sigmoid, backend="torch"), ctx=ctx, sharding="zero")
