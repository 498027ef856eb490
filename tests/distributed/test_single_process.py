"""The distributed glue in one process: no-op collectives, sharding, input validation, the helpers."""

import json
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, WeightedRandomSampler

from tolaria.aggregation import GradientBuffer, PCGrad
from tolaria.distributed import (
    LAUNCH_ENV_VARS,
    DistributedContext,
    DistributedError,
    ShardedLoader,
    agree_on_emergency,
    agree_on_emergency_level,
    allreduce_gradient_buffer,
    allreduce_mean,
    any_rank,
    broadcast_module_state,
    broadcast_tree,
    bucket_slices,
    checkpoint_barrier,
    ddp_wrap,
    rank_telemetry,
    resume_from_checkpoint,
    shard,
    synchronized_generator,
    telemetry_file_name,
    tensor_fingerprint,
    verify_buffer_layout,
    verify_replicas,
)
from tolaria.distributed.collectives import decode_tree as _decode
from tolaria.distributed.collectives import encode_tree as _encode
from tolaria.emergency import EmergencyLevel
from tolaria.state import CheckpointError, StateManager
from tolaria.telemetry import MemorySink, TelemetryEmitter

CPU = torch.device("cpu")


@pytest.fixture
def single():
    return DistributedContext.single_process(CPU)


def rank_of_two(rank):
    """A 2-rank context with no process group behind it: enough for sharding, which needs no collective."""
    return DistributedContext(rank, 2, rank, CPU, "gloo")


ONE_RANK_LAUNCH = {
    "RANK": "0",
    "WORLD_SIZE": "1",
    "LOCAL_RANK": "0",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
}


def launch_env(monkeypatch, **values):
    """Sets the torchrun launch variables given in ``values`` and removes the others."""
    unknown = set(values) - set(LAUNCH_ENV_VARS)
    assert not unknown, f"not launch variables: {sorted(unknown)}"
    for name in LAUNCH_ENV_VARS:
        if name in values:
            monkeypatch.setenv(name, values[name])
        else:
            monkeypatch.delenv(name, raising=False)


def small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


# ---- the context -------------------------------------------------------------------------------------


def test_single_process_context(single):
    assert (single.rank, single.world_size, single.local_rank, single.device) == (0, 1, 0, CPU)
    assert single.is_main and not single.is_distributed and single.backend is None
    single.barrier()
    with single as ctx:
        assert ctx is single
    assert single.closed
    with pytest.raises(DistributedError, match="closed"):
        single.barrier()


def test_from_environment_without_launch_variables_is_single_process(monkeypatch):
    launch_env(monkeypatch)
    ctx = DistributedContext.from_environment(device="cpu")
    assert (ctx.world_size, ctx.is_distributed, ctx.device) == (1, False, CPU)


def test_from_environment_names_missing_launch_variables(monkeypatch):
    launch_env(monkeypatch, RANK="1")
    with pytest.raises(DistributedError, match="RANK set but WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing"):
        DistributedContext.from_environment()


