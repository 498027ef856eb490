"""Code run by the spawned ranks of the multi-process tests (importable by the children).

Each scenario runs on every rank of a gloo process group initialised through a ``FileStore`` and
writes what it saw to ``<out>/<scenario>-rank<r>.json`` for the test to check. Tensors travel as
lists of ``float.hex`` strings, so equality there is bitwise.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DistributedSampler, TensorDataset

from tolaria.aggregation import GradientBuffer, PCGrad
from tolaria.distributed import (
    agree_on_emergency,
    allreduce_gradient_buffer,
    any_rank,
    broadcast_json,
    broadcast_module_state,
    checkpoint_barrier,
    rank_telemetry,
    resume_from_checkpoint,
    shard,
    synchronized_generator,
    verify_replicas,
)
from tolaria.emergency import EmergencyController, EmergencyLevel, LocalEmergencySignal
from tolaria.state import StateManager
from tolaria.telemetry import MemorySink, TelemetryEmitter

from .gloo_group import gloo_rank

WORLD_SIZE = 2
COLLECTIVE_TIMEOUT_S = 20  # a rank stuck in a collective fails instead of hanging the test
SAMPLES, FEATURES, TARGETS = 16, 4, 3
BATCH = 4  # per rank per step
SHUFFLE_SEED = 7
PCGRAD_SEED = 1234
INIT_SEED = 100
LR, MOMENTUM = 0.1, 0.9
BUCKET_MB = 64 / (1 << 20)  # 64-byte buckets: the small model's buffer travels in many of them


# ---- the problem every scenario trains ---------------------------------------------------------------


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, FEATURES, generator=g, dtype=torch.float64)
    y = torch.randn(SAMPLES, TARGETS, generator=g, dtype=torch.float64)
    return TensorDataset(x, y)


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, TARGETS)).double()


def source_losses(out: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Three sources; the third pulls output 0 the opposite way of the first, so PCGrad projects."""
    return [
        ((out[:, 0] - y[:, 0]) ** 2).mean(),
        ((out[:, 1] - y[:, 1]) ** 2).mean(),
        ((out[:, 0] + y[:, 0]) ** 2).mean() + ((out[:, 2] - y[:, 2]) ** 2).mean(),
    ]


