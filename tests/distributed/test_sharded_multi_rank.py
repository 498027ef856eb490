"""Sharded aggregation on 2 and 4 gloo CPU ranks (issue 19): the "zero" and "fsdp" shardings give the
single-process parameters on the combined batch, bit-identical on every rank; a NaN on one rank is
seen by every rank, as in the replicated mode. One launch per world size runs every case."""

from __future__ import annotations

import pytest
import torch

from tolaria.aggregation import GradientBuffer

from . import sharded_workers as w

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # 4 ranks on 2 shared cores can be slow


def _floats(hex_values: list[str]) -> torch.Tensor:
    return torch.tensor([float.fromhex(h) for h in hex_values], dtype=torch.float64)


def _reference(name: str, k: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One process, the combined batch of every step: the parameters and the weights of each step."""
    net = w.Net(k)
    opt, agg = w.optimizer(net), w.aggregator(name, k)
    buf = GradientBuffer(net, k)
    weights = []
    for step in range(w.STEPS):
        x, y = w.combined_batch(step, world, k)
        opt.zero_grad()
        buf.backward(w.losses(net(x), y))
        _, stats = buf.aggregate(agg, return_stats=True)
        weights.append(stats.weights)
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]), torch.cat(weights)


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_modes_match_one_process_and_agree_across_ranks(tmp_path, world):
    w.spawn(world, tmp_path)
    ranks = w.results(world, tmp_path)
    initial = torch.cat([p.detach().reshape(-1) for p in w.Net(3).parameters()])

    for key, case in ranks[0]["cases"].items():
        mode, name, k = key.split("/")
        for other in ranks[1:]:  # the same bits on every rank: parameters and weights
            assert other["cases"][key] == case, f"{key}: ranks differ"
        params, weights = _reference(name, int(k), world)
        torch.testing.assert_close(_floats(case["params"]), params, rtol=0, atol=1e-12, msg=key)
        torch.testing.assert_close(_floats(case["weights"]), weights, rtol=0, atol=1e-12, equal_nan=True, msg=key)
    assert len(ranks[0]["cases"]) == len(w.MODES) * len(w.AGGREGATORS) * len(w.SOURCES)

    # The trainer's stage, a NaN on the last rank at step 1: every rank, every mode sees it and skips.
    stages = ranks[0]["stages"]
    assert [stages[m]["buffer"] for m in ("none", "zero", "fsdp")] == [
        "GradientBuffer",
        "ZeroGradientBuffer",
        "FSDPGradientBuffer",
    ]
    for mode, stage in stages.items():
        for other in ranks[1:]:
            assert other["stages"][mode] == stage, f"stage {mode}: ranks differ"
        assert [s["finite"] for s in stage["steps"]] == [True, False, True], mode
        replicated = stages["none"]
        torch.testing.assert_close(_floats(stage["params"]), _floats(replicated["params"]), rtol=0, atol=1e-12)
        for got, expected in zip(stage["steps"], replicated["steps"]):
            if got["finite"]:
                assert abs(float.fromhex(got["grad_norm"]) - float.fromhex(expected["grad_norm"])) < 1e-12
    assert not torch.equal(_floats(stages["zero"]["params"]), initial), "training must move the parameters"

    if world == 2:  # the Trainer itself under each [distributed] sharding
        runs = ranks[0]["trainer"]
        assert ranks[1]["trainer"] == runs
        assert [runs[m]["buffer"] for m in ("none", "zero", "fsdp")] == [
            "GradientBuffer",
            "ZeroGradientBuffer",
            "FSDPGradientBuffer",
        ]
        for mode, run in runs.items():
            assert (run["status"], run["steps"]) == ("completed", 3), mode  # 12 samples, 2 ranks, batches of 2
            torch.testing.assert_close(_floats(run["params"]), _floats(runs["none"]["params"]), rtol=0, atol=1e-12)

    if world == 4:  # bytes each rank sends in one step's gradient path at K = 8, counted at the collectives
        for rank in ranks:
            sent = rank["bytes"]
            n, k = sent["none_numel"], 8
            assert sent["zero"]["total"] <= 0.6 * sent["none"]["total"], sent
            # fsdp: K reduce-scatters of FSDP2's own (one summed loss), its all-gathers unchanged, the K x K Gram.
            assert sent["fsdp"]["reduce_scatter"] == k * sent["fsdp_summed"]["reduce_scatter"], sent
            assert sent["fsdp"]["all_gather"] == sent["fsdp_summed"]["all_gather"], sent
            assert sent["fsdp"]["all_reduce"] == sent["zero"]["all_reduce"] == 2 * k * k * 8 * 3 // 4, sent
            # Buffer rows: K x N replicated, K x about N / W sharded.
            assert sent["none_rows"] == [k, n]
            assert sent["zero_rows"][0] == k and abs(sent["zero_rows"][1] - n / 4) <= 1
            assert sent["fsdp_rows"][0] == k and sent["fsdp_rows"][1] <= n / 4 + 128 + 8  # a head row at most