def test_from_environment_rejects_non_integer_rank(monkeypatch):
    launch_env(monkeypatch, **{**ONE_RANK_LAUNCH, "RANK": "one", "WORLD_SIZE": "2"})
    with pytest.raises(DistributedError, match="RANK='one' is not an integer"):
        DistributedContext.from_environment(device="cpu")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(backend="nccl", device="cpu"), "nccl' needs a CUDA device"),
        (dict(backend="mpi", device="cpu"), "unknown backend 'mpi'"),
        (dict(device="cpu", timeout_s=0), "timeout_s must be"),
    ],
)
def test_from_environment_rejects_bad_options(monkeypatch, kwargs, match):
    launch_env(monkeypatch, **ONE_RANK_LAUNCH)
    with pytest.raises(ValueError, match=match):
        DistributedContext.from_environment(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_from_environment_refuses_cuda_without_cuda(monkeypatch):
    launch_env(monkeypatch, **ONE_RANK_LAUNCH)
    with pytest.raises(DistributedError, match="device 'cuda' was asked for, but CUDA is not available"):
        DistributedContext.from_environment(device="cuda")


def test_from_process_group_needs_one():
    with pytest.raises(DistributedError, match="no default process group"):
        DistributedContext.from_process_group()


@pytest.mark.parametrize(
    "args, match",
    [
        ((2, 2, 0, "cpu", "gloo"), "rank 2 is out of range for world_size 2"),
        ((0, 2, 0, "cpu", None), "must have world_size 1"),
        ((0, 0, 0, "cpu", "gloo"), "world_size must be an int >= 1"),
        ((True, 2, 0, "cpu", "gloo"), "rank must be an int"),
    ],
)
def test_context_rejects_bad_fields(args, match):
    with pytest.raises(ValueError, match=match):
        DistributedContext(*args)


def test_a_context_whose_process_group_is_gone_refuses_collectives():
    ctx = rank_of_two(0)
    with pytest.raises(DistributedError, match="process group .* was destroyed"):
        allreduce_gradient_buffer(torch.zeros(2, 3), ctx)


# ---- collectives are no-ops in one process ---------------------------------------------------------


def test_single_process_collectives_change_nothing(single):
    buf = torch.randn(3, 10, dtype=torch.float64)
    before = buf.clone()
    assert allreduce_gradient_buffer(buf, single) is buf
    assert torch.equal(buf, before)
    losses = torch.tensor([1.0, 2.0])
    assert torch.equal(allreduce_mean(losses, single), torch.tensor([1.0, 2.0]))
    assert any_rank(True, single) is True and any_rank(False, single) is False
    assert agree_on_emergency_level(EmergencyLevel.ELEVATED, single) == EmergencyLevel.ELEVATED
    agreement = agree_on_emergency(0, single)
    assert (agreement.level, agreement.source_rank, agreement.from_other_rank) == (EmergencyLevel.NONE, None, False)
    tree = {"a": torch.ones(2)}
    assert broadcast_tree(tree, single) is tree
    model = small_model()
    broadcast_module_state(model, single)
    verify_replicas(model, single)
    verify_buffer_layout(GradientBuffer(model, num_sources=2), single)
    assert ddp_wrap(model, single) is model


def test_gradient_buffer_allreduce_accepts_a_gradient_buffer(single):
    model = small_model()
    buf = GradientBuffer(model, num_sources=2)
    out = model(torch.randn(5, 3, dtype=torch.float64))
    buf.backward([out[:, 0].sum(), out[:, 1].sum()])
    expected = buf.buffer.clone()
    assert allreduce_gradient_buffer(buf, single, bucket_mb=1e-4) is buf.buffer
    assert torch.equal(buf.buffer, expected)


def test_synchronized_generator_is_seeded_with_the_seed(single):
    gen = synchronized_generator(42, single)
    expected = torch.rand(5, generator=torch.Generator().manual_seed(42))
    assert torch.equal(torch.rand(5, generator=gen), expected)
    sink = MemorySink()
    drawn = synchronized_generator(None, single, telemetry=TelemetryEmitter([sink], batch_size=1))
    (event,) = sink.of_kind("distributed.seed_drawn")
    assert drawn.initial_seed() == event["seed"]


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True, "7"])
def test_synchronized_generator_rejects_bad_seeds(single, seed):
    with pytest.raises(ValueError, match="seed must be an int in"):
        synchronized_generator(seed, single)


