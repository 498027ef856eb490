"""StateManager: the one owner of snapshots, durable checkpoints and rollback.

Typical use in a training loop::

    with StateManager("runs/a/state", fast_cache_mb=2048, keep_last=3) as state:
        for step in ...:
            ...
            if step % 50 == 0:
                state.snapshot(step, model, optimizer)
            if step % 1000 == 0:
                state.checkpoint(step, model, optimizer, extra={"lr": lr.state_dict()})
            if diverged:
                result = state.rollback(step - 1, model, optimizer, deadline_s=0.5)
                if not result.ok:
                    ...  # result.reason says why; a missed deadline also raised the shared signal

After a crash: ``step = state.restore_latest(model, optimizer)`` (the ``extra`` saved with it is in
``state.last_restored_extra``).
"""

from __future__ import annotations

import fcntl
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tolaria.signals import SharedDeadlineSignal
from tolaria.state.checkpoints import CHECKPOINT_FORMAT, CheckpointEntry, CheckpointStore
from tolaria.state.deadline_segments import create_deadline_signal
from tolaria.state.errors import CheckpointError, StateError
from tolaria.state.reporting import report
from tolaria.state.restore import capture, restore
from tolaria.state.rollback import DeadlineRollback, RollbackResult
from tolaria.state.snapshots import SnapshotCache, SnapshotInfo
from tolaria.state.trees import clone_tree
from tolaria.telemetry import TelemetryEmitter, emitter_or_default

__all__ = ["LOCK_NAME", "RestoredState", "StateManager"]

LOCK_NAME = ".lock"


@dataclass(frozen=True)
class RestoredState:
    """What :meth:`StateManager.restore_latest_with_extra` restored."""

    step: int
    extra: Any
    file: str
    sequence: int


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    return step


