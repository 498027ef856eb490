"""torch.distributed glue: Tolaria on several processes and machines, launched with ``torchrun``.

Every rank holds a full replica of the model and sees its own shard of the data. A multi-source step
stays exact and the replicas stay identical because:

1. each rank fills its K x N :class:`~tolaria.aggregation.GradientBuffer` from its shard;
2. :func:`allreduce_gradient_buffer` averages the buffer over ranks (one bucketed all-reduce), so
   every rank holds the buffer of the combined batch (the mean of equal-sized per-rank mean losses
   is the combined batch's mean loss);
3. every rank runs the same aggregation on the same buffer with a generator seeded identically
   (:func:`synchronized_generator`), so PCGrad's shuffles, the ``.grad`` and the optimizer step agree
   bit for bit.

Around the step: :func:`shard` (``DistributedSampler``), :func:`agree_on_emergency_level` (HALT on any
rank stops every rank at the next step boundary), :func:`checkpoint_barrier` and
:func:`resume_from_checkpoint` (rank 0 writes, every rank resumes), :func:`rank_telemetry` (one
JSONL file per rank, records tagged with the rank), :func:`ddp_wrap` (the single-source path) and
:func:`verify_replicas` (a cheap bitwise check that the replicas agree).

Every function works unchanged in a single process (a :class:`DistributedContext` with
``world_size == 1`` and no process group), where the collectives are no-ops.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

from tolaria.aggregation import GradientBuffer
from tolaria.emergency import EmergencyController, EmergencyLevel, as_level
from tolaria.state import CheckpointEntry, CheckpointError, RestoredState, StateManager
from tolaria.state.manager import _check_step
from tolaria.state.restore import capture, restore
from tolaria.telemetry import JsonlSink, TelemetryEmitter, TelemetrySink, emitter_or_default

log = logging.getLogger("tolaria.distributed")

DEFAULT_BUCKET_MB = 25.0
DEFAULT_TIMEOUT_S = 1800.0
LAUNCH_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
MAX_SEED = 2**63 - 1
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class DistributedError(RuntimeError):
    """A collective step failed, or the ranks disagree on something they must share."""


class ReplicaMismatchError(DistributedError):
    """The ranks' model replicas (or buffer layouts) are not identical."""


# ---- the context -----------------------------------------------------------------------------------


class DistributedContext:
    """Where this process sits in the job: rank, world size, local rank, device, backend.

    Build it with :meth:`from_environment` (torchrun, an already initialised process group, or a
    single process) or :meth:`single_process`. Close it (or use it as a context manager) to destroy
    the process group it created.

    Attributes:
        rank: this process's global rank, ``0 <= rank < world_size``.
        world_size: the number of processes in the job.
        local_rank: this process's rank on its machine (picks its GPU).
        device: where this rank's model and gradient buffer live.
        backend: ``"gloo"``, ``"nccl"`` (or a per-device backend string), or None in a single process.
    """

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device | str,
                 backend: str | None, *, owns_process_group: bool = False):
        world_size = _check_int("world_size", world_size, minimum=1)
        rank = _check_int("rank", rank, minimum=0)
        local_rank = _check_int("local_rank", local_rank, minimum=0)
        if rank >= world_size:
            raise ValueError(f"rank {rank} is out of range for world_size {world_size}")
        if backend is None and world_size != 1:
            raise ValueError(f"a context without a process group (backend None) must have world_size 1, got {world_size}")
        self._rank, self._world_size, self._local_rank = rank, world_size, local_rank
        self._device = torch.device(device)
        self._backend = backend
        self._owns_process_group = owns_process_group
        self._closed = False

    # ---- construction --------------------------------------------------------------------------

    @classmethod
    def single_process(cls, device: torch.device | str | None = None) -> DistributedContext:
        """A context for one process: rank 0 of 1, no process group; every collective is a no-op."""
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return cls(0, 1, 0, device, None)

    @classmethod
    def from_environment(cls, *, backend: str | None = None, device: torch.device | str | None = None,
                         timeout_s: float = DEFAULT_TIMEOUT_S) -> DistributedContext:
        """The context of this process as launched.

        - A default process group already initialised (by the caller): wraps it (see
          :meth:`from_process_group`).
        - Launched by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
          ``MASTER_PORT`` set): initialises the default process group with
          ``torch.distributed.init_process_group(init_method="env://")``; the context owns it.
        - None of those variables set: :meth:`single_process`.

        Args:
            backend: ``"gloo"`` or ``"nccl"``; default NCCL when the device is a GPU, else gloo.
            device: default ``cuda:<local_rank>`` when CUDA is available, else the CPU; ``"cuda"``
                without an index also means ``cuda:<local_rank>``.
            timeout_s: how long a collective may wait for the other ranks before failing. It must
                exceed the slowest thing one rank does while the others wait at a collective (a
                checkpoint write on rank 0, an evaluation).
        """
        if dist.is_available() and dist.is_initialized():
            existing = str(dist.get_backend())
            if backend is not None and backend != existing:
                raise DistributedError(f"a process group with backend {existing!r} is already initialised; cannot "
                                       f"use backend {backend!r}")
            return cls.from_process_group(device=device)
        present = [name for name in LAUNCH_ENV_VARS if name in os.environ]
        if not present:
            return cls.single_process(device)
        missing = [name for name in LAUNCH_ENV_VARS if name not in os.environ]
        if missing:
            raise DistributedError(
                f"incomplete torch.distributed launch environment: {', '.join(present)} set but "
                f"{', '.join(missing)} missing; launch with torchrun, which sets all of {', '.join(LAUNCH_ENV_VARS)}"
            )
        if not dist.is_available():
            raise DistributedError("launched by torchrun, but this PyTorch build has no torch.distributed")
        rank, world_size, local_rank = (_env_int(name) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        timeout = _check_timeout(timeout_s)
        chosen_device = _default_device(local_rank) if device is None else torch.device(device)
        if chosen_device.type == "cuda" and chosen_device.index is None:  # "cuda": this rank's own GPU
            chosen_device = _default_device(local_rank)
            if chosen_device.type != "cuda":
                raise DistributedError("device 'cuda' was asked for, but CUDA is not available")
        chosen_backend = _check_backend(backend, chosen_device)
        if chosen_device.type == "cuda":
            torch.cuda.set_device(chosen_device)
        _import_before_process_group()
        ctx = cls(rank, world_size, local_rank, chosen_device, chosen_backend, owns_process_group=True)
        dist.init_process_group(
            backend=chosen_backend, init_method="env://", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=timeout), device_id=chosen_device if chosen_device.type == "cuda" else None,
        )
        log.info("joined the process group: rank %d of %d (local rank %d) on %s, backend %s",
                 rank, world_size, local_rank, chosen_device, chosen_backend)
        return ctx

    @classmethod
    def from_process_group(cls, *, device: torch.device | str | None = None,
                           local_rank: int | None = None) -> DistributedContext:
        """Wraps the default process group someone else initialised (the context does not own it).

        ``local_rank`` defaults to ``$LOCAL_RANK``, else to the global rank (one machine).
        ``device`` defaults to ``cuda:<local_rank>`` for an NCCL group, else the CPU.
        """
        if not (dist.is_available() and dist.is_initialized()):
            raise DistributedError("no default process group is initialised; use from_environment()")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        backend = str(dist.get_backend())
        if local_rank is None:
            local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
        if device is None:
            device = torch.device("cuda", local_rank) if "nccl" in backend else torch.device("cpu")
        chosen = torch.device(device)
        if backend == "nccl" and chosen.type != "cuda":
            raise ValueError(f"the process group's backend is nccl, which needs a CUDA device, but device is {chosen}")
        return cls(rank, world_size, local_rank, chosen, backend)

    # ---- properties ----------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def local_rank(self) -> int:
        return self._local_rank

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def backend(self) -> str | None:
        return self._backend

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that writes checkpoints and the run's shared files)."""
        return self._rank == 0

    @property
    def is_distributed(self) -> bool:
        """Whether a process group backs this context (False: a single process, collectives are no-ops)."""
        return self._backend is not None

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- collectives ---------------------------------------------------------------------------

    def barrier(self) -> None:
        """Waits until every rank reached this point (no-op in a single process)."""
        if self._live():
            # An all-reduce rather than dist.barrier(): no rank leaves before all arrived, on every
            # backend, and NCCL needs no guess of the device.
            _allreduce_ints([0], self, dist.ReduceOp.MAX)

    def _live(self) -> bool:
        """True when collectives must run; raises if the context was closed."""
        if self._closed:
            raise DistributedError(f"{self!r} is closed; build a new context")
        if self._backend is None:
            return False
        if not dist.is_initialized():
            raise DistributedError(f"the process group of {self!r} was destroyed")
        return True

    def close(self) -> None:
        """Destroys the process group if this context created it. Idempotent.

        Drop a ``DistributedDataParallel`` wrapper first: it holds the group, whose worker threads
        would otherwise live on until the interpreter exits.
        """
        if self._closed:
            return
        self._closed = True
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> DistributedContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"DistributedContext(rank={self._rank}, world_size={self._world_size}, local_rank={self._local_rank}, "
                f"device={self._device}, backend={self._backend!r})")