@pytest.mark.parametrize("level", [5, -1, True, 2.0, "HALT"])
def test_emergency_agreement_rejects_bad_levels(single, level):
    with pytest.raises(ValueError, match="invalid emergency level"):
        agree_on_emergency_level(level, single)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (torch.zeros(2, 3, dtype=torch.int64), TypeError, "must be floating point"),
        (torch.zeros(3, 2).T, ValueError, "must be contiguous or a K x N view with unit column stride"),
        (torch.zeros(3, 8)[:, ::2], ValueError, "must be contiguous or a K x N view"),
        ([1.0, 2.0], TypeError, "GradientBuffer or a tensor"),
    ],
)
def test_gradient_buffer_allreduce_rejects_bad_buffers(single, bad, error, match):
    with pytest.raises(error, match=match):
        allreduce_gradient_buffer(bad, single)


@pytest.mark.parametrize("bucket_mb", [0, -1.0, math.nan, math.inf, True])
def test_bucket_size_must_be_positive(single, bucket_mb):
    with pytest.raises(ValueError, match="bucket_mb must be"):
        allreduce_gradient_buffer(torch.zeros(2, 3), single, bucket_mb=bucket_mb)


def test_functions_name_a_wrong_context():
    with pytest.raises(TypeError, match="ctx must be a DistributedContext, got str"):
        allreduce_gradient_buffer(torch.zeros(2, 3), "cpu")


def test_a_padded_buffer_is_reduced_over_its_storage_span():
    from tolaria.distributed.collectives import flat_span as _flat_span

    storage = torch.arange(3 * 40, dtype=torch.float32).view(3, 40)
    view = storage[:, :33]
    span = _flat_span(view)
    assert span.data_ptr() == view.data_ptr() and span.numel() == 2 * 40 + 33
    span.mul_(0)
    assert not view.any() and storage[2, 33:].all(), "the span covers the view and the padding between rows only"


def test_bucket_slices_cover_the_buffer_exactly():
    slices = bucket_slices(1000, 4, 1000 / (1 << 20))  # 250 float32 per bucket
    assert slices == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    assert bucket_slices(10, 8, 25) == [(0, 10)]
    assert bucket_slices(5, 8, 1e-9) == [(i, i + 1) for i in range(5)]  # at least one element per bucket
    assert bucket_slices(0, 4, 25) == []


# ---- checkpoints in one process --------------------------------------------------------------------


def test_single_process_checkpoint_and_resume_go_through_the_state_manager(single, tmp_path):
    model, other = small_model(0), small_model(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with StateManager(tmp_path / "ckpt", fast_cache_mb=0) as state:
        with pytest.raises(CheckpointError, match="no committed checkpoint"):
            resume_from_checkpoint(state, single, model, opt)
        entry = checkpoint_barrier(state, single, 3, model, opt, {"epoch": 1})
        assert entry.step == 3
        other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
        restored = resume_from_checkpoint(state, single, other, other_opt)
    assert (restored.step, restored.extra) == (3, {"epoch": 1})
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))


def test_rank_zero_needs_a_state_manager(single):
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="rank 0 writes and reads the checkpoints: it needs a StateManager"):
        checkpoint_barrier(None, single, 0, model, opt)
    with pytest.raises(TypeError, match="state must be a StateManager"):
        resume_from_checkpoint("runs/x", single, model, opt)


# ---- sharding ----------------------------------------------------------------------------------------


def data(n=10):
    return TensorDataset(torch.arange(n))


def indices(loader):
    return [int(i) for (batch,) in loader for i in batch]


def test_shards_are_disjoint_equal_and_cover_the_data():
    shards = [shard(data(), rank_of_two(r), batch_size=2, seed=3) for r in (0, 1)]
    for s in shards:
        s.set_epoch(0)
    first, second = indices(shards[0]), indices(shards[1])
    assert len(first) == len(second) == 5
    assert sorted(first + second) == list(range(10))
    for s in shards:
        s.set_epoch(1)
    assert indices(shards[0]) + indices(shards[1]) != first + second, "set_epoch must reshuffle"


def test_a_single_process_shard_is_the_whole_data(single):
    loader = shard(data(), single, batch_size=3, shuffle=False)
    assert indices(loader) == list(range(10)) and len(loader) == 4


