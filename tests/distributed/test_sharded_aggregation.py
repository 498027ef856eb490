"""The sharded aggregation engine in one process: W "ranks" as threads, each holding a column shard,
their ``reduce_sum`` a barrier-synchronised sum; the aggregate must equal the one-process aggregate."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from tolaria.aggregation import AGGREGATOR_NAMES, ExcessMTL, GradDrop, Mean, UPGrad, build_aggregator
from tolaria.aggregation.sharded import check_shardable, column_ranges, sharded_aggregate

WORLD = 3
TIMEOUT_S = 20


def _kwargs(name: str, k: int) -> dict:
    kwargs: dict = {"nonfinite": "propagate"}
    if name in ("weighted", "constant"):
        kwargs["weights"] = [1.0 + 0.25 * i for i in range(k)]
    if build_aggregator(name, **({"weights": [1.0] * k} if "weights" in kwargs else {})).takes_generator():
        kwargs["generator"] = torch.Generator().manual_seed(3)
    if name == "trimmed_mean":
        kwargs["trim_number"] = (k - 1) // 2
    return kwargs


def _matrix(k: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    j = torch.randn(k, n, generator=g, dtype=torch.float64)
    if k > 1:
        j[1] = -0.7 * j[0] + 0.2 * j[1]  # a conflict, so the projecting methods project
    return j


class ThreadRanks:
    """W threads as ranks; ``reducer(r)`` sums a tensor over them in rank order (as an all-reduce does)."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=TIMEOUT_S)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.calls = [0] * world

    def reducer(self, rank: int):
        def reduce_sum(t: torch.Tensor) -> None:
            self.calls[rank] += 1
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = self.slots[0].clone()
            for other in self.slots[1:]:
                total += other
            self.barrier.wait()
            t.copy_(total)

        return reduce_sum

    def run(self, work):
        results, errors = [None] * self.world, [None] * self.world

        def target(rank: int) -> None:
            try:
                results[rank] = work(rank, self.reducer(rank))
            except BaseException as exc:  # reported by the test, with its rank (a rank left waiting times out)
                errors[rank] = exc

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results, errors


def _bounds(n: int, world: int) -> list[tuple[int, int]]:
    chunk = -(-n // world)
    return [(min(n, r * chunk), min(n, (r + 1) * chunk)) for r in range(world)]


def _sharded_run(aggregators, calls, world=WORLD):
    """Every call's J split by columns over ``world`` thread ranks; returns per rank the stitched
    results (per call: shard, stats) and the reduce counts."""
    ranks = ThreadRanks(world)

    def work(rank, reduce_sum):
        out = []
        for j in calls:
            start, stop = _bounds(j.shape[1], world)[rank]
            flat, stats = sharded_aggregate(
                aggregators[rank], j[:, start:stop], reduce_sum=reduce_sum, columns=start, return_stats=True
            )
            out.append((flat.clone(), stats))
        return out

    results, errors = ranks.run(work)
    for rank, error in enumerate(errors):
        if error is not None:
            raise AssertionError(f"rank {rank} failed: {error!r}") from error
    return results, ranks.calls


@pytest.mark.parametrize("name", AGGREGATOR_NAMES)
def test_every_registry_aggregator_matches_one_process_on_column_shards(name):
    for k in (1, 3, 8):
        if name == "krum" and k < 3 + 1:
            continue  # Krum needs n_byzantine + 3 sources
        kwargs = _kwargs(name, k)
        reference = build_aggregator(name, **copy.deepcopy(kwargs))
        ranks = [copy.deepcopy(reference) for _ in range(WORLD)]
        calls = [_matrix(k, 203, seed=s) for s in range(3)]  # three calls: state across calls too
        results, reduces = _sharded_run(ranks, calls)
        for c, j in enumerate(calls):
            expected, expected_stats = reference(j, return_stats=True)
            got = torch.cat([results[r][c][0] for r in range(WORLD)])
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12, msg=f"{name} K={k} call {c}")
            stats = [results[r][c][1] for r in range(WORLD)]
            torch.testing.assert_close(stats[0].gram, expected_stats.gram, rtol=0, atol=1e-12)
            for s in stats[1:]:  # the same G, the same weights on every rank, bit for bit
                assert torch.equal(s.gram, stats[0].gram)
                assert _same(s.weights, stats[0].weights)
            assert _same(stats[0].weights, expected_stats.weights) or torch.allclose(
                stats[0].weights, expected_stats.weights, rtol=0, atol=1e-12
            )
            assert int(stats[0].conflicts) == int(expected_stats.conflicts)
        extra = 1 if name == "excess_mtl" else 0  # its excess risks: one more reduce of K numbers
        assert reduces == [len(calls) * (1 + extra)] * WORLD


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(torch.nan_to_num(a, nan=-7.0), torch.nan_to_num(b, nan=-7.0)) and bool(
        (a.isnan() == b.isnan()).all()
    )