def _import_before_process_group() -> None:
    """Imports ``torch._dynamo`` now, before the process group exists.

    Imported after ``init_process_group`` (``torch.optim`` imports it when the first optimizer is
    built), it keeps the default group alive past ``destroy_process_group``: the group's worker
    threads then outlive the interpreter, and one still releasing a finished collective while Python
    shuts down aborts the process at exit (SIGABRT, "terminate called without an active exception").
    """
    import torch._dynamo  # noqa: F401


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _env_int(name: str) -> int:
    raw = os.environ[name]
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def _check_positive_real(name: str, value: Any, unit: str) -> None:
    """Raises ValueError unless ``value`` is a finite real number > 0 (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number of {unit} > 0, got {value!r}")


def _check_timeout(timeout_s: float) -> float:
    _check_positive_real("timeout_s", timeout_s, "seconds")
    return float(timeout_s)


def _default_device(local_rank: int) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DistributedError(
            f"local rank {local_rank} has no GPU: this machine has {count}; launch at most {count} processes per "
            "node (--nproc-per-node) or pass device='cpu'"
        )
    return torch.device("cuda", local_rank)


def _check_backend(backend: str | None, device: torch.device) -> str:
    if backend is None:
        return "nccl" if device.type == "cuda" else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"unknown backend {backend!r}; Tolaria runs on 'gloo' (CPU or GPU) or 'nccl' (GPU)")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"backend 'nccl' needs a CUDA device, but the device is {device}; use 'gloo' on the CPU")
    return backend


def _check_context(ctx: Any) -> DistributedContext:
    if not isinstance(ctx, DistributedContext):
        raise TypeError(f"ctx must be a DistributedContext, got {type(ctx).__name__}")
    return ctx


def _control_device(ctx: DistributedContext) -> torch.device:
    """Where small control tensors (ints, flags, bytes) travel: the CPU unless the backend is NCCL only."""
    return ctx.device if ctx.backend == "nccl" else torch.device("cpu")


def _allreduce_ints(values: Sequence[int], ctx: DistributedContext, op: dist.ReduceOp) -> list[int]:
    t = torch.tensor(list(values), dtype=torch.int64, device=_control_device(ctx))
    dist.all_reduce(t, op=op)
    return [int(v) for v in t.tolist()]


# ---- data sharding ---------------------------------------------------------------------------------


class ShardedLoader:
    """A ``DataLoader`` over this rank's shard; call :meth:`set_epoch` at the start of every epoch.

    The shards of one epoch are disjoint and of equal size (``DistributedSampler``: with
    ``drop_last=False`` it repeats a few samples to even them out, with ``drop_last=True`` it drops
    the tail), so step t of every rank sees a batch of the same size. The shuffle depends only on
    ``seed`` and the epoch, so it is the same on every rank and after a resume.

    Attributes:
        loader: the ``DataLoader`` iterated.
        sampler: its ``DistributedSampler``.
        epoch: the epoch last set.
    """

    def __init__(self, loader: DataLoader, sampler: DistributedSampler, telemetry: TelemetryEmitter | None = None):
        self.loader = loader
        self.sampler = sampler
        self.telemetry = telemetry
        self.epoch = 0
        self._iterated_epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Makes the next pass use epoch ``epoch``'s shuffle (every rank must pass the same epoch)."""
        epoch = _check_int("epoch", epoch, minimum=0)
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        if self._iterated_epoch == self.epoch and self.sampler.shuffle:
            message = (f"iterating the sharded data again with epoch {self.epoch}: the shuffle repeats; call "
                       "set_epoch(epoch) at the start of every epoch")
            log.warning(message)
            emitter_or_default(self.telemetry).event("distributed.epoch_not_advanced", severity="warning",
                                                     message=message, data_epoch=self.epoch)
        self._iterated_epoch = self.epoch
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __repr__(self) -> str:
        return (f"ShardedLoader(rank={self.sampler.rank}, num_replicas={self.sampler.num_replicas}, "
                f"samples_per_rank={self.sampler.num_samples}, batches={len(self.loader)}, epoch={self.epoch})")


