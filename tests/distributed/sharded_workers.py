"""Code run by the spawned ranks of the sharded-aggregation tests (issue 19), importable by the children.

One launch per world size runs every case: for the "zero" and "fsdp" shardings, several aggregators
and K in 1, 3, 8, a few training steps on this rank's part of each combined batch; then the trainer's
gradient stage in every mode with a NaN on one rank. Each rank writes what it saw to
``<out>/sharded-rank<r>.json``; tensors travel as ``float.hex`` strings, so equality there is bitwise.
"""

from __future__ import annotations

import json
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard

from tolaria.aggregation import FSDPGradientBuffer, GradientBuffer, ZeroGradientBuffer, build_aggregator
from tolaria.distributed import DistributedContext, fsdp_wrap
from tolaria.distributed.context import import_before_process_group
from tolaria.trainer.gradient import GradientStage

COLLECTIVE_TIMEOUT_S = 30
FEATURES, HIDDEN, BATCH, STEPS = 4, 8, 3, 3
LR, MOMENTUM = 0.1, 0.9
INIT_SEED, AGG_SEED = 100, 1234
AGGREGATORS = ("mean", "pcgrad", "upgrad", "mgda", "graddrop", "trimmed_mean", "excess_mtl")
SOURCES = (1, 3, 8)
MODES = ("zero", "fsdp")


# ---- the problem --------------------------------------------------------------------------------------


class Net(nn.Module):
    """A trunk and one output per source; source 2 pulls output 0 the other way (conflicts)."""

    def __init__(self, k: int):
        super().__init__()
        torch.manual_seed(INIT_SEED)
        self.trunk = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Tanh())
        self.head = nn.Linear(HIDDEN, k)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def losses(out: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    k = out.shape[1]
    result = [((out[:, i] - y[:, i]) ** 2).mean() for i in range(k)]
    if k > 2:
        result[2] = result[2] + ((out[:, 0] + y[:, 0]) ** 2).mean()
    return result


def combined_batch(step: int, world: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s batch over all ranks (rank r holds rows r*BATCH ... (r+1)*BATCH - 1)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(world * BATCH, FEATURES, generator=g, dtype=torch.float64)
    y = torch.randn(world * BATCH, 8, generator=g, dtype=torch.float64)[:, :k]
    return x, y


def aggregator(name: str, k: int, **options: Any):
    kwargs: dict[str, Any] = dict(options)
    if name in ("pcgrad", "graddrop"):
        kwargs["generator"] = torch.Generator().manual_seed(AGG_SEED)
    if name == "trimmed_mean":
        kwargs["trim_number"] = (k - 1) // 2
    return build_aggregator(name, **kwargs)


def optimizer(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)


def hexes(values: torch.Tensor) -> list[str]:
    return [float(v).hex() for v in values.detach().reshape(-1).tolist()]


def full_parameters(net: nn.Module) -> torch.Tensor:
    return torch.cat(
        [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1) for p in net.parameters()]
    )


# ---- harness ------------------------------------------------------------------------------------------


def spawn(world: int, out: Path) -> None:
    """Runs :func:`scenario` on ``world`` spawned ranks over gloo (raises if any rank failed)."""
    mp.spawn(_entry, args=(world, str(out)), nprocs=world, join=True)


def results(world: int, out: Path) -> list[dict[str, Any]]:
    return [json.loads((out / f"sharded-rank{r}.json").read_text()) for r in range(world)]


def _entry(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    import_before_process_group()
    store = dist.FileStore(str(Path(out) / "store"), world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    try:
        ctx = DistributedContext.from_process_group()
        result = scenario(ctx)
        (Path(out) / f"sharded-rank{rank}.json").write_text(json.dumps(result))
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


# ---- the scenario -------------------------------------------------------------------------------------


def _local_batch(step: int, ctx: DistributedContext, k: int, nan: bool = False):
    x, y = combined_batch(step, ctx.world_size, k)
    rows = slice(ctx.rank * BATCH, (ctx.rank + 1) * BATCH)
    x = x[rows].clone()
    if nan:
        x[0, 0] = float("nan")
    return x, y[rows]


def train_case(ctx: DistributedContext, mode: str, name: str, k: int) -> dict[str, Any]:
    net = Net(k)
    if mode == "fsdp":
        fully_shard(net)  # one FSDP unit: fewer collectives per case (the stage case wraps per module)
        buf = GradientBuffer(net, k)  # dispatches on the DTensor parameters
        assert isinstance(buf, FSDPGradientBuffer), type(buf)
    else:
        buf = ZeroGradientBuffer(net, k)
    opt, agg = optimizer(net), aggregator(name, k)
    weights = []
    for step in range(STEPS):
        x, y = _local_batch(step, ctx, k)
        opt.zero_grad()
        buf.backward(losses(net(x), y))
        _, stats = buf.aggregate(agg, return_stats=True)
        weights.extend(hexes(stats.weights))
        opt.step()
    return {"params": hexes(full_parameters(net)), "weights": weights}


def stage_case(ctx: DistributedContext, mode: str) -> dict[str, Any]:
    """The trainer's gradient stage, K = 3, the trunk shared and the head plain; step 1 has a NaN on
    the last rank, and is skipped as the trainer's safety does."""
    k = 3
    net = Net(k)
    if mode == "fsdp":
        fsdp_wrap(net, ctx)
    opt = optimizer(net)
    stage = GradientStage(
        net,
        aggregator("upgrad", k, nonfinite="propagate"),
        ctx=ctx,
        shared=net.trunk,
        sharding=mode,
        max_grad_norm=0.5,
    )
    seen = []
    for step in range(STEPS):
        x, y = _local_batch(step, ctx, k, nan=step == 1 and ctx.rank == ctx.world_size - 1)
        stage.zero_grad()
        stats = stage.backward({f"s{i}": loss for i, loss in enumerate(losses(net(x), y))})
        seen.append({"finite": stats.finite, "grad_norm": float(stats.grad_norm).hex(), "norms": stats.norms})
        if stats.finite:
            opt.step()
    return {"params": hexes(full_parameters(net)), "steps": seen, "buffer": type(stage.buffer).__name__}


def scenario(ctx: DistributedContext) -> dict[str, Any]:
    cases = {
        f"{mode}/{name}/{k}": train_case(ctx, mode, name, k) for mode in MODES for name in AGGREGATORS for k in SOURCES
    }
    stages = {mode: stage_case(ctx, mode) for mode in ("none", *MODES)}
    return {"cases": cases, "stages": stages}