def test_uneven_data_is_reported():
    sink = MemorySink()
    telemetry = TelemetryEmitter([sink], batch_size=1)
    shard(data(9), rank_of_two(0), batch_size=2, telemetry=telemetry)
    shard(data(9), rank_of_two(0), batch_size=2, drop_last=True, telemetry=telemetry)
    messages = [r["message"] for r in sink.of_kind("distributed.shard_uneven")]
    assert messages == [
        "9 samples do not divide over 2 ranks: the sharding repeats 1 sample(s) per epoch",
        "9 samples do not divide over 2 ranks: the sharding drops 1 sample(s) per epoch",
    ]


def test_iterating_again_without_set_epoch_is_reported():
    sink = MemorySink()
    loader = shard(data(), rank_of_two(1), batch_size=2, telemetry=TelemetryEmitter([sink], batch_size=1))
    loader.set_epoch(0)
    indices(loader)
    assert not sink.of_kind("distributed.epoch_not_advanced")
    indices(loader)
    assert len(sink.of_kind("distributed.epoch_not_advanced")) == 1
    loader.set_epoch(1)
    indices(loader)
    assert len(sink.of_kind("distributed.epoch_not_advanced")) == 1


def test_a_dataloader_keeps_its_options():
    collate = lambda items: torch.stack([x for (x,) in items]) * 10  # noqa: E731
    original = DataLoader(data(), batch_size=3, shuffle=True, collate_fn=collate, drop_last=True)
    loader = shard(original, rank_of_two(1))
    assert isinstance(loader, ShardedLoader)
    assert loader.loader.batch_size == 3 and loader.loader.drop_last and loader.sampler.shuffle
    batches = list(loader)
    assert len(batches) == 1 and all(int(v) % 10 == 0 for v in batches[0])
    assert not shard(DataLoader(data(), batch_size=3), rank_of_two(0)).sampler.shuffle


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(3))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (Stream(), dict(batch_size=2)), TypeError, "cannot shard an IterableDataset"),
        (lambda: (data(), {}), ValueError, "batch_size is required"),
        (lambda: (data(), dict(batch_size=2, sampler=None)), ValueError, r"\['sampler'\] are set by shard"),
        (lambda: (DataLoader(data(), batch_size=2), dict(batch_size=2)), ValueError, "brings its own batch size"),
        (
            lambda: (DataLoader(data(), sampler=WeightedRandomSampler([1.0] * 10, 10)), {}),
            ValueError,
            "custom sampler \\(WeightedRandomSampler\\)",
        ),
        (lambda: (DataLoader(data(), batch_sampler=[[0, 1]]), {}), ValueError, "custom batch_sampler"),
        (
            lambda: (DataLoader(data(), sampler=torch.utils.data.RandomSampler(data(), replacement=True)), {}),
            ValueError,
            "with replacement",
        ),
        (lambda: ([1, 2, 3, 4], dict(batch_size=2, seed=1.5)), ValueError, "seed must be an int"),
        (lambda: (object(), dict(batch_size=2)), TypeError, "map-style Dataset"),
    ],
)
def test_shard_rejects_what_it_cannot_shard(make, error, match):
    source, kwargs = make()
    with pytest.raises(error, match=match):
        shard(source, rank_of_two(0), **kwargs)


# ---- helpers -----------------------------------------------------------------------------------------


