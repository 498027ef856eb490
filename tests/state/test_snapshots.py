"""The fast tier: snapshot copies, exact byte accounting, LRU eviction, fast rollback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tolaria.state import SnapshotCache, StateError, StateManager
from tolaria.state.trees import pack, packed_nbytes, tensors_of
from tolaria.telemetry import TelemetryEmitter

from .helpers import assert_state_equal, full_state, make_adam, make_model, train_steps


@pytest.fixture
def manager(tmp_path, sink):
    with StateManager(
        tmp_path / "state", fast_cache_mb=1, keep_last=2, telemetry=TelemetryEmitter([sink], batch_size=1)
    ) as m:
        yield m


def _tree(n: int, fill: float = 1.0) -> dict:
    return {"w": torch.full((n,), fill), "b": torch.zeros(3, dtype=torch.bfloat16), "k": 7, "name": "x"}


def test_pack_accounts_exact_bytes_and_copies():
    tree = {"a": torch.randn(10), "b": [torch.arange(5), torch.ones(2, 3, dtype=torch.float16)], "c": (1, "s")}
    packed = pack(tree)
    buffers = packed._buffers.values()
    assert packed.nbytes == sum(b.numel() * b.element_size() for b in buffers) == packed_nbytes(tree)
    out = packed.unpack()
    tree["a"].add_(1.0)  # the snapshot is a copy, not a view of the source
    assert not torch.equal(out["a"], tree["a"])
    assert torch.equal(out["b"][0], torch.arange(5)) and out["b"][1].dtype == torch.float16
    assert out["c"] == (1, "s")
    assert all(t.data_ptr() % 64 == 0 for t in tensors_of(out) if t.numel())


def test_replacing_a_step_releases_its_bytes():
    cache = SnapshotCache(capacity_bytes=10_000)
    first = cache.put(1, _tree(100))
    assert cache.nbytes == first.nbytes
    for i in range(20):  # the same step again and again: the total never grows
        info = cache.put(1, _tree(100, fill=float(i)))
        assert info.replaced and cache.nbytes == first.nbytes
    bigger = cache.put(1, _tree(300))
    assert cache.nbytes == bigger.nbytes > first.nbytes
    assert cache.steps() == [1]


def test_lru_eviction_keeps_within_budget_and_counts_exactly():
    one = packed_nbytes(_tree(100))
    cache = SnapshotCache(capacity_bytes=3 * one)
    for step in range(3):
        cache.put(step, _tree(100))
    assert cache.nbytes == 3 * one and cache.steps() == [0, 1, 2]
    assert cache.get(0) is not None  # step 0 becomes most recently used; step 1 is now the oldest
    info = cache.put(3, _tree(100))
    assert info.evicted == (1,) and cache.steps() == [0, 2, 3] and cache.nbytes == 3 * one
    info = cache.put(4, _tree(150))  # needs about one and a half slots: the two oldest go
    assert set(info.evicted) == {2, 0} and cache.nbytes <= cache.capacity_bytes
    assert cache.nbytes == sum(cache.get(s).nbytes for s in cache.steps())
    assert cache.discard(4) and not cache.discard(4)
    assert cache.nbytes == sum(cache.get(s).nbytes for s in cache.steps())
    cache.clear()
    assert cache.nbytes == 0 and len(cache) == 0


def test_oversized_snapshot_is_refused_without_touching_the_cache():
    cache = SnapshotCache(capacity_bytes=packed_nbytes(_tree(100)))
    cache.put(1, _tree(100))
    with pytest.raises(StateError, match="raise fast_cache_mb"):
        cache.put(2, _tree(10_000))
    assert cache.steps() == [1]


def test_manager_fast_cache_bytes_tracks_snapshots(manager):
    model = make_model()
    opt = make_adam(model)
    train_steps(model, opt, 1)
    a = manager.snapshot(1, model, opt)
    assert manager.fast_cache_bytes == a.nbytes
    b = manager.snapshot(2, model, opt, extra={"counter": torch.arange(4)})
    assert manager.fast_cache_bytes == a.nbytes + b.nbytes and b.nbytes > a.nbytes
    again = manager.snapshot(2, model, opt)  # replaced: the extra's bytes are released
    assert again.replaced and manager.fast_cache_bytes == a.nbytes + again.nbytes
    assert manager.snapshot_steps == [1, 2]


def test_fast_rollback_restores_bitwise_and_snapshot_is_not_aliased(manager):
    model = make_model()
    opt = make_adam(model)
    train_steps(model, opt, 3)
    manager.snapshot(3, model, opt, extra={"lr_step": 3})
    expected = full_state(model, opt)
    for round_ in range(3):  # training after a restore must not write into the snapshot
        train_steps(model, opt, 2, seed=round_ + 1)
        result = manager.rollback(5, model, opt, deadline_s=5.0)
        assert result.ok and result.tier == "fast" and result.step == 3, result
        assert result.extra == {"lr_step": 3} and not result.deadline_missed
        assert_state_equal(expected, model, opt)


def test_fast_rollback_picks_nearest_at_or_before(manager):
    model = make_model()
    opt = make_adam(model)
    states = {}
    for step in (10, 20, 30):
        train_steps(model, opt, 1, seed=step)
        manager.snapshot(step, model, opt)
        states[step] = full_state(model, opt)
    result = manager.rollback(25, model, opt, deadline_s=5.0)
    assert result.ok and result.step == 20
    assert_state_equal(states[20], model, opt)
    result = manager.rollback(5, model, opt, deadline_s=5.0)
    assert not result.ok and result.tier is None and "no snapshot or checkpoint at or before step 5" in result.reason
    assert not result.deadline_missed


def test_fast_restore_into_fresh_optimizer(manager):
    model = make_model()
    opt = make_adam(model)
    train_steps(model, opt, 2)
    manager.snapshot(2, model, opt)
    expected = full_state(model, opt)
    fresh_model = make_model(seed=5)
    fresh_opt = make_adam(fresh_model)  # no state yet: loaded through load_state_dict, from a private copy
    assert manager.rollback(2, fresh_model, fresh_opt, deadline_s=5.0).ok
    assert_state_equal(expected, fresh_model, fresh_opt)
    train_steps(fresh_model, fresh_opt, 1)
    assert manager.rollback(2, fresh_model, fresh_opt, deadline_s=5.0).ok
    assert_state_equal(expected, fresh_model, fresh_opt)


def test_optimizer_mismatch_is_a_failed_result_and_nothing_changes(manager, sink):
    model = make_model()
    opt = make_adam(model)
    train_steps(model, opt, 1)
    manager.snapshot(1, model, opt)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_steps(model, sgd, 1)
    before = full_state(model, sgd)
    result = manager.rollback(1, model, sgd, deadline_s=5.0)
    assert not result.ok and result.error == "OptimizerStateError"
    assert "saved from torch.optim.adam.Adam" in result.reason and "SGD" in result.reason
    assert_state_equal(before, model, sgd)
    assert sink.of_kind("state.rollback_failed")


def test_model_mismatch_names_the_key(manager):
    model = make_model()
    opt = make_adam(model)
    manager.snapshot(1, model, opt)
    wider = make_model(width=32)
    result = manager.rollback(1, wider, make_adam(wider), deadline_s=5.0)
    assert not result.ok and result.error == "StateMismatchError" and "'0.weight'" in result.reason


def test_optimizer_group_layout_mismatch_is_reported(manager):
    model = make_model()
    opt = make_adam(model)
    train_steps(model, opt, 1)
    manager.snapshot(1, model, opt)
    params = list(model.parameters())
    split = torch.optim.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2)
    result = manager.rollback(1, model, split, deadline_s=5.0)
    assert not result.ok and result.error == "OptimizerStateError" and "parameter groups" in result.reason


def test_snapshot_keeps_mixed_dtypes_and_buffers(manager):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).to(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4, dtype=torch.float64)).sum().backward()
    opt.step()
    manager.snapshot(1, model, opt)
    expected = full_state(model, opt)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model[1].running_mean.add_(3.0)
    model[1].num_batches_tracked.add_(1)
    assert manager.rollback(1, model, opt, deadline_s=5.0).ok
    assert_state_equal(expected, model, opt)


def test_snapshot_requires_a_valid_step(manager):
    model = make_model()
    with pytest.raises(ValueError, match="step must be an integer"):
        manager.snapshot(-1, model, make_adam(model))


@pytest.mark.gpu
def test_cuda_snapshot_is_pinned_and_restores_onto_cpu_after_fallback(tmp_path):
    model = make_model().cuda()
    opt = make_adam(model)
    x = torch.randn(6, 8, device="cuda")
    model(x).sum().backward()
    opt.step()
    with StateManager(tmp_path / "s", fast_cache_mb=4) as manager:
        manager.snapshot(1, model, opt)
        snapshot = manager._snapshots.get(1)
        assert snapshot.packed.pinned
        expected = full_state(model, opt)
        cpu_model = make_model(seed=3)
        cpu_opt = make_adam(cpu_model)
        assert manager.rollback(1, cpu_model, cpu_opt, deadline_s=5.0).ok
        assert_state_equal(expected, cpu_model, cpu_opt)
        manager.checkpoint(1, model, opt)
        other = make_model(seed=4)
        other_opt = make_adam(other)
        assert manager.restore_latest(other, other_opt) == 1
        assert_state_equal(expected, other, other_opt)
