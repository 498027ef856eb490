"""DCP checkpoints of an FSDP2 run: written on 4 gloo ranks, resumed (resharded) on 2, one launch."""

import pytest

from .sharded_checkpoint_worker import RESUME_WORLD_SIZE, WORLD_SIZE, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_written_on_four_ranks_resumed_on_two_from_the_newest_checkpoint_that_verifies(tmp_path):
    results = run(tmp_path)
    first = results[0]
    # Every rank wrote its shard of both checkpoints; the manifest lists each rank's file.
    for r in results:
        assert r["entries"] == first["entries"]
    assert [step for step, _, _ in first["entries"]] == [2, 3]
    for _, world_size, files in first["entries"]:
        assert world_size == WORLD_SIZE
        assert files == [".metadata", *(f"__{rank}_0.distcp" for rank in range(WORLD_SIZE)), "extra.pt"]
    # The same unsharded values on every rank when written (the full tensors are gathered).
    assert all(r["written_2"] == first["written_2"] for r in results)

    resumed = results[:RESUME_WORLD_SIZE]
    for r in resumed:
        # Step 3's checkpoint has a flipped byte: refused, reported, and step 2's used instead.
        assert r["restored_step"] == 2
        assert r["restored_extra_ok"]
        # Resharded from 4 to 2 ranks: every parameter, Adam moment and step count exactly as written.
        assert r["resumed"] == first["written_2"]
        assert r["lr_after_resume"] == 0.05  # the optimizer's hyperparameters came back too
        # The uncommitted folders were never listed, and are gone.
        assert r["leftovers_after"] == ["ckpt-000000000002-00000001", "ckpt-000000000003-00000002", "manifest.json"]
    # Shards of 13 x 7 weights: 28 (7 on the last rank, FSDP2 pads it) on 4 ranks, 49 and 42 on 2.
    assert [r["local_numel"] for r in results] == [28, 28, 28, 7]
    assert [r["resumed_local_numel"] for r in resumed] == [49, 42]

    kinds = [kind for kind, _ in first["events"]]
    assert kinds == ["state.leftovers_removed", "state.leftovers_removed", "state.checkpoint_invalid", "state.restored"]
    invalid = first["events"][2][1]
    assert "checkpoint of step 3" in invalid and "checksum mismatch" in invalid and "__3_0.distcp" in invalid
    assert "falling back to the previous checkpoint" in invalid

    # Rollback snapshots hold each rank's own shard and restore it in place.
    for r in results:
        assert r["rollback_ok"] and r["rollback_tier"] == "fast" and r["moved_by_step"]
        assert r["after_rollback"] == first["written_2"]
    assert [r["snapshot_bytes"] for r in results][-1] < results[0]["snapshot_bytes"]  # the padded last shard