_LOADER_OPTIONS = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn",
                   "multiprocessing_context", "generator", "persistent_workers", "pin_memory_device", "in_order")


def shard(data: Dataset | DataLoader, ctx: DistributedContext, *, batch_size: int | None = None,
          shuffle: bool | None = None, seed: int = 0, drop_last: bool = False,
          telemetry: TelemetryEmitter | None = None, **loader_kwargs: Any) -> ShardedLoader:
    """This rank's shard of ``data``, as a :class:`ShardedLoader` (call ``set_epoch`` every epoch).

    Args:
        data: a map-style ``Dataset``, or a ``DataLoader`` built on one with its default sampler
            (sequential or shuffled): its batch size, collate function, workers, ... are kept and its
            sampler is replaced by a ``DistributedSampler``.
        ctx: the distributed context (a single-process context gives the whole data set).
        batch_size: samples per rank per step (the global batch is ``batch_size * world_size``);
            required for a ``Dataset``, taken from a ``DataLoader``.
        shuffle: shuffle each epoch; default True for a ``Dataset``, the loader's own setting for a
            ``DataLoader``.
        seed: the shuffle's seed; must be the same on every rank.
        drop_last: drop the tail that does not divide evenly over the ranks (else a few samples are
            repeated). Also the loader's ``drop_last`` for a ``Dataset``.
        telemetry: where the uneven-shard warning goes.
        loader_kwargs: more ``DataLoader`` options for a ``Dataset`` (``num_workers``, ...).
    """
    _check_context(ctx)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if shuffle is not None and not isinstance(shuffle, bool):
        raise ValueError(f"shuffle must be True, False or None, got {shuffle!r}")
    if isinstance(data, DataLoader):
        if batch_size is not None or loader_kwargs:
            raise ValueError("a DataLoader brings its own batch size and options; pass batch_size and loader "
                             "options only with a Dataset")
        dataset = data.dataset
        if isinstance(dataset, IterableDataset):
            raise TypeError("cannot shard a DataLoader over an IterableDataset with a DistributedSampler; "
                            "split the stream by rank inside the IterableDataset instead")
        if data.batch_size is None:
            raise ValueError("the DataLoader has a custom batch_sampler (batch_size is None); shard the Dataset "
                             "with shard(dataset, ctx, batch_size=...) instead")
        if isinstance(data.sampler, RandomSampler):
            if data.sampler.replacement or data.sampler.num_samples != len(dataset):
                raise ValueError("the DataLoader's RandomSampler draws with replacement or a custom num_samples, "
                                 "which a DistributedSampler cannot reproduce; shard the Dataset instead")
            loader_shuffle = True
        elif isinstance(data.sampler, SequentialSampler):
            loader_shuffle = False
        else:
            raise ValueError(f"the DataLoader has a custom sampler ({type(data.sampler).__name__}); a "
                             "DistributedSampler would replace it. Shard the Dataset and build the sampling per rank")
        options = {name: getattr(data, name) for name in _LOADER_OPTIONS if hasattr(data, name)}
        if data.num_workers > 0:
            options["prefetch_factor"] = data.prefetch_factor
        batch = data.batch_size
        shuffle = loader_shuffle if shuffle is None else shuffle
        loader_drop_last = data.drop_last
    else:
        if isinstance(data, IterableDataset):
            raise TypeError("cannot shard an IterableDataset with a DistributedSampler; split the stream by rank "
                            "inside the IterableDataset instead")
        if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
            raise TypeError(f"data must be a map-style Dataset (with __getitem__ and __len__) or a DataLoader, "
                            f"got {type(data).__name__}")
        if batch_size is None:
            raise ValueError("batch_size is required when sharding a Dataset (samples per rank per step)")
        batch = _check_int("batch_size", batch_size, minimum=1)
        refused = sorted({"sampler", "batch_sampler", "shuffle", "batch_size", "drop_last"} & set(loader_kwargs))
        if refused:
            raise ValueError(f"loader option(s) {refused} are set by shard() itself; use its own arguments")
        dataset, options = data, dict(loader_kwargs)
        shuffle = True if shuffle is None else shuffle
        loader_drop_last = drop_last
    if len(dataset) < ctx.world_size and drop_last:
        raise ValueError(f"a data set of {len(dataset)} samples cannot give each of {ctx.world_size} ranks a sample "
                         "with drop_last=True")
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle,
                                 seed=int(seed), drop_last=drop_last)
    uneven = len(dataset) % ctx.world_size
    if uneven:
        what = (f"drops {uneven} sample(s) per epoch" if drop_last
                else f"repeats {sampler.total_size - len(dataset)} sample(s) per epoch")
        message = f"{len(dataset)} samples do not divide over {ctx.world_size} ranks: the sharding {what}"
        log.warning(message)
        emitter_or_default(telemetry).event("distributed.shard_uneven", severity="warning", message=message,
                                            samples=len(dataset), world_size=ctx.world_size, drop_last=drop_last)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=loader_drop_last, **options)
    return ShardedLoader(loader, sampler, telemetry)


# ---- the gradient all-reduce -----------------------------------------------------------------------


