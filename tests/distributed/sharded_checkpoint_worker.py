"""Four gloo ranks train an FSDP2 model, write DCP checkpoints; two of them resume (resharded).

One launch checks: the 4-rank write, a corrupted newest checkpoint refused and the previous one
used, uncommitted folders ignored and removed, the values equal after resuming on a 2-rank group,
and a rollback snapshot of the FSDP2 model restoring each rank's own shard. Every rank writes a JSON
result; ``tests/distributed/test_sharded_checkpoints.py`` checks them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .gloo_group import gloo_rank

__all__ = ["WORLD_SIZE", "RESUME_WORLD_SIZE", "run"]

WORLD_SIZE = 4
RESUME_WORLD_SIZE = 2
_TIMEOUT_S = 60


def _model(mesh: Any) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    # Sizes that 4 and 2 do not divide: FSDP2 pads the shards, DCP must still reshard them exactly.
    net = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5)).double()
    for layer in (net[0], net[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def _train(net: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, rank: int) -> None:
    for step in range(steps):
        g = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(6, 7, dtype=torch.float64, generator=g)
        optimizer.zero_grad()
        net(x).square().mean().backward()
        optimizer.step()


def _full(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, list[float]]:
    """Every parameter and Adam moment, unsharded (a collective), as float lists."""
    values = {name: p.full_tensor().reshape(-1).tolist() for name, p in net.named_parameters()}
    for name, p in net.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            values[f"{name}.{key}"] = optimizer.state[p][key].full_tensor().reshape(-1).tolist()
        values[f"{name}.step"] = [float(optimizer.state[p]["step"])]
    return values


def _scenario(rank: int, root: Path) -> dict[str, Any]:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    from tolaria.state import StateManager
    from tolaria.state.sharded_checkpoints import ShardedCheckpointStore
    from tolaria.telemetry import MemorySink, TelemetryEmitter

    result: dict[str, Any] = {}
    ckpt = root / "ckpt"
    net = _model(init_device_mesh("cpu", (WORLD_SIZE,)))
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.01)
    store = ShardedCheckpointStore(ckpt, keep_last=3)
    _train(net, optimizer, 2, rank)
    generator_state = torch.Generator().manual_seed(7).get_state()
    store.write(2, net, optimizer, extra={"lr": {"base": 0.05}, "generator": generator_state, "sources": ["a", "b"]})
    result["written_2"] = _full(net, optimizer)
    result["local_numel"] = net[0].weight.to_local().numel()

    # Rollback snapshots hold this rank's shard and restore it in place.
    with StateManager(root / f"state-rank{rank}", fast_cache_mb=16, keep_last=1) as state:
        info = state.snapshot(2, net, optimizer)
        result["snapshot_bytes"] = info.nbytes
        _train(net, optimizer, 1, rank)
        moved = _full(net, optimizer)
        rolled = state.rollback(2, net, optimizer, deadline_s=30.0)
        result["rollback_ok"], result["rollback_tier"] = rolled.ok, rolled.tier
        result["after_rollback"] = _full(net, optimizer)
        result["moved_by_step"] = moved != result["written_2"]

    _train(net, optimizer, 1, rank)
    store.write(3, net, optimizer, extra={"lr": {"base": 0.05}, "generator": generator_state, "sources": ["a", "b"]})
    result["entries"] = [[e.step, e.world_size, sorted(e.files)] for e in store.entries]
    dist.barrier()
    if rank == 0:
        newest = ckpt / store.entries[-1].dir
        victim = sorted(p for p in newest.iterdir() if p.name.endswith(".distcp"))[-1]
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
        victim.write_bytes(bytes(data))
        (ckpt / ".tmp-ckpt-000000000009-00000098").mkdir()  # a write that never committed
        (ckpt / "ckpt-000000000009-00000099").mkdir()  # renamed, but the manifest never listed it
        (ckpt / "ckpt-000000000009-00000099" / "extra.pt").write_bytes(b"junk")
    dist.barrier()

    subgroup = dist.new_group(list(range(RESUME_WORLD_SIZE)))  # every rank takes part in creating it
    if rank < RESUME_WORLD_SIZE:
        sink = MemorySink()
        telemetry = TelemetryEmitter([sink], batch_size=1)
        mesh = DeviceMesh.from_group(subgroup, "cpu")
        fresh = _model(mesh)
        fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.5, weight_decay=0.0)
        resumed = ShardedCheckpointStore(ckpt, keep_last=3, group=subgroup, telemetry=telemetry)
        restored = resumed.load_newest(fresh, fresh_optimizer)
        telemetry.close()
        result["restored_step"] = restored.step
        result["restored_extra_ok"] = bool(
            torch.equal(restored.extra["generator"], generator_state)
            and restored.extra["lr"] == {"base": 0.05}
            and restored.extra["sources"] == ["a", "b"]
        )
        result["resumed"] = _full(fresh, fresh_optimizer)
        result["resumed_local_numel"] = fresh[0].weight.to_local().numel()
        result["lr_after_resume"] = fresh_optimizer.param_groups[0]["lr"]
        result["events"] = [[r.get("kind"), r.get("message", "")] for r in sink.records]
        result["leftovers_after"] = sorted(p.name for p in ckpt.iterdir())
    dist.barrier()
    return result


def _entry(rank: int, root: str) -> None:
    with gloo_rank(rank, WORLD_SIZE, Path(root), _TIMEOUT_S):
        result = _scenario(rank, Path(root))
        (Path(root) / f"rank{rank}.json").write_text(json.dumps(result))


def run(root: Path) -> list[dict[str, Any]]:
    """Runs the scenario on WORLD_SIZE spawned ranks; returns every rank's result."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # A fork server that imported torch and DCP once forks the four ranks (a clean single-threaded
    # parent, unlike this test process): four fresh interpreters importing torch would take longer
    # than the test itself on a 2-core machine.
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed.checkpoint", __name__])
    mp.start_processes(_entry, args=(str(root),), nprocs=WORLD_SIZE, join=True, start_method="forkserver")
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
