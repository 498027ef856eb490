"""The Trainer on two CPU ranks (gloo): same result as one process on the combined batch, identical
replicas, HALT on one rank stops both, checkpoint on rank 0 and resume on both; and ``tolaria train``
under ``torchrun``.

The ranks are spawned with ``torch.multiprocessing`` and join a gloo group through a ``FileStore``;
each writes what it saw to ``<out>/<scenario>-rank<r>.json``. Parameters travel as ``float.hex``
strings, so equality there is bitwise.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

# tests/distributed: pytest puts tests/ on sys.path, as for this package. The problem (data set, model,
# optimizer, seeds) is the one the distributed tests train.
from distributed import workers
from distributed.workers import BATCH, INIT_SEED, SAMPLES, WORLD_SIZE, dataset, floats, hexes, records
from distributed.workers import model as make_model
from distributed.workers import optimizer as make_optimizer
from torch.utils.data import DataLoader

from tolaria.distributed import LAUNCH_ENV_VARS, fsdp_wrap
from tolaria.emergency import EmergencyLevel
from tolaria.trainer import CheckpointConfig, DistributedConfig, TelemetryConfig, Trainer, TrainerConfig

pytestmark = [pytest.mark.slow]

SEED = workers.SHUFFLE_SEED  # the trainer's one seed: the shards' shuffle and PCGrad's generator


# ---- the problem ------------------------------------------------------------------------------


def three_losses(out: torch.Tensor, batch: Any) -> dict[str, torch.Tensor]:
    """The distributed tests' three sources, named: the third pulls output 0 against the first, so
    PCGrad projects (its draws matter)."""
    _, y = batch
    return dict(zip("abc", workers.source_losses(out, y)))


def one_loss(out: torch.Tensor, batch: Any) -> torch.Tensor:
    _, y = batch
    return ((out - y) ** 2).mean()


def config(run_dir: Path, **changes: Any) -> TrainerConfig:
    base = dict(epochs=2, device="cpu", seed=SEED, run_dir=str(run_dir), telemetry=TelemetryConfig(log_every_steps=1))
    return TrainerConfig(**{**base, **changes})


class CombinedBatches:
    """One process's view of a 2-rank run: step i's batch is rank 0's batch i followed by rank 1's."""

    def __init__(self) -> None:
        self.data = dataset()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return SAMPLES // (BATCH * WORLD_SIZE)

    def __iter__(self):
        for indices in workers.epoch_batches(self.epoch):
            yield self.data[indices]


# ---- scenarios (run on every rank) ------------------------------------------------------------------


def scenario_train(ctx, out: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, loss_fn in (("multi", three_losses), ("single", one_loss)):
        net = make_model(INIT_SEED + ctx.rank)  # rank 1 starts elsewhere: the trainer must copy rank 0's
        loader = DataLoader(dataset(), batch_size=BATCH, shuffle=True)  # the trainer shards it
        trainer = Trainer(net, make_optimizer(net), loader, loss_fn, config(out / name), ctx=ctx)
        summary = trainer.fit()
        result[name] = {
            "params": hexes(net),
            "status": summary.status,
            "steps": summary.steps,
            "conflict_rate": summary.conflict_rate,
            "losses": summary.final_losses,
            "batches_per_epoch": len(trainer.data),
            "fast_path": trainer.stage.fast_path,
        }
    return result


def scenario_halt(ctx, out: Path, sharding: str = "none") -> dict[str, Any]:
    net = make_model(INIT_SEED)
    if sharding == "fsdp":
        fsdp_wrap(net, ctx)
    holder: dict[str, Trainer] = {}

    def loss_fn(outputs, batch):
        trainer = holder["trainer"]
        if ctx.rank == 1 and trainer.step == 2:  # during the third step, on rank 1 only
            trainer.emergency.escalate(EmergencyLevel.HALT, "operator halt on rank 1")
        return three_losses(outputs, batch)

    loader = DataLoader(dataset(), batch_size=2, shuffle=True)  # 4 steps per epoch: the halt is mid-epoch
    cfg = config(out / "halt", distributed=DistributedConfig(sharding=sharding))
    trainer = holder["trainer"] = Trainer(net, make_optimizer(net), loader, loss_fn, cfg, ctx=ctx)
    summary = trainer.fit()
    remote = [
        {"source_rank": r["source_rank"], "level": r["level"]}
        for r in records(out / "halt" / f"telemetry-rank{ctx.rank}.jsonl")
        if r["kind"] == "emergency.remote_level"
    ]
    return {
        "status": summary.status,
        "steps": summary.steps,
        "halt_reason": summary.halt_reason,
        "params": hexes(net) if sharding != "fsdp" else None,  # fsdp: DTensors, each rank its own shard
        "last_checkpoint_step": summary.last_checkpoint_step,
        "remote": remote,
    }


def scenario_halt_zero(ctx, out: Path) -> dict[str, Any]:
    return scenario_halt(ctx, out, sharding="zero")


def scenario_halt_fsdp(ctx, out: Path) -> dict[str, Any]:
    return scenario_halt(ctx, out, sharding="fsdp")


def scenario_checkpoint(ctx, out: Path) -> dict[str, Any]:
    run_dir = out / "ckpt"
    net = make_model(INIT_SEED)
    first = Trainer(
        net,
        make_optimizer(net),
        DataLoader(dataset(), batch_size=BATCH, shuffle=True),
        three_losses,
        config(run_dir, max_steps=2),
        ctx=ctx,
    )
    first_summary = first.fit()
    at_checkpoint = hexes(net)

    resumed_net = make_model(INIT_SEED + 50 + ctx.rank)  # neither rank starts from the checkpoint's values
    seen: list[list[str]] = []

    def loss_fn(outputs, batch):
        if not seen:
            seen.append(hexes(resumed_net))  # the parameters the first step after the resume starts from
        return three_losses(outputs, batch)

    second = Trainer(
        resumed_net,
        make_optimizer(resumed_net),
        DataLoader(dataset(), batch_size=BATCH, shuffle=True),
        loss_fn,
        config(run_dir, max_steps=4, checkpoint=CheckpointConfig(resume=True)),
        ctx=ctx,
    )
    summary = second.fit()
    return {
        "first_last_checkpoint": first_summary.last_checkpoint_step,
        "at_checkpoint": at_checkpoint,
        "resumed_from": summary.resumed_from_step,
        "start_params": seen[0],
        "steps": summary.steps,
        "params": hexes(resumed_net),
        "last_checkpoint_step": summary.last_checkpoint_step,
        "telemetry_file": str(summary.telemetry_file),
    }


def scenario_rollback(ctx, out: Path) -> dict[str, Any]:
    net = make_model(INIT_SEED)
    calls = [0]

    def loss_fn(outputs, batch):
        calls[0] += 1
        losses = three_losses(outputs, batch)
        if ctx.rank == 0 and 3 <= calls[0] <= 5:  # non-finite on rank 0 only: the averaged losses are NaN everywhere
            losses["a"] = losses["a"] * float("nan")
        return losses

    cfg = config(out / "rollback", checkpoint=CheckpointConfig(snapshot_every_steps=1))
    summary = Trainer(
        net, make_optimizer(net), DataLoader(dataset(), batch_size=2, shuffle=True), loss_fn, cfg, ctx=ctx
    ).fit()
    return {
        "status": summary.status,
        "steps": summary.steps,
        "skipped": summary.skipped_steps,
        "rollbacks": summary.rollbacks,
        "params": hexes(net),
    }


SCENARIOS = {
    "train": scenario_train,
    "halt": scenario_halt,
    "halt_zero": scenario_halt_zero,
    "halt_fsdp": scenario_halt_fsdp,
    "checkpoint": scenario_checkpoint,
    "rollback": scenario_rollback,
}


def run(scenario: str, out: Path) -> list[dict[str, Any]]:
    workers.spawn(__name__, scenario, out)
    return workers.results(scenario, out)


# ---- tests ---------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_two_ranks_train_like_one_process_on_the_combined_batch(tmp_path):
    rank0, rank1 = run("train", tmp_path)
    for name, loss_fn in (("multi", three_losses), ("single", one_loss)):
        net = make_model(INIT_SEED)
        reference = Trainer(net, make_optimizer(net), CombinedBatches(), loss_fn, config(tmp_path / f"ref-{name}"))
        expected = reference.fit()
        r0, r1 = rank0[name], rank1[name]
        assert r0["batches_per_epoch"] == r1["batches_per_epoch"] == SAMPLES // (BATCH * WORLD_SIZE)
        assert r0["status"] == r1["status"] == expected.status == "completed"
        assert r0["steps"] == r1["steps"] == expected.steps == 4
        assert not r0["fast_path"], "one source on several ranks goes through the all-reduced buffer"
        # Identical replicas, bit for bit, although rank 1's model was initialised differently.
        assert r0["params"] == r1["params"]
        # One process on the combined batch: the same parameters up to summation order.
        torch.testing.assert_close(
            floats(r0["params"]), torch.cat([p.detach().reshape(-1) for p in net.parameters()]), rtol=0, atol=1e-12
        )
        assert r0["params"] != hexes(make_model(INIT_SEED)), "training must have moved the parameters"
        # The reported losses are the global batch's (all-reduced), equal to the reference's.
        assert r0["losses"] == r1["losses"]
        assert r0["losses"] == pytest.approx(expected.final_losses, rel=1e-12)
        if name == "multi":
            assert expected.conflict_rate and expected.conflict_rate > 0, (
                "PCGrad must project, or its draws would not matter"
            )
            assert r0["conflict_rate"] == r1["conflict_rate"] == expected.conflict_rate
    for name in ("multi", "single"):
        files = sorted(p.name for p in (tmp_path / name).glob("telemetry*.jsonl"))
        assert files == ["telemetry-rank0.jsonl", "telemetry-rank1.jsonl"]
        run_ids = set()
        for rank in (0, 1):
            recs = records(tmp_path / name / f"telemetry-rank{rank}.jsonl")
            assert recs and all(r["rank"] == rank and r["world_size"] == WORLD_SIZE for r in recs)
            run_ids |= {r["run_id"] for r in recs}
        assert len(run_ids) == 1


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sharding", ["none", "zero", "fsdp"])
def test_halt_on_rank_one_stops_rank_zero_at_the_next_step_boundary(tmp_path, sharding):
    rank0, rank1 = run("halt" if sharding == "none" else f"halt_{sharding}", tmp_path)
    assert rank0["status"] == rank1["status"] == "halted"
    assert rank0["steps"] == rank1["steps"] == 3  # raised during step 3, seen by both before step 4
    if sharding != "fsdp":  # fsdp: each rank holds its own shard of the parameters
        assert rank0["params"] == rank1["params"]
    assert "rank 1" in rank0["halt_reason"]
    assert rank1["halt_reason"] == "operator halt on rank 1"
    assert rank0["remote"] == [{"source_rank": 1, "level": "HALT"}]
    assert rank1["remote"] == []
    # The final checkpoint of a halted run is written and committed on both (sharded: by every rank, DCP).
    assert rank0["last_checkpoint_step"] == rank1["last_checkpoint_step"] == 3
    folder = "checkpoints" if sharding == "none" else "sharded-checkpoints"
    assert list((tmp_path / "halt" / folder).iterdir())


@pytest.mark.timeout(60)
def test_non_finite_steps_on_one_rank_are_skipped_and_rolled_back_on_both(tmp_path):
    rank0, rank1 = run("rollback", tmp_path)
    for r in (rank0, rank1):
        assert r["status"] == "completed"
        assert r["skipped"] == 3 and r["rollbacks"] == 1  # rollback_after=3: the third skip rolls back
    assert rank0["steps"] == rank1["steps"]
    assert rank0["params"] == rank1["params"]
    assert all(h != "nan" for h in rank0["params"])


@pytest.mark.timeout(60)
def test_checkpoint_on_rank_zero_resumes_on_both_ranks(tmp_path):
    rank0, rank1 = run("checkpoint", tmp_path)
    for r in (rank0, rank1):
        assert r["first_last_checkpoint"] == 2
        assert r["resumed_from"] == 2
        assert r["start_params"] == r["at_checkpoint"], "the resumed run must start from the checkpoint"
        assert r["steps"] == 4 and r["last_checkpoint_step"] == 4
    assert rank0["at_checkpoint"] == rank1["at_checkpoint"]
    assert rank0["params"] == rank1["params"]
    run_dir = tmp_path / "ckpt"
    assert len(list((run_dir / "checkpoints").glob("ckpt-*.pt"))) == 2
    assert not list((run_dir / "state-rank1").glob("ckpt-*.pt")), "only rank 0 writes checkpoints"
    assert rank1["telemetry_file"] == str(run_dir / "telemetry-rank1.jsonl")
    kinds1 = {r["kind"] for r in records(run_dir / "telemetry-rank1.jsonl")}
    assert {"distributed.checkpoint_committed", "distributed.resumed", "train.resume"} <= kinds1
    kinds0 = {r["kind"] for r in records(run_dir / "telemetry-rank0.jsonl")}
    assert {"state.checkpoint_committed", "distributed.resumed", "train.resume"} <= kinds0


@pytest.mark.timeout(90)
def _tolaria_train_under_torchrun(tmp_path, *arguments: str) -> tuple[Path, subprocess.CompletedProcess]:
    try:
        import torch.distributed.run  # noqa: F401
    except ImportError:
        pytest.skip("torch.distributed.run (torchrun) is not available")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in LAUNCH_ENV_VARS:
        env.pop(name, None)
    torchrun = "-m torch.distributed.run --standalone --nproc-per-node 2 -m tolaria.cli train --max-steps 3 --out"
    command = [sys.executable, *shlex.split(torchrun), str(out), *arguments]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=80, cwd=tmp_path)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return out, done


@pytest.mark.slow
def test_tolaria_train_sharding_fsdp_under_torchrun_trains_and_checkpoints_every_shard(tmp_path):
    out, _ = _tolaria_train_under_torchrun(tmp_path, "--sharding", "fsdp")
    for rank in (0, 1):
        end = [r for r in records(out / f"telemetry-rank{rank}.jsonl") if r["kind"] == "train.end"]
        assert len(end) == 1 and end[0]["steps"] == 3 and end[0]["status"] == "max_steps"
    assert (out / "sharded-checkpoints" / "manifest.json").exists(), "the DCP store holds the run's checkpoints"
    assert not list((out / "checkpoints").glob("ckpt-*.pt")), "no replicated checkpoint of a sharded run"


def test_tolaria_train_under_torchrun_writes_one_telemetry_file_per_rank(tmp_path):
    out, done = _tolaria_train_under_torchrun(tmp_path)
    assert sorted(p.name for p in out.glob("telemetry*.jsonl")) == ["telemetry-rank0.jsonl", "telemetry-rank1.jsonl"]
    for rank in (0, 1):
        recs = records(out / f"telemetry-rank{rank}.jsonl")
        assert all(r["rank"] == rank for r in recs)
        end = [r for r in recs if r["kind"] == "train.end"]
        assert len(end) == 1 and end[0]["steps"] == 3
    assert list((out / "checkpoints").glob("ckpt-*.pt"))
    assert not list((out / "state-rank1").glob("ckpt-*.pt"))
    assert done.stdout.count("plots: tolaria report") == 1, "only rank 0 prints the summary"
    # The control policy is consulted on rank 0 only (its outcome is broadcast).
    assert done.stderr.count("policy report for epoch 1") == 1, done.stderr[-3000:]


def test_shuffled_batches_shard_like_a_distributed_sampler():
    from tolaria.trainer.tasks import ShuffledBatches

    x = torch.arange(10.0)
    whole = ShuffledBatches(x, x, 3, seed=5)
    whole.set_epoch(2)
    shards = [whole.for_rank(rank, 3) for rank in range(3)]
    for s in shards:
        s.set_epoch(2)
    seen = [torch.cat([b[0] for b in s]).tolist() for s in shards]
    assert [len(s) for s in shards] == [2, 2, 2]  # ceil(ceil(10 / 3) / 3): the same step count on every rank
    assert [len(v) for v in seen] == [4, 4, 4]
    order = torch.cat([b[0] for b in whole]).tolist()
    padded = order + order[:2]  # padded by repeating the start, as DistributedSampler does
    assert seen == [padded[r::3] for r in range(3)]
    with pytest.raises(ValueError, match="rank must be in"):
        whole.for_rank(3, 3)


def test_distributed_config_is_validated():
    from tolaria.trainer import ConfigError

    assert TrainerConfig().distributed.emergency_check_every == 1
    cfg = TrainerConfig.from_dict({"distributed": {"emergency_check_every": 4, "bucket_mb": 1}})
    assert (cfg.distributed.emergency_check_every, cfg.distributed.bucket_mb) == (4, 1.0)
    with pytest.raises(ConfigError, match="distributed.emergency_check_every must be > 0"):
        TrainerConfig.from_dict({"distributed": {"emergency_check_every": 0}})
    with pytest.raises(ConfigError, match="valid keys"):
        TrainerConfig.from_dict({"distributed": {"every": 1}})
