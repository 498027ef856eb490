"""A rollback that goes differently on one rank (its snapshot missing, its read past the deadline):
the replicas never differ. Rank 0's state wins: every rank goes on from it when every rollback
restored something, and every rank halts from it when one failed, its committed checkpoints intact.

Two gloo ranks, spawned (``distributed.workers``). Batches of one sample per rank: 8 steps an
epoch, a checkpoint at each epoch's end, a snapshot every 2 steps. The losses of call 12 (step 12 of
the run, in epoch 2) are NaN on rank 0 only; averaged over the ranks they are NaN everywhere, so
both ranks roll back at once (``rollback_after=1``), from step 11: to the snapshot of step 10, or,
without one, to the durable checkpoint of step 8 (rank 0 only: rank 1 holds no checkpoints).
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from distributed import workers
from distributed.workers import INIT_SEED, dataset, hexes
from distributed.workers import model as make_model
from distributed.workers import optimizer as make_optimizer
from torch.utils.data import DataLoader

from tolaria.emergency import EmergencyController, EmergencyLevel, LocalEmergencySignal
from tolaria.state import StateManager
from tolaria.telemetry import MemorySink, TelemetryEmitter
from tolaria.trainer import (
    CheckpointConfig,
    DistributedConfig,
    SafetyConfig,
    TelemetryConfig,
    Trainer,
    TrainerConfig,
    checkpointing,
    control,
)
from tolaria.trainer.safety import HALT, ROLLED_BACK, Verdict

pytestmark = [pytest.mark.slow]

NAN_CALL = 12
STALL_S = 2.0  # a durable read that hangs this long, against a rollback deadline of a quarter of it
FAULTS = {
    # rank whose snapshots vanish just before the rollback, rank whose rollback misses its deadline,
    # rank whose durable read stalls
    "snapshot_missing_on_rank1": (1, None, None),
    "snapshot_missing_on_rank0": (0, None, None),
    "deadline_missed_on_rank1": (None, 1, None),
    "durable_read_stalled_on_rank0": (0, None, 0),
}


def three_losses(out, batch) -> dict[str, Any]:
    _, y = batch
    return dict(zip("abc", workers.source_losses(out, y)))


def stalled(load_newest):
    """``load_newest`` after a hang that ignores cancellation (a stuck disk)."""

    def load(*args, **kwargs):
        time.sleep(STALL_S)
        return load_newest(*args, **kwargs)

    return load


def run_fault(
    ctx, run_dir: Path, lose_snapshots: int | None, miss_deadline: int | None, stall_read: int | None
) -> dict[str, Any]:
    net = make_model(INIT_SEED)
    holder: dict[str, Trainer] = {}
    calls = [0]

    def loss_fn(outputs, batch):
        calls[0] += 1
        losses = three_losses(outputs, batch)
        if calls[0] == NAN_CALL:
            if ctx.rank == lose_snapshots:
                holder["trainer"].state._snapshots.clear()  # the fault: this rank's snapshots are gone
            if ctx.rank == 0:
                losses["a"] = losses["a"] * float("nan")
        return losses

    config = TrainerConfig(
        epochs=2,
        device="cpu",
        seed=workers.SHUFFLE_SEED,
        run_dir=str(run_dir),
        progress=False,
        checkpoint=CheckpointConfig(snapshot_every_steps=2),
        safety=SafetyConfig(rollback_after=1),
        telemetry=TelemetryConfig(log_every_steps=1000),
    )
    if stall_read is not None:
        config = config.replace(checkpoint=CheckpointConfig(snapshot_every_steps=2, rollback_deadline_s=STALL_S / 4))
    loader = DataLoader(dataset(), batch_size=1, shuffle=True)
    trainer = holder["trainer"] = Trainer(net, make_optimizer(net), loader, loss_fn, config, ctx=ctx)
    if ctx.rank == miss_deadline:
        trainer.safety.rollback_deadline_s = 1e-9  # the fault: this rank's restore cannot make its deadline
    if ctx.rank == stall_read:
        store = trainer.state._store  # the fault: this rank's durable reads hang (the rollback's staging read)
        store.load_newest = stalled(store.load_newest)
    summary = trainer.fit()
    result = {"status": summary.status, "steps": summary.steps, "rollbacks": summary.rollbacks, "params": hexes(net)}
    if ctx.is_main:
        with StateManager(run_dir / "checkpoints") as state:  # what a later resume would find
            result["checkpoints"] = [[e.step, error] for e, error in state.verify_checkpoints()]
    return result


def fsdp_disagreement(ctx) -> dict[str, Any]:
    """With sharding = "fsdp" no rank's state stands for the others': the agreement alone, on a
    trainer stand-in (rank 0 restored step 10, rank 1 nothing)."""
    sink = MemorySink()
    telemetry = TelemetryEmitter([sink], batch_size=1)
    trainer = SimpleNamespace(
        ctx=ctx,
        config=TrainerConfig(distributed=DistributedConfig(sharding="fsdp")),
        telemetry=telemetry,
        emergency=EmergencyController(signal=LocalEmergencySignal("t"), telemetry=telemetry),
        step=11,
        _state_split=None,
        _last_checkpoint_step=8,
    )
    local = Verdict(ROLLED_BACK, step=10) if ctx.is_main else Verdict(HALT, reason="rollback failed")
    verdict = control.agree_on_verdict(trainer, local)
    written = checkpointing.checkpoint(trainer, epoch_complete=False, final=True)  # must not write or collect
    telemetry.flush()
    return {
        "action": verdict.action,
        "level": trainer.emergency.level.name,
        "written": written,
        "kinds": [r["kind"] for r in sink.records],
    }


def scenario_rollback_faults(ctx, out: Path) -> dict[str, Any]:
    results = {name: run_fault(ctx, out / name, *fault) for name, fault in FAULTS.items()}
    results["fsdp"] = fsdp_disagreement(ctx)
    return results


SCENARIOS = {"rollback_faults": scenario_rollback_faults}


@pytest.mark.timeout(120)
def test_a_rollback_that_differs_on_one_rank_never_leaves_replicas_that_differ(tmp_path):
    workers.spawn(__name__, "rollback_faults", tmp_path)
    rank0, rank1 = workers.results("rollback_faults", tmp_path)
    for name in FAULTS:
        r0, r1 = rank0[name], rank1[name]
        assert r0["params"] == r1["params"], f"{name}: the replicas differ"
        assert r0["steps"] == r1["steps"] and r0["status"] == r1["status"], name
        assert r0["rollbacks"] == r1["rollbacks"] == 1, name
        # Every committed checkpoint verifies; none is lost.
        assert all(error is None for _, error in r0["checkpoints"]), r0["checkpoints"]
    # A failed rollback (rank 1: no snapshot and no checkpoint of its own, or past its deadline):
    # every rank halts from rank 0's restored snapshot of step 10; the final checkpoint is written.
    for name in ("snapshot_missing_on_rank1", "deadline_missed_on_rank1"):
        assert rank0[name]["status"] == "halted" and rank0[name]["steps"] == 10, name
        assert [step for step, _ in rank0[name]["checkpoints"]] == [8, 10], name
    # Rank 0's durable read stalls past the deadline (abandoned): it restores nothing, rank 1 its
    # snapshot of 10; rank 0's untouched state (step 11) is every rank's, and both halt there.
    stalled_run = rank0["durable_read_stalled_on_rank0"]
    assert stalled_run["status"] == "halted" and stalled_run["steps"] == 11
    assert [step for step, _ in stalled_run["checkpoints"]] == [8, 11]
    # Rank 0 falls back to its checkpoint of step 8, rank 1 to its snapshot of step 10: rank 0's wins,
    # and the run goes on from step 8 (the 4 batches left of epoch 2).
    done = rank0["snapshot_missing_on_rank0"]
    assert done["status"] == "completed" and done["steps"] == 12
    assert [step for step, _ in done["checkpoints"]] == [8, 12]
    kinds = [
        r["kind"]
        for rank in (0, 1)
        for r in workers.records(tmp_path / "deadline_missed_on_rank1" / f"telemetry-rank{rank}.jsonl")
    ]
    assert kinds.count("distributed.rollback_disagreed") == 2
    assert "state.rollback_deadline_missed" in kinds
    # Sharded (fsdp): every rank halts and writes nothing; the committed checkpoint stays the last common state.
    for r in (rank0["fsdp"], rank1["fsdp"]):
        assert r["action"] == "halt" and r["level"] == EmergencyLevel.HALT.name and r["written"] is None
        assert {"distributed.rollback_disagreed", "train.checkpoint_skipped"} <= set(r["kinds"])
