"""Two CPU ranks on gloo: exact multi-source training, HALT agreement, checkpoint and resume."""

import pytest
import torch

from tolaria.aggregation import GradientBuffer, PCGrad

from . import workers
from .workers import BATCH, INIT_SEED, PCGRAD_SEED, combined_batches, dataset, floats, hexes, losses, model, optimizer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


def single_process_reference(epochs: int) -> tuple[torch.nn.Module, int]:
    """One process, the combined batch of every step, the same PCGrad seed: what two ranks must match."""
    data = dataset()
    net = model(INIT_SEED)
    opt = optimizer(net)
    buf = GradientBuffer(net, num_sources=3)
    aggregator = PCGrad(generator=torch.Generator().manual_seed(PCGRAD_SEED))
    conflicts = 0
    for indices in combined_batches(epochs):
        x, y = data[indices]
        opt.zero_grad()
        buf.backward(losses(net, x, y))
        _, stats = buf.aggregate(aggregator, return_stats=True)
        conflicts += int(stats.conflicts)
        opt.step()
    return net, conflicts


def test_two_ranks_match_one_process_on_the_combined_batch(tmp_path):
    workers.run("train", tmp_path)
    rank0, rank1 = workers.results("train", tmp_path)
    reference, reference_conflicts = single_process_reference(epochs=2)

    assert rank0["batch_sizes"] == rank1["batch_sizes"] == [BATCH] * 4
    assert reference_conflicts > 0, "the problem must make PCGrad project, or the shuffle would not matter"
    assert rank0["conflicts"] == rank1["conflicts"] == reference_conflicts
    # Identical replicas: bit for bit.
    assert rank0["params"] == rank1["params"]
    # The same parameters as one process on the combined batch (only summation order differs).
    expected = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    torch.testing.assert_close(floats(rank0["params"]), expected, rtol=0, atol=1e-12)
    assert rank0["params"] != hexes(model(INIT_SEED)), "training must have moved the parameters"

    assert rank0["initial_identical"] and rank1["initial_identical"]
    # Rank 1 asked for another PCGrad seed and was told rank 0's is used.
    assert (rank0["seed_overridden"], rank1["seed_overridden"]) == (0, 1)
    # Control: per-rank PCGrad shuffles make the replicas drift, and verify_replicas says so on both ranks.
    for r in (rank0, rank1):
        assert r["control_error"].startswith("ReplicaMismatchError") and "rank(s) [1]" in r["control_error"]
        assert (
            r["perturbed_error"].startswith("ReplicaMismatchError") and "2.bias on rank(s) [1]" in r["perturbed_error"]
        )


def test_halt_on_rank_one_stops_rank_zero_at_the_next_step_boundary(tmp_path):
    workers.run("halt", tmp_path)
    rank0, rank1 = workers.results("halt", tmp_path)

    assert rank0["stopped_at"] == rank1["stopped_at"] == 3
    assert rank0["steps_done"] == rank1["steps_done"] == 3
    assert rank0["params"] == rank1["params"]
    # Rank 0 never raised anything itself: it followed rank 1, and its own controller now holds HALT.
    assert (rank0["level"], rank0["local_level"], rank0["source_rank"], rank0["from_other_rank"]) == (
        "HALT",
        "NONE",
        1,
        True,
    )
    assert rank0["controller_level"] == "HALT"
    assert rank0["remote_events"] == [{"severity": "critical", "source_rank": 1, "level": "HALT"}]
    assert (rank1["level"], rank1["local_level"], rank1["source_rank"], rank1["from_other_rank"]) == (
        "HALT",
        "HALT",
        1,
        False,
    )
    assert rank1["remote_events"] == []
    assert rank0["any_rank_one"] is rank1["any_rank_one"] is True
    assert rank0["any_rank_none"] is rank1["any_rank_none"] is False
    assert rank0["json"] == rank1["json"] == {"run_dir": "runs/from-rank-0", "n": [1, 2.5, None]}
    assert rank0["json_error"] == "TypeError: Object of type set is not JSON serializable"
    assert rank1["json_error"] == "DistributedError: rank 0 could not broadcast its value: " + rank0["json_error"]


def test_checkpoint_on_rank_zero_resumes_on_both_ranks(tmp_path):
    workers.run("checkpoint", tmp_path)
    rank0, rank1 = workers.results("checkpoint", tmp_path)

    # Failures on one rank reach every rank instead of leaving the others waiting.
    assert rank0["no_checkpoint"].startswith("CheckpointError: no committed checkpoint")
    assert rank1["no_checkpoint"].startswith("CheckpointError: rank 0 could not restore a checkpoint")
    for r in (rank0, rank1):
        assert r["step_mismatch"].startswith(
            "ReplicaMismatchError: ranks disagree on the step to checkpoint: steps 5..6"
        )
        assert r["diverged"].startswith("ReplicaMismatchError: the model replicas differ from rank 0 in 4 of 4 entries")
    assert not list((tmp_path / "checkpoints").glob("ckpt-*-*.pt"))[1:], "only the step-2 checkpoint may exist"

    # Committed before checkpoint_barrier returned, on every rank.
    assert rank0["entry"] == rank1["entry"] and rank0["entry"]["step"] == 2
    assert rank1["manifest_lists_it"] and rank1["file_present"]

    for r in (rank0, rank1):
        assert r["restored"] == r["entry"]
        assert r["extra"] == {"epoch": "1", "pair": "(1, 2.5)", "names": "['a', 'b']", "lr": "{0: 0.1}"}
        assert r["extra_types"]["generator"] == "Tensor"
        assert r["momentum_restored"]
        assert r["resumed_params"] == r["at_checkpoint"]
        # Model, momentum and PCGrad's generator all came back: the continuation is bit for bit the same.
        assert r["continued"] == r["uninterrupted"]
    assert rank0["continued"] == rank1["continued"]
    assert rank1["misfit"].startswith("StateMismatchError: checkpoint of step 2 (ckpt-")
    assert "broadcast from rank 0" in rank1["misfit"]
    assert rank0["misfit"].startswith("DistributedError: resuming from the checkpoint of step 2 failed on rank 1")

    # One telemetry file per rank, every record tagged with its rank and the one run id.
    files = sorted(p.name for p in (tmp_path / "telemetry").iterdir())
    assert files == ["telemetry-rank0.jsonl", "telemetry-rank1.jsonl"]
    run_ids = set()
    for rank in (0, 1):
        records = workers.records(tmp_path / "telemetry" / f"telemetry-rank{rank}.jsonl")
        assert records and all(r["rank"] == rank and r["world_size"] == 2 for r in records)
        run_ids |= {r["run_id"] for r in records}
        kinds = {r["kind"] for r in records}
        assert "distributed.resumed" in kinds
        assert ("state.checkpoint_committed" in kinds) == (rank == 0)
        assert ("distributed.checkpoint_committed" in kinds) == (rank == 1)
    assert len(run_ids) == 1