def bucket_slices(numel: int, element_size: int, bucket_mb: float) -> list[tuple[int, int]]:
    """``(start, stop)`` element ranges of about ``bucket_mb`` MiB each covering ``numel`` elements."""
    numel = _check_int("numel", numel, minimum=0)
    element_size = _check_int("element_size", element_size, minimum=1)
    _check_positive_real("bucket_mb", bucket_mb, "MiB")
    per_bucket = max(1, int(bucket_mb * (1 << 20)) // element_size)
    return [(start, min(start + per_bucket, numel)) for start in range(0, numel, per_bucket)]


def _flat_span(tensor: Tensor) -> Tensor:
    """A 1-D view of the storage ``tensor`` occupies: itself when contiguous; for a K x N view whose
    rows are padded apart (``GradientBuffer`` aligns its rows), the span from its first to its last
    element, padding included. The padding is never part of a gradient, so reducing it is harmless
    (a few elements per row)."""
    if tensor.is_contiguous():
        return tensor.view(-1)
    if tensor.dim() == 2 and tensor.stride(1) == 1 and tensor.stride(0) >= tensor.size(1):
        rows, cols = tensor.shape
        return tensor.as_strided(((rows - 1) * tensor.stride(0) + cols,), (1,))
    raise ValueError(
        f"the gradient buffer must be contiguous or a K x N view with unit column stride (padded rows), "
        f"got shape {tuple(tensor.shape)} with strides {tensor.stride()}; it is all-reduced in place"
    )


def allreduce_gradient_buffer(buffer: GradientBuffer | Tensor, ctx: DistributedContext,
                              bucket_mb: float = DEFAULT_BUCKET_MB) -> Tensor:
    """Averages the K x N gradient buffer over all ranks, in place; returns it.

    Call it after every source's backward and before ``buffer.aggregate(...)``: every rank then holds
    the same buffer (the combined batch's per-source gradients, for equal-sized shards) and runs the
    same aggregation. The buffer is all-reduced as contiguous buckets of about ``bucket_mb`` MiB of
    its flat storage, row padding included (the mean is elementwise, so any split gives the same
    result). All buckets are
    launched asynchronously, then waited on, so transfers pipeline with each other; each bucket is
    divided by the world size as soon as it arrives (float16/bfloat16 are divided before the sum
    instead, so the sum cannot overflow). On NCCL nothing here waits on the host.

    Every rank must call it with a buffer of the same shape and dtype (check once with
    :func:`verify_buffer_layout`). Communication: ``K * N * element_size`` bytes per rank, about twice
    that on the wire for a ring all-reduce. A single-process context returns the buffer untouched.
    """
    _check_context(ctx)
    tensor = buffer.buffer if isinstance(buffer, GradientBuffer) else buffer
    if not isinstance(tensor, Tensor):
        raise TypeError(f"buffer must be a GradientBuffer or a tensor, got {type(buffer).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"the gradient buffer must be floating point, got {tensor.dtype}")
    flat = _flat_span(tensor)
    slices = bucket_slices(flat.numel(), tensor.element_size(), bucket_mb)
    if not ctx._live():
        return tensor
    if ctx.backend == "nccl" and tensor.device.type != "cuda":
        raise ValueError(f"backend nccl needs the gradient buffer on a CUDA device, but it is on {tensor.device}")
    world = ctx.world_size
    pre_divide = tensor.dtype in _LOW_PRECISION
    if pre_divide:
        flat.div_(world)
    works = [(flat[start:stop], dist.all_reduce(flat[start:stop], op=dist.ReduceOp.SUM, async_op=True))
             for start, stop in slices]
    for chunk, work in works:
        work.wait()
        if not pre_divide:
            chunk.div_(world)
    return tensor


def allreduce_mean(tensor: Tensor, ctx: DistributedContext) -> Tensor:
    """Averages a small floating-point tensor (e.g. the K loss values of a step) over ranks, in place.

    One all-reduce; a single-process context returns it untouched.
    """
    _check_context(ctx)
    if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
        raise TypeError(f"allreduce_mean needs a floating-point tensor, got {getattr(tensor, 'dtype', type(tensor).__name__)}")
    if not tensor.is_contiguous():
        raise ValueError("allreduce_mean reduces in place and needs a contiguous tensor")
    if ctx._live():
        if ctx.backend == "nccl" and tensor.device.type != "cuda":
            raise ValueError(f"backend nccl needs the tensor on a CUDA device, but it is on {tensor.device}")
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(ctx.world_size)
    return tensor


def any_rank(flag: bool, ctx: DistributedContext) -> bool:
    """Whether ``flag`` is True on at least one rank (one all-reduce of one int).

    Use it for decisions that change parameters (skip this step, roll back): every rank must take the
    same one, or the replicas diverge.
    """
    _check_context(ctx)
    if not isinstance(flag, bool):
        raise TypeError(f"flag must be a bool, got {type(flag).__name__}")
    if not ctx._live():
        return flag
    return bool(_allreduce_ints([int(flag)], ctx, dist.ReduceOp.MAX)[0])


# ---- identical replicas ----------------------------------------------------------------------------


def synchronized_generator(seed: int | None, ctx: DistributedContext, *, device: torch.device | str | None = None,
                           telemetry: TelemetryEmitter | None = None) -> torch.Generator:
    """A ``torch.Generator`` seeded with rank 0's ``seed`` on every rank (one broadcast of one int).

    Give it to the aggregator (``PCGrad(generator=...)``) so every rank draws the same shuffles and
    the replicas stay identical. Keep ``generator.get_state()`` in the checkpoint's ``extra`` and
    ``set_state`` it after a resume to continue the same sequence.

    Args:
        seed: an int in ``[0, 2**63 - 1]``; rank 0's value is used everywhere (a rank passing another
            value is warned about). None: rank 0 draws a random seed, reported in telemetry.
        device: the generator's device (default ``ctx.device``, where the aggregation runs).
    """
    _check_context(ctx)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not 0 <= seed <= MAX_SEED):
        raise ValueError(f"seed must be an int in [0, 2**63 - 1] or None, got {seed!r}")
    gen_device = ctx.device if device is None else torch.device(device)
    drawn = seed is None and ctx.is_main
    local = secrets.randbits(63) if drawn else seed
    chosen = local
    if ctx._live():
        t = torch.tensor([local if ctx.is_main else 0], dtype=torch.int64, device=_control_device(ctx))
        dist.broadcast(t, src=0)
        chosen = int(t.item())
    assert chosen is not None
    if seed is not None and chosen != seed:
        message = (f"rank {ctx.rank} asked for seed {seed} but rank 0's seed {chosen} is used, so every rank draws "
                   "the same shuffles")
        log.warning(message)
        emitter_or_default(telemetry).event("distributed.seed_overridden", severity="warning", message=message,
                                            local_seed=seed, seed=chosen)
    if drawn:
        emitter_or_default(telemetry).event("distributed.seed_drawn", message=f"drew the shared seed {chosen}",
                                            seed=chosen)
    generator = torch.Generator(device=gen_device)
    generator.manual_seed(chosen)
    return generator


def broadcast_module_state(model: nn.Module, ctx: DistributedContext) -> None:
    """Copies rank 0's parameters and buffers into every rank's model, in place.

    Call it once after building the model (before the optimizer's first step) so the replicas start
    identical whatever each rank's initialisation drew. Every rank's model must have the same
    structure (checked first, on every rank, naming the ranks that differ). Communication: the
    model's bytes once, rank 0 to all.
    """
    tensors = _checked_model_entries(model, ctx)
    if not ctx._live():
        return
    _broadcast_in_place([t for _, t in tensors], ctx)


def _checked_model_entries(model: nn.Module, ctx: DistributedContext) -> list[tuple[str, Tensor]]:
    """The model's tensor entries, after checking the arguments and that every rank's model has the
    same structure (on every rank, naming the ranks that differ)."""
    _check_context(ctx)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    entries = _tensor_entries(model)
    _check_same_layout(entries, ctx, "model structure")
    return entries


def _tensor_entries(model: nn.Module) -> list[tuple[str, Tensor]]:
    """The model's parameters and buffers by state-dict name (a module's non-tensor extra state is
    not replica state this module can compare or copy)."""
    return [(name, t) for name, t in model.state_dict(keep_vars=True).items() if isinstance(t, Tensor)]


def _broadcast_in_place(tensors: Sequence[Tensor], ctx: DistributedContext) -> None:
    """Rank 0's values of ``tensors`` into every rank's tensors (asynchronous broadcasts, then waits)."""
    comm_device = _control_device(ctx)
    pending: list[tuple[Tensor, Tensor | None, Any]] = []
    seen: set[int] = set()
    with torch.no_grad():
        for t in tensors:
            if t.numel() == 0 or id(t) in seen:  # tied tensors travel once
                continue
            seen.add(id(t))
            target = t.detach()
            if target.is_contiguous() and target.device == comm_device:
                staged, wire = None, target.reshape(-1).view(torch.uint8)  # straight into the live storage
            else:
                staged = target.to(comm_device, copy=True).contiguous()
                wire = staged.reshape(-1).view(torch.uint8)
            pending.append((target, staged, dist.broadcast(wire, src=0, async_op=True)))
        for target, staged, work in pending:
            work.wait()
            if staged is not None and not ctx.is_main:
                target.copy_(staged)


def _layout_digest(entries: Sequence[tuple[str, Any]]) -> int:
    text = json.dumps([[name, str(getattr(t, "dtype", "")), list(getattr(t, "shape", ()))] for name, t in entries])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


def _all_gather_ints(values: Sequence[int] | Tensor, ctx: DistributedContext) -> list[list[int]]:
    """Every rank's int64 vector (same length everywhere), as lists, rank order; one host read."""
    t = values if isinstance(values, Tensor) else torch.tensor(list(values), dtype=torch.int64, device=_control_device(ctx))
    gathered = [torch.empty_like(t) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, t)
    return torch.stack(gathered).tolist()


def _check_same_layout(entries: Sequence[tuple[str, Any]], ctx: DistributedContext, what: str) -> None:
    if not ctx._live():
        return
    digests = [row[0] for row in _all_gather_ints([_layout_digest(entries)], ctx)]
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    if differing:
        described = "; ".join(f"{name}: {getattr(t, 'dtype', '')} {tuple(getattr(t, 'shape', ()))}"
                              for name, t in entries[:8])
        raise ReplicaMismatchError(
            f"the {what} differs between ranks: rank(s) {differing} do not match rank 0 (this is rank {ctx.rank}, "
            f"with {len(entries)} entries: {described}{' ...' if len(entries) > 8 else ''})"
        )


def verify_buffer_layout(buffer: GradientBuffer | Tensor, ctx: DistributedContext) -> None:
    """Raises :class:`ReplicaMismatchError` on every rank unless all ranks' buffers have the same shape
    and dtype (one all-gather of one int). Call it once after building the gradient buffer (and after
    every rebuild), since :func:`allreduce_gradient_buffer` does not check on its hot path."""
    _check_context(ctx)
    tensor = buffer.buffer if isinstance(buffer, GradientBuffer) else buffer
    if not isinstance(tensor, Tensor):
        raise TypeError(f"buffer must be a GradientBuffer or a tensor, got {type(buffer).__name__}")
    _check_same_layout([("gradient buffer", tensor)], ctx, "gradient buffer layout (K x N, dtype)")


_FINGERPRINT_CHUNK = 1 << 24  # 16-bit words per slice: bounds the temporary int64 memory at 128 MiB
_FINGERPRINT_MOD = 1 << 62


def _fingerprint(t: Tensor) -> Tensor:
    """:func:`tensor_fingerprint` as an int64 pair on ``t``'s device (no host read)."""
    data = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if data.numel() % 2:
        data = torch.cat([data, data.new_zeros(1)])
    elif data.storage_offset() % 2:  # int16 words must be aligned
        data = data.clone()
    words = data.view(torch.int16)
    acc = torch.zeros(2, dtype=torch.int64, device=t.device)
    for start in range(0, words.numel(), _FINGERPRINT_CHUNK):
        part = words[start:start + _FINGERPRINT_CHUNK].to(torch.int64) & 0xFFFF
        position = torch.arange(start, start + part.numel(), device=part.device, dtype=torch.int64) % 65521 + 1
        # Each product is < 2**32 and a slice has 2**24 of them, so the sums are exact in int64;
        # folding every slice modulo 2**62 keeps the running total exact too.
        acc = (acc + torch.stack([part.sum(), (part * position).sum()])) % _FINGERPRINT_MOD
    return acc


def tensor_fingerprint(t: Tensor) -> tuple[int, int]:
    """Two exact integers from ``t``'s bytes: any change of one element changes the first, a swap of
    elements the second (unless their positions agree modulo 65521). Computed on ``t``'s device."""
    if not isinstance(t, Tensor):
        raise TypeError(f"tensor_fingerprint needs a tensor, got {type(t).__name__}")
    plain, weighted = _fingerprint(t).tolist()
    return plain, weighted


def verify_replicas(model: nn.Module, ctx: DistributedContext) -> None:
    """Raises :class:`ReplicaMismatchError` on every rank unless every rank's parameters and buffers
    are bitwise identical to rank 0's, naming the first entries that differ.

    Costs one pass over the model on its device, a host read of two ints per tensor and one
    all-gather of them: a periodic check (every epoch, after a resume), not a per-step one.
    """
    entries = _checked_model_entries(model, ctx)
    if not ctx._live():
        return
    control = _control_device(ctx)
    prints = (torch.cat([_fingerprint(t).to(control) for _, t in entries]) if entries
              else torch.zeros(0, dtype=torch.int64, device=control))
    gathered = _all_gather_ints(prints, ctx)  # one host read for the whole model
    bad: dict[str, list[int]] = {}
    for r, row in enumerate(gathered):
        for i, (name, _) in enumerate(entries):
            if row[2 * i : 2 * i + 2] != gathered[0][2 * i : 2 * i + 2]:
                bad.setdefault(name, []).append(r)
    if bad:
        listed = "; ".join(f"{name} on rank(s) {ranks}" for name, ranks in list(bad.items())[:8])
        raise ReplicaMismatchError(
            f"the model replicas differ from rank 0 in {len(bad)} of {len(entries)} entries: {listed}"
            f"{' ...' if len(bad) > 8 else ''} (this is rank {ctx.rank})"
        )


# ---- emergencies -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmergencyAgreement:
    """What :func:`agree_on_emergency` found.

    Attributes:
        level: the highest level over all ranks.
        source_rank: the lowest rank at that level (None when the level is NONE).
        local_level: this rank's own level, as given.
    """

    level: EmergencyLevel
    source_rank: int | None
    local_level: EmergencyLevel

    @property
    def from_other_rank(self) -> bool:
        """Whether another rank raised the level above this rank's own."""
        return self.level > self.local_level


def agree_on_emergency(local_level: EmergencyLevel | int, ctx: DistributedContext, *,
                       controller: EmergencyController | None = None,
                       telemetry: TelemetryEmitter | None = None) -> EmergencyAgreement:
    """The highest emergency level over all ranks and which rank holds it (one all-reduce of one int).

    Every rank must call it at the same step boundaries. A level raised by another rank is reported
    (telemetry event ``emergency.remote_level``, critical for HALT, and a log line) and, with
    ``controller``, escalated into it, so this host's emergency signal (shared memory) carries it to
    the other processes here. The agreement only raises levels: lowering one is a decision all ranks
    take together (``controller.deescalate`` on every rank at the same step).
    """
    _check_context(ctx)
    local = as_level(local_level)
    if controller is not None and not isinstance(controller, EmergencyController):
        raise TypeError(f"controller must be an EmergencyController, got {type(controller).__name__}")
    if not ctx._live():
        return EmergencyAgreement(local, None if local == EmergencyLevel.NONE else ctx.rank, local)
    world = ctx.world_size
    # level * world + (world - 1 - rank): the max carries the highest level and the lowest rank at it.
    encoded = _allreduce_ints([int(local) * world + (world - 1 - ctx.rank)], ctx, dist.ReduceOp.MAX)[0]
    level = as_level(encoded // world)
    agreement = EmergencyAgreement(level, None if level == EmergencyLevel.NONE else world - 1 - encoded % world, local)
    if agreement.from_other_rank:
        reason = f"rank {agreement.source_rank} is at emergency level {level.name}"
        message = f"{reason}; this rank ({ctx.rank}) was at {local.name} and follows"
        log.log(logging.CRITICAL if level == EmergencyLevel.HALT else logging.WARNING, message)
        emitter_or_default(telemetry).event(
            "emergency.remote_level", severity="critical" if level == EmergencyLevel.HALT else "warning",
            message=message, level=level.name, local_level=local.name, source_rank=agreement.source_rank,
        )
        if controller is not None:
            controller.escalate(level, reason)
    return agreement


def agree_on_emergency_level(local_level: EmergencyLevel | int, ctx: DistributedContext, *,
                             controller: EmergencyController | None = None,
                             telemetry: TelemetryEmitter | None = None) -> EmergencyLevel:
    """The highest emergency level over all ranks (see :func:`agree_on_emergency`): HALT on any rank
    is HALT on every rank, at the same step boundary."""
    return agree_on_emergency(local_level, ctx, controller=controller, telemetry=telemetry).level


# ---- checkpoints -----------------------------------------------------------------------------------


def _share_bytes_from_main(data: bytes, ctx: DistributedContext) -> Any:
    """Rank 0's JSON text ``data`` (ignored elsewhere), decoded, on every rank. Its first collective is
    an all-reduce, so no rank leaves before rank 0 got here (a barrier)."""
    length = _allreduce_ints([len(data)], ctx, dist.ReduceOp.MAX)[0]
    wire = torch.zeros(length, dtype=torch.uint8, device=_control_device(ctx))
    if ctx.is_main:
        wire.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(wire, src=0)
    return json.loads(wire.cpu().numpy().tobytes().decode())


def _from_main(compute: Callable[[], Any], ctx: DistributedContext, what: str,
               error_type: type[Exception] = DistributedError) -> Any:
    """Rank 0 computes a JSON-able value, every rank learns it, as JSON decodes it (rank 0 too; the
    others never call ``compute``); a live context only. If ``compute`` (or encoding its value) fails
    on rank 0, rank 0 re-raises its own error and every other rank raises ``error_type``
    ("rank 0 could not <what>: <the error>")."""
    data = b""
    error: Exception | None = None
    if ctx.is_main:
        try:
            data = json.dumps({"ok": True, "value": compute()}).encode()
        except Exception as exc:  # shared with every rank below, then re-raised here
            error = exc
            data = json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}).encode()
    outcome = _share_bytes_from_main(data, ctx)
    if error is not None:
        raise error
    if not outcome["ok"]:
        raise error_type(f"rank 0 could not {what}: {outcome['error']}")
    return outcome["value"]


