"""Code run by the spawned ranks of the sharded-aggregation tests (issue 19), importable by the children.

One launch per world size runs every case: for the "zero" and "fsdp" shardings, several aggregators
and K in 1, 3, 8, a few training steps on this rank's part of each combined batch; then the trainer's
gradient stage in every mode with a NaN on one rank. Each rank writes what it saw to
``<out>/sharded-rank<r>.json``; tensors travel as ``float.hex`` strings, so equality there is bitwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard

from tolaria.aggregation import FSDPGradientBuffer, GradientBuffer, ZeroGradientBuffer, build_aggregator
from tolaria.distributed import DistributedContext, allreduce_gradient_buffer, fsdp_wrap
from tolaria.trainer.gradient import GradientStage

from .gloo_group import gloo_rank

COLLECTIVE_TIMEOUT_S = 30
FEATURES, HIDDEN, BATCH, STEPS = 4, 8, 3, 3
LR, MOMENTUM = 0.1, 0.9
INIT_SEED, AGG_SEED = 100, 1234
AGGREGATORS = ("mean", "pcgrad", "upgrad", "mgda", "graddrop", "excess_mtl")  # all 24: test_sharded_aggregation
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
    with gloo_rank(rank, world, Path(out), COLLECTIVE_TIMEOUT_S) as ctx:
        result = scenario(ctx, Path(out))
        (Path(out) / f"sharded-rank{rank}.json").write_text(json.dumps(result))


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


# ---- bytes per step, counted at the collectives --------------------------------------------------------

_OUT, _IN = ("output", "output_tensor", "tensor"), ("input", "input_tensor")
_COUNTED = {  # name -> (kind, ring bytes this rank sends, from the call's tensors and the world size W)
    "all_reduce": ("all_reduce", lambda out, inp, w: 2 * _nbytes(out) * (w - 1) // w),
    "reduce_scatter_single": ("reduce_scatter", lambda out, inp, w: _nbytes(out) * (w - 1)),
    "reduce_scatter_tensor": ("reduce_scatter", lambda out, inp, w: _nbytes(out) * (w - 1)),
    "all_gather_single": ("all_gather", lambda out, inp, w: _nbytes(inp) * (w - 1)),
    "all_gather_into_tensor": ("all_gather", lambda out, inp, w: _nbytes(inp) * (w - 1)),
}


def _tensor_arg(args: tuple, kwargs: dict, index: int, names: tuple[str, ...]) -> torch.Tensor | None:
    if len(args) > index:
        return args[index]
    return next((kwargs[n] for n in names if n in kwargs), None)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CountBytes:
    """Counts the ring bytes each collective called through ``torch.distributed`` sends from this rank
    (all-reduce 2 M (W - 1) / W, reduce-scatter and all-gather M (W - 1) / W), by kind; nested calls
    (a deprecated name calling the new one) count once."""

    def __init__(self, world: int):
        self.world, self.by_kind, self._depth, self._saved = world, {}, 0, {}

    def __enter__(self) -> CountBytes:
        for name in _COUNTED:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original

            def counted(*args, _original=original, _entry=_COUNTED[name], **kwargs):
                if self._depth == 0:
                    kind, cost = _entry
                    out, inp = _tensor_arg(args, kwargs, 0, _OUT), _tensor_arg(args, kwargs, 1, _IN)
                    self.by_kind[kind] = self.by_kind.get(kind, 0) + cost(out, inp, self.world)
                self._depth += 1
                try:
                    return _original(*args, **kwargs)
                finally:
                    self._depth -= 1

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())


class Wide(nn.Module):
    """About 10k parameters, so that the K x K Gram is small beside the gradients, as in real models."""

    def __init__(self, k: int):
        super().__init__()
        torch.manual_seed(INIT_SEED)
        self.trunk = nn.Sequential(nn.Linear(64, 128), nn.Tanh())
        self.head = nn.Linear(128, k)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def bytes_case(ctx: DistributedContext, k: int = 8) -> dict[str, Any]:
    """Bytes sent by this rank in the gradient path of one step (after one warm-up step), per mode,
    and FSDP2 on one summed loss for the fsdp comparison."""
    g = torch.Generator().manual_seed(ctx.rank)
    x = torch.randn(BATCH, 64, generator=g, dtype=torch.float64)
    y = torch.randn(BATCH, k, generator=g, dtype=torch.float64)
    agg = aggregator("upgrad", k)
    counted: dict[str, Any] = {}
    for mode in ("none", "zero", "fsdp", "fsdp_summed"):
        net = Wide(k)
        if mode.startswith("fsdp"):
            fsdp_wrap(net, ctx)
        buf = None
        if mode == "none":
            buf = GradientBuffer(net, k)
        elif mode == "zero":
            buf = ZeroGradientBuffer(net, k)
        elif mode == "fsdp":
            buf = GradientBuffer(net, k)
        for step in range(2):
            with CountBytes(ctx.world_size) as count:
                if buf is None:
                    sum(losses(net(x), y)).backward()
                else:
                    buf.backward(losses(net(x), y))
                    if mode == "none":
                        allreduce_gradient_buffer(buf, ctx)
                    buf.aggregate(agg)
            if step == 1:
                counted[mode] = dict(count.by_kind, total=count.total)
        counted[f"{mode}_numel"] = sum(p.numel() for p in net.parameters())
        if buf is not None:
            counted[f"{mode}_rows"] = list(buf.buffer.shape)  # this rank's K x n_r (K x N replicated)
    return counted


def trainer_case(ctx: DistributedContext, out: Path) -> dict[str, Any]:
    """The Trainer under each ``[distributed] sharding`` (fsdp: the model wrapped before the optimizer is
    built); the sharded runs must end where the replicated one does."""
    from torch.utils.data import DataLoader, TensorDataset

    from tolaria.trainer import TelemetryConfig, Trainer, TrainerConfig
    from tolaria.trainer.config import DistributedConfig

    x, y = combined_batch(99, 4, 3)
    result = {}
    for mode in ("none", *MODES):
        net = Net(3)
        if mode == "fsdp":
            fsdp_wrap(net, ctx)
        config = TrainerConfig(
            epochs=1,
            device="cpu",
            seed=AGG_SEED,
            run_dir=str(out / f"trainer-{mode}"),
            telemetry=TelemetryConfig(log_every_steps=1),
            distributed=DistributedConfig(sharding=mode),
        )
        loader = DataLoader(TensorDataset(x, y), batch_size=2, shuffle=True)

        def loss_fn(outputs, batch):
            return {f"s{i}": loss for i, loss in enumerate(losses(outputs, batch[1]))}

        trainer = Trainer(net, optimizer(net), loader, loss_fn, config, ctx=ctx)
        summary = trainer.fit()
        result[mode] = {
            "params": hexes(full_parameters(net)),
            "status": summary.status,
            "steps": summary.steps,
            "buffer": type(trainer.stage.buffer).__name__,
        }
    return result


def scenario(ctx: DistributedContext, out: Path) -> dict[str, Any]:
    cases = {
        f"{mode}/{name}/{k}": train_case(ctx, mode, name, k) for mode in MODES for name in AGGREGATORS for k in SOURCES
    }
    stages = {mode: stage_case(ctx, mode) for mode in ("none", *MODES)}
    return {
        "cases": cases,
        "stages": stages,
        "bytes": bytes_case(ctx) if ctx.world_size == 4 else None,
        "trainer": trainer_case(ctx, out) if ctx.world_size == 2 else None,
    }