def losses(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The three source losses of ``net`` on ``(x, y)`` (see :func:`source_losses`)."""
    return source_losses(net(x), y)


def optimizer(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)


def hexes(net: nn.Module) -> list[str]:
    return [float(v).hex() for p in net.parameters() for v in p.detach().reshape(-1).tolist()]


def floats(hex_values: list[str]) -> torch.Tensor:
    """The float64 tensor of ``hexes``'s strings."""
    return torch.tensor([float.fromhex(h) for h in hex_values], dtype=torch.float64)


def records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL telemetry file."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def step(net, opt, buf, aggregator, x, y, ctx) -> int:
    """One multi-source step the distributed way; returns the conflicts PCGrad resolved."""
    opt.zero_grad()
    buf.backward(losses(net, x, y))
    allreduce_gradient_buffer(buf, ctx, bucket_mb=BUCKET_MB)
    _, stats = buf.aggregate(aggregator, return_stats=True)
    opt.step()
    return int(stats.conflicts)


def epoch_batches(epoch: int) -> list[list[int]]:
    """The indices each step of ``epoch`` sees over all ranks together (rank 0's batch, then rank 1's)."""
    data = dataset()
    per_rank = []
    for rank in range(WORLD_SIZE):
        sampler = DistributedSampler(data, num_replicas=WORLD_SIZE, rank=rank, shuffle=True, seed=SHUFFLE_SEED)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
    return [
        [i for indices in per_rank for i in indices[start : start + BATCH]]
        for start in range(0, len(per_rank[0]), BATCH)
    ]


def combined_batches(epochs: int) -> list[list[int]]:
    """The indices every step of ``epochs`` epochs sees over all ranks together (see :func:`epoch_batches`)."""
    return [indices for epoch in range(epochs) for indices in epoch_batches(epoch)]


# ---- harness -----------------------------------------------------------------------------------------


def run(scenario: str, out: Path) -> None:
    """Runs ``scenario`` on WORLD_SIZE spawned ranks (raises if any rank failed)."""
    spawn(__name__, scenario, out)


def spawn(module: str, scenario: str, out: Path) -> None:
    """Runs ``SCENARIOS[scenario]`` of the importable ``module`` on WORLD_SIZE spawned ranks, each
    in a gloo group (raises if any rank failed); every rank writes its result to ``out``."""
    mp.spawn(_entry, args=(module, scenario, str(out)), nprocs=WORLD_SIZE, join=True)


def results(scenario: str, out: Path) -> list[dict[str, Any]]:
    return [json.loads((out / f"{scenario}-rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


def _entry(rank: int, module: str, scenario: str, out: str) -> None:
    with gloo_rank(rank, WORLD_SIZE, Path(out), COLLECTIVE_TIMEOUT_S) as ctx:
        result = importlib.import_module(module).SCENARIOS[scenario](ctx, Path(out))
        (Path(out) / f"{scenario}-rank{rank}.json").write_text(json.dumps(result))


def _raised(call) -> str:
    """The message of the exception ``call()`` raises (type-prefixed); fails if it raises nothing."""
    try:
        call()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    raise AssertionError("expected an exception, none was raised")


# ---- scenarios ---------------------------------------------------------------------------------------


def train(ctx, out: Path) -> dict[str, Any]:
    """Multi-source training on sharded data, then the same with unsynchronised shuffles (control)."""
    sink = MemorySink()
    telemetry = TelemetryEmitter([sink], batch_size=1)
    net = model(INIT_SEED + 17 * ctx.rank)  # different on each rank until broadcast
    broadcast_module_state(net, ctx)
    verify_replicas(net, ctx)  # raises on every rank unless the broadcast made the replicas identical
    initial_identical = True
    opt = optimizer(net)
    buf = GradientBuffer(net, num_sources=3)
    # Rank 1 asks for another seed on purpose: rank 0's must win.
    gen = synchronized_generator(PCGRAD_SEED if ctx.is_main else PCGRAD_SEED + 1, ctx, telemetry=telemetry)
    aggregator = PCGrad(generator=gen)
    loader = shard(dataset(), ctx, batch_size=BATCH, shuffle=True, seed=SHUFFLE_SEED, telemetry=telemetry)
    seen, conflicts = [], 0
    for epoch in range(2):
        loader.set_epoch(epoch)
        for x, y in loader:
            seen.append(len(x))
            conflicts += step(net, opt, buf, aggregator, x, y, ctx)
    verify_replicas(net, ctx)
    params = hexes(net)

    # Control: the same run, but each rank shuffles PCGrad's orders with its own generator.
    control = model(INIT_SEED)
    control_opt = optimizer(control)
    control_buf = GradientBuffer(control, num_sources=3)
    control_agg = PCGrad(generator=torch.Generator().manual_seed(PCGRAD_SEED + ctx.rank))
    for epoch in range(2):
        loader.set_epoch(epoch)
        for x, y in loader:
            step(control, control_opt, control_buf, control_agg, x, y, ctx)
    control_error = _raised(lambda: verify_replicas(control, ctx))

    # A one-bit change on rank 1 is caught on both ranks.
    if ctx.rank == 1:
        with torch.no_grad():
            net[2].bias.view(torch.int64)[0] ^= 1
    perturbed_error = _raised(lambda: verify_replicas(net, ctx))
    return {
        "params": params,
        "batch_sizes": seen,
        "conflicts": conflicts,
        "initial_identical": initial_identical,
        "control_error": control_error,
        "perturbed_error": perturbed_error,
        "seed_overridden": len(sink.of_kind("distributed.seed_overridden")),
    }


def halt(ctx, out: Path) -> dict[str, Any]:
    """Rank 1 raises HALT at step 3; every rank must stop at that step boundary."""
    sink = MemorySink()
    telemetry = TelemetryEmitter([sink], batch_size=1)
    controller = EmergencyController(signal=LocalEmergencySignal(), telemetry=telemetry)
    net = model(INIT_SEED)
    opt, buf = optimizer(net), GradientBuffer(net, num_sources=3)
    aggregator = PCGrad(generator=synchronized_generator(PCGRAD_SEED, ctx))
    loader = shard(dataset(), ctx, batch_size=BATCH // 2, seed=SHUFFLE_SEED)  # 4 steps per epoch
    stopped_at, agreement, steps_done = None, None, 0
    for epoch in range(3):
        loader.set_epoch(epoch)
        for x, y in loader:
            if ctx.rank == 1 and steps_done == 3:
                controller.escalate(EmergencyLevel.HALT, "test: halt raised on rank 1")
            agreement = agree_on_emergency(controller.level, ctx, controller=controller, telemetry=telemetry)
            if agreement.level == EmergencyLevel.HALT:
                stopped_at = steps_done
                break
            step(net, opt, buf, aggregator, x, y, ctx)
            steps_done += 1
        if stopped_at is not None:
            break
    remote = sink.of_kind("emergency.remote_level")
    return {
        "stopped_at": stopped_at,
        "steps_done": steps_done,
        "level": agreement.level.name,
        "local_level": agreement.local_level.name,
        "source_rank": agreement.source_rank,
        "from_other_rank": agreement.from_other_rank,
        "controller_level": controller.level.name,
        "remote_events": [
            {"severity": r["severity"], "source_rank": r["source_rank"], "level": r["level"]} for r in remote
        ],
        "any_rank_one": any_rank(ctx.rank == 1, ctx),
        "any_rank_none": any_rank(False, ctx),
        "json": broadcast_json({"run_dir": f"runs/from-rank-{ctx.rank}", "n": [1, 2.5, None]}, ctx),
        "json_error": _raised(lambda: broadcast_json({1, 2} if ctx.is_main else None, ctx)),
        "params": hexes(net),
    }


def checkpoint(ctx, out: Path) -> dict[str, Any]:
    """Rank 0 checkpoints through its StateManager; a restarted job resumes on both ranks and continues
    exactly as the uninterrupted run did."""
    telemetry = rank_telemetry(ctx, out / "telemetry", batch_size=1)
    root = out / "checkpoints"
    loader = shard(dataset(), ctx, batch_size=BATCH, seed=SHUFFLE_SEED, telemetry=telemetry)
    batches = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches.extend(loader)

    def open_state():
        return StateManager(root, fast_cache_mb=0, keep_last=2, telemetry=telemetry) if ctx.is_main else None

    # Nothing committed yet: every rank raises instead of waiting forever.
    state = open_state()
    net = model(INIT_SEED)
    opt = optimizer(net)
    no_checkpoint = _raised(lambda: resume_from_checkpoint(state, ctx, net, opt, telemetry=telemetry))
    step_mismatch = _raised(lambda: checkpoint_barrier(state, ctx, 5 + ctx.rank, net, opt, telemetry=telemetry))
    diverged = model(INIT_SEED + ctx.rank)
    diverged_error = _raised(
        lambda: checkpoint_barrier(state, ctx, 1, diverged, optimizer(diverged), telemetry=telemetry)
    )

    buf = GradientBuffer(net, num_sources=3)
    gen = synchronized_generator(PCGRAD_SEED, ctx)
    aggregator = PCGrad(generator=gen)
    for x, y in batches[:2]:
        step(net, opt, buf, aggregator, x, y, ctx)
    extra = {"generator": gen.get_state(), "epoch": 1, "pair": (1, 2.5), "names": ["a", "b"], "lr": {0: 0.1}}
    entry = checkpoint_barrier(state, ctx, 2, net, opt, extra, telemetry=telemetry)
    manifest_lists_it = (
        entry.file in (root / "manifest.json").read_text() if (root / "manifest.json").exists() else False
    )
    file_present = (root / entry.file).is_file()
    at_checkpoint = hexes(net)
    for x, y in batches[2:]:
        step(net, opt, buf, aggregator, x, y, ctx)
    uninterrupted = hexes(net)

    # "Restart": fresh model (another initialisation), fresh optimizer (no momentum yet), fresh generator.
    if state is not None:
        state.close()
    state = open_state()
    net = model(INIT_SEED + 1 + ctx.rank)
    opt = optimizer(net)
    restored = resume_from_checkpoint(state, ctx, net, opt, telemetry=telemetry)
    gen = torch.Generator()
    gen.set_state(restored.extra["generator"])
    buf = GradientBuffer(net, num_sources=3)
    aggregator = PCGrad(generator=gen)
    resumed_params = hexes(net)
    momentum_restored = all("momentum_buffer" in opt.state[p] for p in net.parameters())
    for x, y in batches[2:]:
        step(net, opt, buf, aggregator, x, y, ctx)
    # A rank whose model does not fit the checkpoint fails, and so does every other rank.
    wrong = (
        model(INIT_SEED)
        if ctx.is_main
        else nn.Sequential(nn.Linear(FEATURES, 5), nn.Tanh(), nn.Linear(5, TARGETS)).double()
    )
    misfit = _raised(lambda: resume_from_checkpoint(state, ctx, wrong, optimizer(wrong), telemetry=telemetry))
    if state is not None:
        state.close()
    telemetry.close()
    return {
        "no_checkpoint": no_checkpoint,
        "step_mismatch": step_mismatch,
        "misfit": misfit,
        "diverged": diverged_error,
        "entry": {"step": entry.step, "file": entry.file, "sequence": entry.sequence},
        "manifest_lists_it": manifest_lists_it,
        "file_present": file_present,
        "restored": {"step": restored.step, "file": restored.file, "sequence": restored.sequence},
        "extra": {k: repr(v) for k, v in restored.extra.items() if k != "generator"},
        "extra_types": {k: type(v).__name__ for k, v in restored.extra.items()},
        "momentum_restored": momentum_restored,
        "at_checkpoint": at_checkpoint,
        "resumed_params": resumed_params,
        "uninterrupted": uninterrupted,
        "continued": hexes(net),
    }


SCENARIOS = {"train": train, "halt": halt, "checkpoint": checkpoint}