def broadcast_json(value: Any, ctx: DistributedContext) -> Any:
    """Rank 0's ``value`` (anything ``json.dumps`` takes) on every rank; the others' ``value`` is ignored.

    For run-wide choices rank 0 makes (the run folder, a control command, evaluation metrics). No
    pickle. A barrier too: no rank returns before rank 0 arrived. If rank 0's value is not
    JSON-serialisable, every rank raises. A single-process context returns ``value``.
    """
    _check_context(ctx)
    if not ctx._live():
        return value
    return _from_main(lambda: value, ctx, "broadcast its value")


def _agree_all_succeeded(error: BaseException | None, ctx: DistributedContext, what: str) -> None:
    """Raises on every rank if ``what`` failed on any (the failing rank re-raises its own error)."""
    failed = _allreduce_ints([ctx.rank + 1 if error is not None else 0], ctx, dist.ReduceOp.MAX)[0]
    if error is not None:
        log.error("%s failed on this rank (%d): %s: %s", what, ctx.rank, type(error).__name__, error)
        raise error
    if failed:
        raise DistributedError(f"{what} failed on rank {failed - 1} (see that rank's log); this rank ({ctx.rank}) "
                               "stops too so the replicas do not diverge")


def _check_state_argument(state: Any, ctx: DistributedContext) -> StateManager | None:
    if state is not None and not isinstance(state, StateManager):
        raise TypeError(f"state must be a StateManager (or None on ranks other than 0), got {type(state).__name__}")
    if ctx.is_main and state is None:
        raise ValueError("rank 0 writes and reads the checkpoints: it needs a StateManager, got None")
    return state


