"""Leaving the process group for good: destroyed groups freed, their worker threads ended, before
Python shuts down.

``destroy_process_group`` unregisters the groups, but a group lives on, with its gloo worker threads,
while anything still references it. A worker still releasing its last collective once Python has
begun to shut down cannot take the GIL, and the process aborts at exit (SIGABRT, "terminate called
without an active exception"), at random (pytorch/pytorch#190489). Three things hold destroyed groups:

- the model: FSDP2's DTensor parameters hold their device mesh, which holds its groups (drop the
  model first);
- DTensor's caches (sharding propagation, in C++ and Python; redistribution plans; mesh topology),
  keyed by or holding the mesh, for the life of the process;
- default argument values: modules of ``torch.distributed`` imported after ``init_process_group``
  (``torch.distributed.nn``, which ``torch.optim`` and FSDP2 import) evaluated ``group.WORLD`` then.

:func:`release_process_groups` destroys what is left, clears the caches, resets those defaults to
None (their value when imported before any group exists), collects the garbage (the groups'
destructors join their threads while Python can still serve them) and names any group still held.
"""

from __future__ import annotations

import functools
import gc
import logging
import sys
import types
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("tolaria.distributed")

_FUNCTION_TYPES = (types.FunctionType, functools._lru_cache_wrapper)

# The groups destroyed here, weakly: a group that outlives release_process_groups is named there.
_destroyed: list[weakref.ref] = []


def destroy_and_free_process_groups() -> None:
    """Destroys every process group and frees those nothing else holds; quiet about the others
    (:meth:`DistributedContext.close` runs it while the caller may still hold an FSDP2 model)."""
    if dist.is_available() and dist.is_initialized():
        _destroyed.extend(weakref.ref(group) for group in dist.distributed_c10d._world.pg_map)
        dist.destroy_process_group()
    _free_destroyed_groups()


def release_process_groups() -> list[str]:
    """Destroys the process groups still initialised and frees every destroyed one, so that their
    worker threads end now, not while the interpreter shuts down. Call it last, after dropping the
    model (an FSDP2 model holds its groups); ``tolaria train`` does. Safe to call more than once.

    Returns the names of the groups this module destroyed that something still holds (normally none);
    each is logged as a warning, since its threads may abort the process at exit.
    """
    destroy_and_free_process_groups()
    survivors = [group.group_name for group in (ref() for ref in _destroyed) if group is not None]
    _destroyed[:] = [ref for ref in _destroyed if ref() is not None]
    if survivors:
        log.warning(
            "process group(s) %s are destroyed but still referenced; their worker threads may abort "
            "the process at exit. Drop the model (an FSDP2 model holds its groups) and every "
            "DistributedDataParallel wrapper before calling release_process_groups().",
            ", ".join(survivors),
        )
    return survivors


def _free_destroyed_groups() -> None:
    if not dist.is_available():
        return
    live = set(dist.distributed_c10d._world.pg_map)
    # The C++ dispatch fast path's sharding cache (recent torch), then the Python caches.
    clear_native_cache = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if clear_native_cache is not None:
        clear_native_cache()
    dtensor_api = sys.modules.get("torch.distributed.tensor._api")
    if dtensor_api is not None:  # per thread: this thread's, where DTensor's ops ran
        dtensor_api.DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
    redistribute = sys.modules.get("torch.distributed.tensor._redistribute")
    if redistribute is not None and hasattr(redistribute, "clear_redistribute_planner_cache"):
        redistribute.clear_redistribute_planner_cache()
    for function in _distributed_functions():
        if isinstance(function, functools._lru_cache_wrapper):
            function.cache_clear()
        defaults = getattr(function, "__defaults__", None)
        if defaults and any(_is_destroyed(value, live) for value in defaults):
            function.__defaults__ = tuple(None if _is_destroyed(value, live) else value for value in defaults)
    gc.collect()


def _is_destroyed(value: Any, live: set) -> bool:
    return issubclass(type(value), dist.ProcessGroup) and value not in live


def _distributed_functions() -> Iterator[Any]:
    """The functions (and the methods of the classes) that ``torch.distributed``'s loaded modules
    define. Only what is a type or function is read: some module values warn on any attribute access."""
    for name, module in list(sys.modules.items()):
        if not name.startswith("torch.distributed.") or module is None:
            continue
        for value in list(vars(module).values()):
            kind = type(value)  # not isinstance: it reads __class__, which warns on deprecated values
            if issubclass(kind, type):
                members = list(vars(value).values())
            elif issubclass(kind, _FUNCTION_TYPES):
                members = [value]
            else:
                continue
            if value.__module__ != name:  # defined here, not imported
                continue
            for member in members:
                if issubclass(type(member), (staticmethod, classmethod)):
                    member = member.__func__
                if issubclass(type(member), _FUNCTION_TYPES):
                    yield member


__all__ = ["destroy_and_free_process_groups", "release_process_groups"]
