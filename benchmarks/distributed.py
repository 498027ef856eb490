"""Per-step communication, memory and time of the sharding modes, on CPU ranks (gloo), side by side:

- ``none``: the replicated K x N buffer, all-reduced (``GradientStage(sharding="none")``);
- ``zero``: the buffer reduce-scattered by columns, the aggregate all-gathered (``sharding="zero"``);
- ``fsdp``: the model wrapped by FSDP2's ``fully_shard``, each source's gradient reduce-scattered by
  FSDP2 into the buffer's local row (``sharding="fsdp"``);
- ``fsdp2``: the baseline: plain FSDP2 training the same model on ONE summed loss (no Tolaria).

    python benchmarks/distributed.py                                  # W = 2, 4; K = 2, 4, 8; 10.5M params
    python benchmarks/distributed.py --world-sizes 2 --sources 2 --steps 2
    python -m pytest benchmarks/distributed.py --benchmark-only      # pytest-benchmark: W = 2, K = 2

The model: a trunk of four linear layers (512 -> 2048 -> 2048 -> 2048 -> 512, 10.5M parameters,
float32, aggregated) and K one-output heads (plain gradients); AdamW; 32 rows per rank and step; the
sources are the heads' mean squared errors. Every mode trains the same model on the same data.

What is measured, per rank and step (every rank reports; the table shows the largest over ranks):

- ``wire MB``: bytes this process wrote to its sockets during the timed steps, per step, COUNTED by
  the kernel (``wchar`` of ``/proc/self/io``; gloo sends with ``write``/``writev``; no file is
  written during a step). This is what gloo's algorithms send; note that gloo implements
  reduce-scatter as an all-reduce (measured: the same bytes as an all-reduce of the input), so on
  gloo the reduce-scatter of the sharded modes costs what an all-reduce costs.
- ``ring MB``: the payload of every collective of one step, COUNTED at the c10d dispatcher (a
  ``TorchDispatchMode`` that records each ``c10d``/``_c10d_functional`` op and its tensors' bytes),
  turned into the bytes a ring algorithm (NCCL's) sends per rank: all-reduce 2 (W - 1) / W of the
  tensor, reduce-scatter (W - 1) / W of the input, all-gather (W - 1) / W of the output, broadcast the
  tensor. ``collectives`` lists the ops and their payload, so the formula can be read off.
- ``buffer MB``: the gradient buffer's own storage on this rank (``K x N`` or ``K x N / W``), counted
  from the tensor; ``peak RSS MB``: the process's peak resident set during a step (``VmHWM`` of
  ``/proc/self/status``, reset before each step through ``/proc/self/clear_refs``; torch has no CPU
  allocator statistics; glibc may reuse freed pages, so this is a lower bound of the step's need).
- ``step s``: the median wall time of the timed steps (after one warm-up step), measured without the
  dispatch counter (which slows every op).

Machine notes go with the printed table (torch, CPU, ISA). The ranks share the machine's cores, so
the step times of W = 4 on 2 cores are not a scaling figure; bytes and memory do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

MODES = ("none", "zero", "fsdp", "fsdp2")
WIDTHS = (512, 2048, 2048, 2048, 512)
BATCH = 32


# ---- what is counted ------------------------------------------------------------------------------


def wchar() -> int:
    """Bytes this process has written through write-type system calls (sockets included)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar line")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class CollectiveCounter(TorchDispatchMode):
    """Records every c10d collective dispatched while active: op name, calls and payload bytes."""

    def __init__(self, world_size: int):
        super().__init__()
        self.world_size = world_size
        self.ops: dict[str, list[int]] = {}  # name -> [calls, payload bytes, ring bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in ("c10d", "_c10d_functional"):
            self._record(func.__name__.split(".")[0], args)
        return func(*args, **kwargs)

    def _record(self, name: str, args: tuple) -> None:
        w = self.world_size
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
        flat = [t for group in lists for t in group]
        if name in ("allreduce_", "all_reduce", "allreduce_coalesced_"):
            payload = sum(map(_nbytes, flat or tensors))
            ring = 2 * (w - 1) * payload / w
        elif name in ("_reduce_scatter_base_", "reduce_scatter_tensor", "reduce_scatter_"):
            # _reduce_scatter_base_(output, input): the input is the full tensor
            payload = _nbytes(tensors[1]) if len(tensors) > 1 else sum(map(_nbytes, flat)) // max(1, len(lists))
            ring = (w - 1) * payload / w
        elif name in ("_allgather_base_", "all_gather_into_tensor", "allgather_"):
            payload = _nbytes(tensors[0]) if tensors else sum(map(_nbytes, flat))  # the output, all ranks' parts
            ring = (w - 1) * payload / w
        elif name in ("broadcast_", "broadcast"):
            payload = sum(map(_nbytes, flat or tensors))
            ring = payload
        elif name in ("barrier", "monitored_barrier_"):
            payload, ring = 0, 0
        else:
            payload = sum(map(_nbytes, flat or tensors))
            ring = payload
        entry = self.ops.setdefault(name, [0, 0, 0])
        entry[0] += 1
        entry[1] += payload
        entry[2] += int(ring)