def checkpoint_barrier(state: StateManager | None, ctx: DistributedContext, step: int, model: nn.Module,
                       optimizer: torch.optim.Optimizer, extra: Any = None, *, verify: bool = True,
                       telemetry: TelemetryEmitter | None = None) -> CheckpointEntry:
    """Writes a durable checkpoint on rank 0 between two barriers; returns the committed entry on every rank.

    1. Barrier: every rank has finished the step, and all give the same ``step``; with ``verify``,
       :func:`verify_replicas` also confirms the replicas are bitwise identical (else every rank
       raises :class:`ReplicaMismatchError` and nothing is written).
    2. Rank 0 writes and commits through its ``state`` (ranks other than 0 may pass None; their own
       manager, if any, is not written to).
    3. Barrier carrying rank 0's outcome: when this returns, the checkpoint is committed, on every
       rank; if rank 0's write failed, every rank raises (rank 0 its own error, the others a
       :class:`~tolaria.state.CheckpointError` quoting it).

    The replicas are identical, so rank 0's model and optimizer stand for all of them; other ranks
    need no access to the checkpoint folder. Communication: a few small collectives (plus, with
    ``verify``, one pass over the model and an all-gather of two ints per tensor); rank 0's write time
    is spent by every rank waiting (keep ``timeout_s`` of the context above it).
    """
    _check_context(ctx)
    state = _check_state_argument(state, ctx)
    _check_step(step)
    if not ctx._live():
        assert state is not None
        return state.checkpoint(step, model, optimizer, extra=extra)
    high, negated_low = _allreduce_ints([step, -step], ctx, dist.ReduceOp.MAX)
    if high != -negated_low:
        raise ReplicaMismatchError(f"ranks disagree on the step to checkpoint: steps {-negated_low}..{high} "
                                   f"(this rank {ctx.rank} is at {step}); nothing was written")
    if verify:
        verify_replicas(model, ctx)

    def write() -> dict[str, Any]:
        assert state is not None
        return asdict(state.checkpoint(step, model, optimizer, extra=extra))

    committed = CheckpointEntry.from_json(
        _from_main(write, ctx, f"write the checkpoint of step {step}", CheckpointError))
    if not ctx.is_main:
        emitter_or_default(telemetry).event("distributed.checkpoint_committed",
                                            message=f"rank 0 committed the checkpoint of step {step} ({committed.file})",
                                            checkpoint_step=step, file=committed.file, sequence=committed.sequence)
    return committed


