"""Data sharding: each rank iterates its own, equal-sized shard of a map-style data set.

:func:`shard` turns a ``Dataset`` (or a ``DataLoader`` with its default sampler) into a
:class:`ShardedLoader` over a ``DistributedSampler``, whose shuffle depends only on the seed and the
epoch, so it is the same on every rank and after a resume.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterator
from typing import Any

from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from tolaria.distributed.context import DistributedContext, _check_context, _check_int
from tolaria.telemetry import TelemetryEmitter, emitter_or_default

# One logger name for the whole package, as before the split, so log filters keep matching.
log = logging.getLogger("tolaria.distributed")


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
            message = (
                f"iterating the sharded data again with epoch {self.epoch}: the shuffle repeats; call "
                "set_epoch(epoch) at the start of every epoch"
            )
            log.warning(message)
            emitter_or_default(self.telemetry).event(
                "distributed.epoch_not_advanced", severity="warning", message=message, data_epoch=self.epoch
            )
        self._iterated_epoch = self.epoch
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __repr__(self) -> str:
        return (
            f"ShardedLoader(rank={self.sampler.rank}, num_replicas={self.sampler.num_replicas}, "
            f"samples_per_rank={self.sampler.num_samples}, batches={len(self.loader)}, epoch={self.epoch})"
        )


_LOADER_OPTIONS = (
    "num_workers",
    "collate_fn",
    "pin_memory",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "generator",
    "persistent_workers",
    "pin_memory_device",
    "in_order",
)


def shard(
    data: Dataset | DataLoader,
    ctx: DistributedContext,
    *,
    batch_size: int | None = None,
    shuffle: bool | None = None,
    seed: int = 0,
    drop_last: bool = False,
    telemetry: TelemetryEmitter | None = None,
    **loader_kwargs: Any,
) -> ShardedLoader:
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
            raise ValueError(
                "a DataLoader brings its own batch size and options; pass batch_size and loader "
                "options only with a Dataset"
            )
        dataset = data.dataset
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                "cannot shard a DataLoader over an IterableDataset with a DistributedSampler; "
                "split the stream by rank inside the IterableDataset instead"
            )
        if data.batch_size is None:
            raise ValueError(
                "the DataLoader has a custom batch_sampler (batch_size is None); shard the Dataset "
                "with shard(dataset, ctx, batch_size=...) instead"
            )
        if isinstance(data.sampler, RandomSampler):
            if data.sampler.replacement or data.sampler.num_samples != len(dataset):
                raise ValueError(
                    "the DataLoader's RandomSampler draws with replacement or a custom num_samples, "
                    "which a DistributedSampler cannot reproduce; shard the Dataset instead"
                )
            loader_shuffle = True
        elif isinstance(data.sampler, SequentialSampler):
            loader_shuffle = False
        else:
            raise ValueError(
                f"the DataLoader has a custom sampler ({type(data.sampler).__name__}); a "
                "DistributedSampler would replace it. Shard the Dataset and build the sampling per rank"
            )
        options = {name: getattr(data, name) for name in _LOADER_OPTIONS if hasattr(data, name)}
        if data.num_workers > 0:
            options["prefetch_factor"] = data.prefetch_factor
        batch = data.batch_size
        shuffle = loader_shuffle if shuffle is None else shuffle
        loader_drop_last = data.drop_last
    else:
        if isinstance(data, IterableDataset):
            raise TypeError(
                "cannot shard an IterableDataset with a DistributedSampler; split the stream by rank "
                "inside the IterableDataset instead"
            )
        if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
            raise TypeError(
                f"data must be a map-style Dataset (with __getitem__ and __len__) or a DataLoader, "
                f"got {type(data).__name__}"
            )
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
        raise ValueError(
            f"a data set of {len(dataset)} samples cannot give each of {ctx.world_size} ranks a sample "
            "with drop_last=True"
        )
    sampler = DistributedSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=int(seed), drop_last=drop_last
    )
    uneven = len(dataset) % ctx.world_size
    if uneven:
        what = (
            f"drops {uneven} sample(s) per epoch"
            if drop_last
            else f"repeats {sampler.total_size - len(dataset)} sample(s) per epoch"
        )
        message = f"{len(dataset)} samples do not divide over {ctx.world_size} ranks: the sharding {what}"
        log.warning(message)
        emitter_or_default(telemetry).event(
            "distributed.shard_uneven",
            severity="warning",
            message=message,
            samples=len(dataset),
            world_size=ctx.world_size,
            drop_last=drop_last,
        )
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=loader_drop_last, **options)
    return ShardedLoader(loader, sampler, telemetry)


__all__ = [
    "ShardedLoader",
    "shard",
]