# ---- the model and one mode's step ---------------------------------------------------------------


class Net(nn.Module):
    def __init__(self, sources: int):
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip(WIDTHS[:-1], WIDTHS[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        self.trunk = nn.Sequential(*layers[:-1])
        self.heads = nn.ModuleList(nn.Linear(WIDTHS[-1], 1) for _ in range(sources))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.trunk(x)
        return [head(h).squeeze(-1) for head in self.heads]


def trunk_params() -> int:
    return sum(a * b + b for a, b in zip(WIDTHS[:-1], WIDTHS[1:]))


def _batch(rank: int, step: int, sources: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, WIDTHS[0], generator=g), torch.randn(sources, BATCH, generator=g)


def _losses(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"s{k}": (out - y[k]).square().mean() for k, out in enumerate(net(x))}


def _setup(mode: str, sources: int, ctx: Any) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    net = Net(sources)
    if mode in ("fsdp", "fsdp2"):
        from tolaria.distributed import fsdp_wrap

        fsdp_wrap(net, ctx)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    if mode == "fsdp2":
        return net, optimizer, None
    from tolaria.aggregation import UPGrad
    from tolaria.trainer.gradient import GradientStage

    stage = GradientStage(net, UPGrad(), ctx=ctx, shared=net.trunk, sharding=mode)
    return net, optimizer, stage


def _step(net: nn.Module, optimizer: torch.optim.Optimizer, stage: Any, x: torch.Tensor, y: torch.Tensor) -> None:
    if stage is None:  # FSDP2 on one summed loss
        optimizer.zero_grad()
        sum(_losses(net, x, y).values()).backward()
        optimizer.step()
        return
    stage.zero_grad()
    stage.backward(_losses(net, x, y))
    optimizer.step()
    after_step = getattr(stage, "after_step", None)
    if after_step is not None:
        after_step()


def measure(mode: str, sources: int, steps: int, ctx: Any) -> dict[str, Any]:
    """One mode on this rank: the counted step, the timed steps, memory; returns this rank's figures."""
    rank, world = ctx.rank, ctx.world_size
    net, optimizer, stage = _setup(mode, sources, ctx)
    _step(net, optimizer, stage, *_batch(rank, 0, sources))  # warm-up: buffers built, optimizer state made
    counter = CollectiveCounter(world)
    dist.barrier()
    with counter:
        _step(net, optimizer, stage, *_batch(rank, 1, sources))
    times, peaks = [], []
    dist.barrier()
    written = wchar()
    for step in range(steps):
        x, y = _batch(rank, 2 + step, sources)
        reset_peak_rss()
        start = time.perf_counter()
        _step(net, optimizer, stage, x, y)
        times.append(time.perf_counter() - start)
        peaks.append(_status_kb("VmHWM") * 1024)
    written = wchar() - written
    dist.barrier()
    buffer = getattr(getattr(stage, "buffer", None), "buffer", None)
    result = {
        "wire": written / steps,
        "ring": sum(v[2] for v in counter.ops.values()),
        "ops": {name: v[:2] for name, v in sorted(counter.ops.items())},
        "buffer": buffer.untyped_storage().nbytes() if buffer is not None else 0,
        "peak_rss": max(peaks),
        "step_s": statistics.median(times),
    }
    del net, optimizer, stage
    return result


# ---- one launch per world size -------------------------------------------------------------------


def _rank_main(rank: int, world: int, out: str, modes: list[str], sources: list[int], steps: int) -> None:
    torch.set_num_threads(1)
    from tolaria.distributed import DistributedContext

    store = dist.FileStore(str(Path(out) / "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=900))
    rows = []
    try:
        ctx = DistributedContext.from_process_group()
        for k in sources:
            for mode in modes:
                mine = measure(mode, k, steps, ctx)
                everyone: list[Any] = [None] * world
                dist.all_gather_object(everyone, mine)
                rows.append({"mode": mode, "world": world, "sources": k, "ranks": everyone})
        if rank == 0:
            (Path(out) / "rows.json").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def run(world: int, modes: list[str], sources: list[int], steps: int) -> list[dict[str, Any]]:
    """Every (K, mode) on ``world`` gloo ranks of this machine; rows of per-rank figures."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed"])
    with tempfile.TemporaryDirectory(prefix="tolaria-dist-bench-") as out:
        torch.multiprocessing.start_processes(
            _rank_main, args=(world, out, modes, sources, steps), nprocs=world, join=True, start_method="forkserver"
        )
        return json.loads((Path(out) / "rows.json").read_text())


def summarize(row: dict[str, Any]) -> dict[str, Any]:
    ranks = row["ranks"]
    return {
        "mode": row["mode"],
        "world": row["world"],
        "sources": row["sources"],
        "wire": max(r["wire"] for r in ranks),
        "ring": max(r["ring"] for r in ranks),
        "buffer": max(r["buffer"] for r in ranks),
        "peak_rss": max(r["peak_rss"] for r in ranks),
        "step_s": max(r["step_s"] for r in ranks),
        "ops": ranks[0]["ops"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    mb = 1e6
    lines = [
        f"{'W':>2} {'K':>2} {'mode':<6} {'wire MB':>9} {'ring MB':>9} {'ring/none':>9} {'buffer MB':>10} "
        f"{'peak RSS MB':>11} {'step s':>7}  collectives of one step (calls x op: payload MB)"
    ]
    summaries = [summarize(r) for r in rows]
    base = {(s["world"], s["sources"]): s["ring"] for s in summaries if s["mode"] == "none"}
    for s in summaries:
        ratio = s["ring"] / base[(s["world"], s["sources"])] if base.get((s["world"], s["sources"])) else float("nan")
        ops = ", ".join(f"{c}x {name}: {b / mb:.1f}" for name, (c, b) in s["ops"].items())
        lines.append(
            f"{s['world']:>2} {s['sources']:>2} {s['mode']:<6} {s['wire'] / mb:>9.1f} {s['ring'] / mb:>9.1f} "
            f"{ratio:>9.2f} {s['buffer'] / mb:>10.1f} {s['peak_rss'] / mb:>11.0f} {s['step_s']:>7.2f}  {ops}"
        )
    return "\n".join(lines)


def machine() -> str:
    try:
        from tolaria.aggregation.backends.cpu import cpu_isa

        isa = cpu_isa()
    except Exception as exc:  # the figures do not depend on it; say why it is missing
        isa = f"unknown ({type(exc).__name__})"
    return (
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, ISA {isa}, gloo, "
        f"trunk N = {trunk_params() / 1e6:.1f}M float32 params, batch {BATCH} per rank"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--sources", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (after one warm-up, one counted)")
    args = parser.parse_args(argv)
    print(f"tolaria sharded modes benchmark -- {machine()}", flush=True)
    rows = []
    for world in args.world_sizes:
        start = time.perf_counter()
        rows += run(world, args.modes, args.sources, args.steps)
        print(f"(W = {world}: {time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    print(table(rows))
    return 0


# ---- pytest-benchmark form -------------------------------------------------------------------------

BENCH_WORLD = int(os.environ.get("TOLARIA_BENCH_WORLD", "2"))
BENCH_SOURCES = int(os.environ.get("TOLARIA_BENCH_SOURCES", "2"))


@pytest.mark.parametrize("mode", MODES)
def test_distributed_step(benchmark, mode):
    """One launch of BENCH_WORLD ranks for ``mode`` (the benchmark's time is the launch's); the per-step
    figures (median step, wire and ring bytes, buffer, peak RSS; the largest over ranks) in extra_info."""
    benchmark.group = f"sharding modes, W = {BENCH_WORLD}, K = {BENCH_SOURCES}, N = {trunk_params() / 1e6:.1f}M"
    rows = benchmark.pedantic(lambda: run(BENCH_WORLD, [mode], [BENCH_SOURCES], 2), rounds=1, iterations=1)
    summary = summarize(rows[0])
    benchmark.extra_info.update({key: summary[key] for key in ("wire", "ring", "buffer", "peak_rss", "step_s")})


if __name__ == "__main__":
    sys.exit(main())