def resume_from_checkpoint(state: StateManager | None, ctx: DistributedContext, model: nn.Module,
                           optimizer: torch.optim.Optimizer, *,
                           telemetry: TelemetryEmitter | None = None) -> RestoredState:
    """Restores the newest committed checkpoint on rank 0 and the same state on every rank.

    Rank 0 restores through ``state.restore_latest_with_extra`` (verified, all-or-nothing); then its
    model and optimizer state and the checkpoint's ``extra`` are broadcast, and every other rank
    applies them with the same checks (keys, shapes, dtypes, optimizer layout). Returns the
    :class:`~tolaria.state.RestoredState` (step, extra, file, sequence) on every rank. If rank 0 finds
    no usable checkpoint, or any rank cannot apply it, every rank raises (rank 0 / the failing rank its
    own error, the others :class:`~tolaria.state.CheckpointError` or :class:`DistributedError`).

    Communication: the model and optimizer state once (rank 0 to all), plus a few small collectives.
    """
    _check_context(ctx)
    state = _check_state_argument(state, ctx)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not ctx._live():
        assert state is not None
        return state.restore_latest_with_extra(model, optimizer)
    restored: RestoredState | None = None

    def restore_on_main() -> dict[str, Any]:
        nonlocal restored
        assert state is not None
        restored = state.restore_latest_with_extra(model, optimizer)
        return {"step": restored.step, "file": restored.file, "sequence": restored.sequence}

    outcome = _from_main(restore_on_main, ctx, "restore a checkpoint", CheckpointError)
    step, file, sequence = int(outcome["step"]), str(outcome["file"]), int(outcome["sequence"])
    payload = broadcast_tree(capture(model, optimizer, restored.extra) if restored is not None else None, ctx)
    local_error: Exception | None = None
    if not ctx.is_main:
        try:
            restore(model, optimizer, payload, f"checkpoint of step {step} ({file}) broadcast from rank 0")
        except Exception as exc:  # agreed on below, then re-raised on this rank
            local_error = exc
    _agree_all_succeeded(local_error, ctx, f"resuming from the checkpoint of step {step}")
    result = restored if restored is not None else RestoredState(step, payload["extra"], file, sequence)
    emitter_or_default(telemetry).event(
        "distributed.resumed", message=f"rank {ctx.rank} resumed from the checkpoint of step {step} ({file})",
        restored_step=step, file=file, sequence=sequence,
    )
    return result


# ---- broadcasting a state tree (no pickle) ----------------------------------------------------------


def _encode(tree: Any, tensors: list[Tensor], path: str) -> Any:
    """A JSON-able description of ``tree``; its tensors are appended to ``tensors``."""
    if isinstance(tree, Tensor):
        tensors.append(tree)
        return {"t": "tensor", "i": len(tensors) - 1}
    if tree is None or type(tree) in (bool, int, float, str):
        return tree
    if isinstance(tree, torch.Size):
        return {"t": "size", "v": list(tree)}
    if isinstance(tree, dict):
        if type(tree) not in (dict, OrderedDict):
            raise TypeError(f"{path}: cannot broadcast a {type(tree).__qualname__}; use a dict")
        return {"t": "dict", "o": isinstance(tree, OrderedDict),
                "v": [[_encode(k, tensors, path), _encode(v, tensors, f"{path}[{k!r}]")] for k, v in tree.items()]}
    if type(tree) is list:
        return [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(tree)]
    if type(tree) is tuple:
        return {"t": "tuple", "v": [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(tree)]}
    if type(tree) is bytes:
        return {"t": "bytes", "v": tree.hex()}
    if type(tree) is complex:
        return {"t": "complex", "v": [tree.real, tree.imag]}
    if isinstance(tree, torch.dtype):
        return {"t": "dtype", "v": str(tree).removeprefix("torch.")}
    if isinstance(tree, torch.device):
        return {"t": "device", "v": str(tree)}
    raise TypeError(f"{path}: cannot broadcast a {type(tree).__module__}.{type(tree).__qualname__}; state trees hold "
                    "tensors, dicts, lists, tuples, numbers, strings, bytes, dtypes, devices or None")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise DistributedError(f"rank 0 sent an unknown dtype {name!r}")
    return dtype


