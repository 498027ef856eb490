"""The distributed context: where this process sits in the job, and joining the process group.

:class:`DistributedContext` comes from torchrun's launch environment, an already initialised process
group, or a single process. The validators and small control collectives after it (underscored) are
package-internal: the sibling modules of :mod:`tolaria.distributed` import them from here, so every
module checks its arguments and moves control values the same way.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tolaria.distributed.group_release import destroy_and_free_process_groups

# One logger name for the whole package, as before the split, so log filters keep matching.
log = logging.getLogger("tolaria.distributed")

DEFAULT_TIMEOUT_S = 1800.0
LAUNCH_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


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

    def __init__(
        self,
        rank: int,
        world_size: int,
        local_rank: int,
        device: torch.device | str,
        backend: str | None,
        *,
        owns_process_group: bool = False,
    ):
        world_size = _check_int("world_size", world_size, minimum=1)
        rank = _check_int("rank", rank, minimum=0)
        local_rank = _check_int("local_rank", local_rank, minimum=0)
        if rank >= world_size:
            raise ValueError(f"rank {rank} is out of range for world_size {world_size}")
        if backend is None and world_size != 1:
            raise ValueError(
                f"a context without a process group (backend None) must have world_size 1, got {world_size}"
            )
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
            device = (
                torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
            )
        return cls(0, 1, 0, device, None)

    @classmethod
    def from_environment(
        cls,
        *,
        backend: str | None = None,
        device: torch.device | str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> DistributedContext:
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
                raise DistributedError(
                    f"a process group with backend {existing!r} is already initialised; cannot use backend {backend!r}"
                )
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
        import_before_process_group()
        ctx = cls(rank, world_size, local_rank, chosen_device, chosen_backend, owns_process_group=True)
        store = _elastic_attempt_store(world_size, timeout)
        dist.init_process_group(
            backend=chosen_backend,
            **({"init_method": "env://"} if store is None else {"store": store}),
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
            device_id=chosen_device if chosen_device.type == "cuda" else None,
        )
        log.info(
            "joined the process group: rank %d of %d (local rank %d) on %s, backend %s",
            rank,
            world_size,
            local_rank,
            chosen_device,
            chosen_backend,
        )
        return ctx

    @classmethod
    def from_process_group(
        cls, *, device: torch.device | str | None = None, local_rank: int | None = None
    ) -> DistributedContext:
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
        """Destroys the process group if this context created it, and frees it unless something still
        holds it. Idempotent.

        Drop a ``DistributedDataParallel`` wrapper or an FSDP2 model first, or call
        :func:`~tolaria.distributed.release_process_groups` once they are gone: a group they hold
        lives on with its worker threads, which can abort the process at exit.
        """
        if self._closed:
            return
        self._closed = True
        if self._owns_process_group and dist.is_initialized():
            destroy_and_free_process_groups()

    def __enter__(self) -> DistributedContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"DistributedContext(rank={self._rank}, world_size={self._world_size}, local_rank={self._local_rank}, "
            f"device={self._device}, backend={self._backend!r})"
        )


def _elastic_attempt_store(world_size: int, timeout_s: float) -> dist.Store | None:
    """The store of this torchrun attempt, when torchrun shares its rendezvous store with the workers
    (its default since PyTorch 2.5); else None (``env://`` as usual).

    That store outlives a restart of the group (``--max-restarts``), and ``env://`` adds no prefix
    per attempt, so a restarted group reads the previous attempt's keys: gloo then dials the dead
    ranks' ports ("Gloo connectFullMesh failed ... Connection refused") and the restart fails. A
    prefix per attempt (``TORCHELASTIC_RESTART_COUNT``) keeps the attempts apart. The count is the
    same on every rank of one node; with several nodes whose agents count restarts differently,
    launch with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (a fresh store per attempt, no prefix here).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") == "1" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    attempt = _env_int("TORCHELASTIC_RESTART_COUNT")
    shared = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        _env_int("MASTER_PORT"),
        world_size,
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
    )
    return dist.PrefixStore(f"tolaria/attempt-{attempt}", shared)


def import_before_process_group() -> None:
    """Imports ``torch._dynamo`` now, before the process group exists.

    Imported after ``init_process_group`` (``torch.optim`` imports it when the first optimizer is
    built), it keeps the default group alive past ``destroy_process_group`` (``torch.distributed.nn``,
    which it imports, takes ``group.WORLD`` as a default argument value): the group's worker threads
    then outlive the interpreter, and one still releasing a finished collective while Python shuts
    down aborts the process at exit (SIGABRT, "terminate called without an active exception").
    :func:`~tolaria.distributed.release_process_groups` undoes that too, for groups joined without it.
    """
    import torch._dynamo  # noqa: F401


# ---- shared by the package: argument checks and control collectives --------------------------------


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


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "LAUNCH_ENV_VARS",
    "DistributedContext",
    "DistributedError",
    "ReplicaMismatchError",
    "import_before_process_group",
]
