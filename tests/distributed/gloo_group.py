"""Joining and leaving the gloo group of one spawned test rank, shared by the multi-process harnesses."""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from tolaria.distributed import DistributedContext, release_process_groups
from tolaria.distributed.context import import_before_process_group

__all__ = ["gloo_rank"]


@contextmanager
def gloo_rank(rank: int, world_size: int, out: Path, timeout_s: float) -> Iterator[DistributedContext]:
    """Joins the gloo group of ``world_size`` ranks through a ``FileStore`` in ``out`` and yields its
    context. A failure's traceback is printed (the parent sees only the exit code). On leaving, the
    group is destroyed and freed (:func:`release_process_groups`); after a scenario that succeeded,
    a group still held fails the rank, since its worker threads can abort the process at exit."""
    torch.set_num_threads(1)
    import_before_process_group()  # else the group outlives destroy_process_group (see its docstring)
    store = dist.FileStore(str(Path(out) / "store"), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    try:
        yield DistributedContext.from_process_group()
    except BaseException:
        traceback.print_exc()
        release_process_groups()
        raise
    held = release_process_groups()
    if held:
        raise AssertionError(f"rank {rank}: process groups {held} outlived the scenario (see release_process_groups)")