def _decode(node: Any, tensors: Sequence[Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    kind, value = node["t"], node.get("v")
    if kind == "tensor":
        return tensors[node["i"]]
    if kind == "dict":
        out: dict[Any, Any] = OrderedDict() if node["o"] else {}
        for k, v in value:
            out[_decode(k, tensors)] = _decode(v, tensors)
        return out
    if kind == "tuple":
        return tuple(_decode(v, tensors) for v in value)
    if kind == "size":
        return torch.Size(value)
    if kind == "bytes":
        return bytes.fromhex(value)
    if kind == "complex":
        return complex(*value)
    if kind == "dtype":
        return _dtype(value)
    if kind == "device":
        return torch.device(value)
    raise DistributedError(f"rank 0 sent an unknown node kind {kind!r}")


def broadcast_tree(tree: Any, ctx: DistributedContext) -> Any:
    """Rank 0's state tree (a ``state_dict``, nested dicts/lists/tuples of tensors and plain values) on
    every rank; other ranks pass None. No pickle: the structure travels as JSON, the tensors as raw
    bytes (asynchronous broadcasts). Received tensors land on the CPU if they were there on rank 0,
    else on ``ctx.device``. Rank 0 gets its own ``tree`` back."""
    _check_context(ctx)
    if not ctx._live():
        return tree
    tensors: list[Tensor] = []

    def describe() -> dict[str, Any]:
        skeleton = _encode(tree, tensors, "state")
        return {"skeleton": skeleton,
                "tensors": [[str(t.dtype).removeprefix("torch."), list(t.shape), t.device.type] for t in tensors]}

    header = _from_main(describe, ctx, "broadcast its state")
    comm_device = _control_device(ctx)
    works: list[Any] = []
    received: list[tuple[Tensor, torch.dtype]] = []
    for i, (dtype_name, shape, device_type) in enumerate(header["tensors"]):
        dtype = _dtype(dtype_name)
        if ctx.is_main:
            wire = tensors[i].detach().to(comm_device).contiguous().reshape(-1).view(torch.uint8)
        else:
            numel = math.prod(shape)
            wire = torch.empty(numel * torch.empty((), dtype=dtype).element_size(), dtype=torch.uint8, device=comm_device)
        if wire.numel():
            works.append(dist.broadcast(wire, src=0, async_op=True))
        received.append((wire, dtype))
    for work in works:
        work.wait()
    if ctx.is_main:
        return tree
    target_of = {"cpu": torch.device("cpu")}
    out = [wire.view(dtype).reshape(shape).to(target_of.get(device_type, ctx.device))
           for (wire, dtype), (_, shape, device_type) in zip(received, header["tensors"])]
    return _decode(header["skeleton"], out)


# ---- telemetry -------------------------------------------------------------------------------------


def telemetry_file_name(ctx: DistributedContext) -> str:
    """``telemetry-rank<r>.jsonl`` in a distributed run, ``telemetry.jsonl`` in a single process."""
    _check_context(ctx)
    return f"telemetry-rank{ctx.rank}.jsonl" if ctx.is_distributed else "telemetry.jsonl"


def bind_rank(telemetry: TelemetryEmitter, ctx: DistributedContext) -> TelemetryEmitter:
    """Stamps ``rank``, ``world_size`` and ``local_rank`` on every later record of ``telemetry``."""
    _check_context(ctx)
    if not isinstance(telemetry, TelemetryEmitter):
        raise TypeError(f"telemetry must be a TelemetryEmitter, got {type(telemetry).__name__}")
    telemetry.bind(rank=ctx.rank, world_size=ctx.world_size, local_rank=ctx.local_rank)
    return telemetry


def shared_run_id(run_id: str | None, ctx: DistributedContext) -> str:
    """Rank 0's run id on every rank (one small broadcast), so the per-rank files name one run.
    ``run_id`` None on rank 0: a fresh random id."""
    _check_context(ctx)
    if run_id is not None and (not isinstance(run_id, str) or not run_id):
        raise ValueError(f"run_id must be a non-empty str or None, got {run_id!r}")
    local = run_id if run_id is not None or not ctx.is_main else secrets.token_hex(6)
    if not ctx._live():
        assert local is not None
        return local
    return str(broadcast_json(local, ctx))


def rank_telemetry(ctx: DistributedContext, directory: str | os.PathLike[str], *, run_id: str | None = None,
                   sinks: Iterable[TelemetrySink] = (), attributes: Mapping[str, Any] | None = None,
                   **emitter_options: Any) -> TelemetryEmitter:
    """An emitter writing this rank's JSONL file in ``directory`` (see :func:`telemetry_file_name`),
    plus ``sinks``, with every record tagged with the rank and rank 0's run id (a collective: call it
    on every rank). ``emitter_options`` go to :class:`~tolaria.telemetry.TelemetryEmitter`."""
    _check_context(ctx)
    shared = shared_run_id(run_id, ctx)
    path = Path(directory) / telemetry_file_name(ctx)
    emitter = TelemetryEmitter([JsonlSink(path), *sinks], attributes={**(attributes or {}), "run_id": shared},
                               **emitter_options)
    return bind_rank(emitter, ctx)


# ---- the single-source path ------------------------------------------------------------------------


def ddp_wrap(model: nn.Module, ctx: DistributedContext, **ddp_options: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` for the single-source path; the model itself in a single process.

    DDP averages ``.grad`` over ranks during ``backward`` (bucketed, overlapped with the backward
    pass) and broadcasts rank 0's parameters and buffers when it wraps, so replicas start and stay
    identical. Never combine it with a ``GradientBuffer`` + :func:`allreduce_gradient_buffer` (the
    gradients would be averaged twice, K times over): the multi-source path uses the buffer
    all-reduce, the single-source path DDP. ``ddp_options`` go to ``DistributedDataParallel``.
    """
    _check_context(ctx)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("the model is already wrapped in DistributedDataParallel")
    refused = sorted({"device_ids", "output_device", "process_group"} & set(ddp_options))
    if refused:
        raise ValueError(f"ddp_wrap sets {refused} from the context; remove them from the options")
    for name, p in model.named_parameters():
        if p.device != ctx.device:
            raise ValueError(f"parameter {name!r} is on {p.device}, but this rank's device is {ctx.device}; move the "
                             "model to ctx.device before wrapping it")
    if not ctx._live():
        return model
    if ctx.device.type == "cuda":
        return nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index],
                                                   output_device=ctx.device.index, **ddp_options)
    return nn.parallel.DistributedDataParallel(model, **ddp_options)


__all__ = [
    "DEFAULT_BUCKET_MB",
    "DistributedContext",
    "DistributedError",
    "EmergencyAgreement",
    "ReplicaMismatchError",
    "ShardedLoader",
    "agree_on_emergency",
    "agree_on_emergency_level",
    "allreduce_gradient_buffer",
    "allreduce_mean",
    "any_rank",
    "bind_rank",
    "broadcast_json",
    "broadcast_module_state",
    "broadcast_tree",
    "bucket_slices",
    "checkpoint_barrier",
    "ddp_wrap",
    "rank_telemetry",
    "resume_from_checkpoint",
    "shard",
    "shared_run_id",
    "synchronized_generator",
    "telemetry_file_name",
    "tensor_fingerprint",
    "verify_buffer_layout",
    "verify_replicas",
]