def test_state_trees_round_trip_without_pickle():
    tree = OrderedDict(
        weights=torch.arange(6, dtype=torch.float32).reshape(2, 3),
        state={0: {"step": torch.tensor(3.0), "flag": torch.tensor([True, False])}, 1: {}},
        groups=[{"lr": 0.1, "betas": (0.9, 0.999), "nesterov": False, "foreach": None, "name": "g"}],
        misc={
            "blob": b"\x00\xff",
            "z": 1 + 2j,
            "dtype": torch.bfloat16,
            "device": torch.device("cpu"),
            "size": torch.Size([2, 3]),
            "nan": math.nan,
            (1, "a"): "tuple key",
        },
    )
    tensors = []
    skeleton = json.loads(json.dumps(_encode(tree, tensors, "state")))
    back = _decode(skeleton, tensors)
    assert isinstance(back, OrderedDict) and list(back) == ["weights", "state", "groups", "misc"]
    assert back["state"][0]["step"] is tree["state"][0]["step"]
    assert back["groups"][0]["betas"] == (0.9, 0.999) and isinstance(back["groups"][0]["betas"], tuple)
    assert set(back["state"]) == {0, 1}
    misc = back["misc"]
    assert (misc["blob"], misc["z"], misc["dtype"], misc["device"], misc["size"]) == (
        b"\x00\xff",
        1 + 2j,
        torch.bfloat16,
        torch.device("cpu"),
        torch.Size([2, 3]),
    )
    assert math.isnan(misc["nan"]) and misc[(1, "a")] == "tuple key"


def test_state_trees_name_what_cannot_travel():
    with pytest.raises(TypeError, match=r"state\['opt'\]\[0\]: cannot broadcast a builtins.set"):
        _encode({"opt": [{1, 2}]}, [], "state")


def test_fingerprints_see_one_bit_and_a_swap():
    t = torch.randn(1000, dtype=torch.float32)
    assert tensor_fingerprint(t) == tensor_fingerprint(t.clone())
    flipped = t.clone()
    flipped.view(torch.int32)[517] ^= 1
    assert tensor_fingerprint(flipped)[0] != tensor_fingerprint(t)[0]
    swapped = t.clone()
    swapped[[3, 900]] = swapped[[900, 3]]
    assert tensor_fingerprint(swapped)[1] != tensor_fingerprint(t)[1]
    odd = torch.arange(7, dtype=torch.uint8)
    assert tensor_fingerprint(odd) != tensor_fingerprint(odd.flip(0))
    assert tensor_fingerprint(torch.tensor([True, False, True])) != tensor_fingerprint(
        torch.tensor([True, True, False])
    )
    assert tensor_fingerprint(torch.arange(9, dtype=torch.uint8)[1:]) == tensor_fingerprint(
        torch.arange(1, 9, dtype=torch.uint8)
    )


def test_telemetry_in_one_process(single, tmp_path):
    assert telemetry_file_name(single) == "telemetry.jsonl"
    assert telemetry_file_name(rank_of_two(1)) == "telemetry-rank1.jsonl"
    emitter = rank_telemetry(single, tmp_path, run_id="run-7")
    emitter.event("hello")
    emitter.close()
    (record,) = [
        json.loads(line)
        for line in (tmp_path / "telemetry.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "hello"
    ]
    assert (record["rank"], record["world_size"], record["local_rank"], record["run_id"]) == (0, 1, 0, "run-7")


def test_ddp_wrap_checks_its_input(single):
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        ddp_wrap("model", single)
    with pytest.raises(ValueError, match="sets \\['device_ids'\\] from the context"):
        ddp_wrap(small_model(), single, device_ids=[0])
    meta_model = nn.Linear(2, 2, device="meta")
    with pytest.raises(ValueError, match="parameter 'weight' is on meta, but this rank's device is cpu"):
        ddp_wrap(meta_model, single)


def test_pcgrad_with_a_synchronized_generator_is_reproducible(single):
    grads = torch.randn(4, 50, dtype=torch.float64)
    grads[1] = -grads[0] + 0.1 * torch.randn(50, dtype=torch.float64)
    first = PCGrad(generator=synchronized_generator(5, single))(grads)
    second = PCGrad(generator=synchronized_generator(5, single))(grads)
    assert torch.equal(first, second)


def test_broadcast_json_in_one_process_returns_the_value(single):
    from tolaria.distributed import broadcast_json

    value = {"run_dir": "runs/a"}
    assert broadcast_json(value, single) is value