def test_a_nan_on_one_shard_is_seen_by_every_rank_alike():
    j = _matrix(3, 90, seed=4)
    j[2, 70] = float("nan")  # in the last rank's columns only
    raising = [UPGrad() for _ in range(WORLD)]
    ranks = ThreadRanks(WORLD)

    def work(rank, reduce_sum):
        start, stop = _bounds(90, WORLD)[rank]
        sharded_aggregate(raising[rank], j[:, start:stop], reduce_sum=reduce_sum, columns=start)

    _, errors = ranks.run(work)
    assert all(isinstance(e, ValueError) and "gradient source(s) 2" in str(e) for e in errors), errors

    propagating = [ExcessMTL(nonfinite="propagate") for _ in range(WORLD)]
    results, _ = _sharded_run(propagating, [j])
    for r in range(WORLD):
        stats = results[r][0][1]
        assert torch.isnan(stats.gram[2, 2]) and torch.isnan(stats.weights).all()
        assert propagating[r].state_dict()["n_steps"] == 0, "a non-finite call leaves the state alone"


def test_stateful_state_is_shard_local_and_graddrop_draws_the_global_columns():
    calls = [_matrix(4, 100, seed=s) for s in range(2)]
    ranks = [ExcessMTL() for _ in range(WORLD)]
    _sharded_run(ranks, calls)
    widths = [stop - start for start, stop in _bounds(100, WORLD)]
    assert [tuple(a.state_dict()["sq_grad_sum"].shape) for a in ranks] == [(4, w) for w in widths]

    # Shifting a shard's columns changes its draws: the offset is what matches the one-process run.
    j = _matrix(3, 64, seed=9)
    shifted = ThreadRanks(1).run(
        lambda r, red: sharded_aggregate(GradDrop(seed=2), j, reduce_sum=red, columns=1_000_003)
    )[0][0]
    assert not torch.equal(shifted, GradDrop(seed=2)(j))
    assert column_ranges(5, 3) == [(5, 3)] and column_ranges([(0, 2), (10, 1)], 3) == [(0, 2), (10, 1)]
    with pytest.raises(ValueError, match="covering the shard's 4"):
        column_ranges([(0, 2)], 4)


def test_what_cannot_run_sharded_says_so_by_name():
    with pytest.raises(ValueError, match=r"GradDrop\(f=.*cannot run on column shards"):
        check_shardable(GradDrop(f=torch.sigmoid, backend="torch"))
    with pytest.raises(TypeError, match="foreign callable"):
        check_shardable(lambda j: j.sum(0))

    class Custom(Mean):
        def _aggregate(self, sources, out, with_stats):
            raise AssertionError("never called")

    with pytest.raises(ValueError, match="Custom is not a function of the Gram matrix"):
        check_shardable(Custom())


def test_fixed_weights_without_check_or_stats_need_no_collective():
    j = _matrix(3, 50, seed=1)
    out = sharded_aggregate(Mean(nonfinite="propagate"), j, reduce_sum=lambda t: pytest.fail("no reduce"))
    torch.testing.assert_close(out, Mean()(j), rtol=0, atol=1e-15)