class StateManager:
    """Snapshots (fast tier), checkpoints (durable tier) and deadline-bound rollback.

    Args:
        root: folder of the durable checkpoints (created if missing). One manager per folder at a
            time: a lock file enforces it.
        fast_cache_mb: memory budget of the in-memory snapshots, MiB (0 disables the fast tier).
        keep_last: committed checkpoints kept; older ones are deleted once a new one commits.
        telemetry: where events and metrics go (default: Python logging).
        deadline_signal: the shared deadline signal to trigger on a missed rollback deadline. If
            None, the manager creates one named ``tolaria-deadline-<pid>-<n>`` when a rollback first
            arms a deadline (or ``deadline_signal`` is read), and unlinks it in :meth:`close`, when
            the manager is collected, or at interpreter exit; creating one first reclaims those
            of processes that died (see :mod:`tolaria.state.deadline_segments`).
        checksum: per-file checksum of checkpoint files: ``"crc32"`` (default; fast enough to keep
            up with the write) or a hashlib algorithm such as ``"sha256"`` (see CheckpointStore).
        max_abandoned_reads: abandoned durable reads (past a deadline, still running) allowed at
            once; beyond it a rollback from disk is refused at once instead of starting a thread.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        fast_cache_mb: float = 1024,
        keep_last: int = 3,
        telemetry: TelemetryEmitter | None = None,
        *,
        deadline_signal: SharedDeadlineSignal | None = None,
        checksum: str = "crc32",
        max_abandoned_reads: int = 2,
    ):
        if (
            not isinstance(fast_cache_mb, (int, float))
            or isinstance(fast_cache_mb, bool)
            or not fast_cache_mb >= 0
            or not math.isfinite(fast_cache_mb)
        ):
            raise ValueError(f"fast_cache_mb must be a finite number >= 0, got {fast_cache_mb!r}")
        self.root = Path(root)
        self.telemetry = emitter_or_default(telemetry)
        self.last_restored_extra: Any = None
        self.last_restored_step: int | None = None
        self._closed = False
        self._lock_fd = self._acquire_folder_lock()
        self._signal: SharedDeadlineSignal | None = None
        self._release_signal: Callable[[], None] | None = None  # closes and unlinks the manager's own
        self._rollback: DeadlineRollback | None = None
        self._store: CheckpointStore | None = None
        self._snapshots: SnapshotCache | None = None
        try:
            self._snapshots = SnapshotCache(int(fast_cache_mb * (1 << 20)), self.telemetry)
            self._store = CheckpointStore(self.root, keep_last, checksum=checksum, telemetry=self.telemetry)
            # Without a signal given, the manager's own is created when a deadline is first armed.
            self._signal = deadline_signal
            self._rollback = DeadlineRollback(
                self._snapshots, self._store, self._live_signal, self.telemetry, max_abandoned_reads=max_abandoned_reads
            )
        except BaseException:
            self.close()
            raise

    def _acquire_folder_lock(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateError(f"{self.root} is in use by another StateManager (pid {holder}); close it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    # ---- properties --------------------------------------------------------------------------

    @property
    def fast_cache_bytes(self) -> int:
        """Bytes held by the in-memory snapshots (exact)."""
        return self._snapshots.nbytes

    @property
    def snapshot_steps(self) -> list[int]:
        """Steps with an in-memory snapshot, ascending."""
        return self._snapshots.steps()

    @property
    def checkpoints(self) -> tuple[CheckpointEntry, ...]:
        """Committed checkpoints, oldest commit first."""
        return self._live_store().entries

    def _live_signal(self) -> SharedDeadlineSignal:
        if self._closed:
            raise StateError(f"the state manager of {self.root} is closed")
        if self._signal is None:
            self._signal, self._release_signal = create_deadline_signal(self)
        return self._signal

    @property
    def deadline_signal(self) -> SharedDeadlineSignal:
        """The shared signal a missed rollback deadline triggers (created on first use)."""
        return self._live_signal()

    @property
    def staging_threads(self) -> int:
        """Worker threads of the durable rollback path (bounded by ``max_abandoned_reads + 1``)."""
        return self._live_rollback().workers.thread_count

    @property
    def outstanding_abandoned_reads(self) -> int:
        return self._live_rollback().workers.outstanding_abandoned

    def _live_store(self) -> CheckpointStore:
        if self._closed or self._store is None:
            raise StateError(f"the state manager of {self.root} is closed")
        return self._store

    def _live_rollback(self) -> DeadlineRollback:
        if self._closed or self._rollback is None:
            raise StateError(f"the state manager of {self.root} is closed")
        return self._rollback

    # ---- fast tier ---------------------------------------------------------------------------

    def snapshot(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: Any = None
    ) -> SnapshotInfo:
        """Copies model, optimizer (and ``extra``) state into the in-memory cache for ``step``.

        Tensor copies, never pickled bytes: plain copies for CPU tensors, asynchronous copies into
        pinned memory for CUDA tensors (ordered on the current stream). A snapshot of a step already
        cached replaces it (its bytes released first); least recently used snapshots are evicted to
        stay within ``fast_cache_mb``. Raises :class:`StateError` if one snapshot alone exceeds it.
        """
        _check_step(step)
        self._live_store()
        start = time.perf_counter()
        info = self._snapshots.put(step, capture(model, optimizer, extra))
        self.telemetry.metric("state.snapshot_s", time.perf_counter() - start, step=step, nbytes=info.nbytes)
        self.telemetry.metric("state.fast_cache_bytes", info.cache_bytes)
        return info

    # ---- durable tier ------------------------------------------------------------------------

    def checkpoint(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: Any = None
    ) -> CheckpointEntry:
        """Writes and commits a durable checkpoint of ``step``; returns its manifest entry.

        ``extra`` (LR controller state, counters, RNG states, ...) is saved with it and must be
        loadable with ``weights_only=True``: tensors, dicts, lists, tuples, numbers, strings, None.
        """
        _check_step(step)
        store = self._live_store()
        start = time.perf_counter()
        payload = {"format": CHECKPOINT_FORMAT, "step": step, **capture(model, optimizer, extra)}
        entry = store.write(step, payload)
        elapsed = time.perf_counter() - start
        self.telemetry.event(
            "state.checkpoint_committed",
            message=f"checkpoint of step {step} committed as {entry.file}",
            step=step,
            file=entry.file,
            nbytes=entry.nbytes,
            elapsed_s=elapsed,
        )
        self.telemetry.metric("state.checkpoint_s", elapsed, step=step, nbytes=entry.nbytes)
        return entry

    def restore_latest_with_extra(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> RestoredState:
        """Restores the newest committed checkpoint that verifies; returns its step and ``extra``.

        A checkpoint that fails its checksum or cannot be read is reported and the previous one is
        used; if none verifies, :class:`CheckpointError` says why for each. A checkpoint that
        verifies but does not fit the model or optimizer raises (StateMismatchError /
        OptimizerStateError) and nothing is changed.
        """
        store = self._live_store()
        start = time.perf_counter()
        entry, payload = store.load_newest()
        source = f"checkpoint of step {entry.step} ({entry.file})"
        restore(model, optimizer, payload, source)
        extra = clone_tree(payload["extra"])  # out of the file's memory map
        del payload
        self.last_restored_step, self.last_restored_extra = entry.step, extra
        elapsed = time.perf_counter() - start
        self.telemetry.event(
            "state.restored", message=f"restored the {source}", step=entry.step, file=entry.file, elapsed_s=elapsed
        )
        return RestoredState(entry.step, extra, entry.file, entry.sequence)

    def restore_latest(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Restores the newest committed checkpoint that verifies and returns its step.

        Its ``extra`` is left in :attr:`last_restored_extra` (see :meth:`restore_latest_with_extra`).
        """
        return self.restore_latest_with_extra(model, optimizer).step

    def verify_checkpoints(self) -> list[tuple[CheckpointEntry, str | None]]:
        """Every committed checkpoint with None if it verifies, else why not (also reported)."""
        store = self._live_store()
        results: list[tuple[CheckpointEntry, str | None]] = []
        for entry in store.entries:
            try:
                store.verify(entry)
                results.append((entry, None))
            except CheckpointError as exc:
                report(self.telemetry, "state.checkpoint_invalid", "error", str(exc), step=entry.step, file=entry.file)
                results.append((entry, str(exc)))
        return results

    def wait_for_cleanup(self) -> None:
        """Blocks until checkpoints beyond ``keep_last`` (deleted in the background) are gone."""
        self._live_store().wait_for_cleanup()

    # ---- rollback ----------------------------------------------------------------------------

    def rollback(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, deadline_s: float
    ) -> RollbackResult:
        """Restores the nearest state at or before ``step`` within ``deadline_s`` seconds.

        The fast snapshot with the largest step <= ``step`` first; else the most recently committed
        checkpoint of step <= ``step`` that verifies, loaded in the background. Returns within the
        deadline plus a small margin even if storage stalls; on a miss the model and optimizer are
        untouched, the shared deadline signal is triggered and the result says when and why. See
        :class:`RollbackResult`.
        """
        _check_step(step)
        if (
            isinstance(deadline_s, bool)
            or not isinstance(deadline_s, (int, float))
            or not deadline_s > 0
            or not math.isfinite(deadline_s)
        ):
            raise ValueError(f"deadline_s must be a finite number of seconds > 0, got {deadline_s!r}")
        self._live_signal()  # armed: the segment exists before the deadline can be missed
        result = self._live_rollback().run(step, model, optimizer, float(deadline_s))
        if result.ok:
            self.last_restored_step, self.last_restored_extra = result.step, result.extra
        return result

    # ---- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Drops the snapshots, stops the workers (never waiting on a stuck read), closes the signal
        (unlinking it if this manager created it) and releases the folder. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._rollback is not None:
            self._rollback.close()
        if self._store is not None:
            self._store.close()
        if self._snapshots is not None:
            self._snapshots.clear()
        if self._release_signal is not None:
            self._release_signal()  # the manager's own: closed and unlinked, its exit finaliser spent
        self._signal = self._release_signal = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> StateManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._snapshots)} snapshots, {self.fast_cache_bytes} bytes"
        return f"StateManager({str(self.root)!r}, {state})"
