"""Background staging for deadline-bound restores: long-lived workers, cooperative cancellation.

A rollback from disk reads and verifies a checkpoint on a worker thread while the caller waits on
an event with a timeout, so the caller always returns by its deadline. What it does not do is wait
for the worker: a read that is late (or stuck in the kernel) is *abandoned* -- its cancel flag is
set, which the reader checks between chunks -- and nobody ever joins it.

Two rules keep that safe:

- The workers are daemon threads that live across calls (no executor per call, so no
  ``shutdown(wait=True)`` that would block on a stuck read, and none that holds up interpreter exit).
- At most ``max_abandoned`` abandoned jobs may still be running. While that many are, :meth:`submit`
  refuses with :class:`StagingBusyError` rather than start another thread, so repeated timeouts
  cannot pile threads up: there are never more than ``max_abandoned + 1`` workers. A worker whose
  abandoned job finally ends reports it and goes back to the pool (or exits, if one is idle already).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from tolaria.state.errors import StagingBusyError, StateError
from tolaria.state.reporting import report
from tolaria.telemetry import TelemetryEmitter, emitter_or_default

__all__ = ["StagingJob", "StagingWorkers"]


class StagingJob:
    """One unit of staging work; ``fn(cancel_event)`` runs on a worker."""

    def __init__(self, fn: Callable[[threading.Event], Any], label: str):
        self.fn = fn
        self.label = label
        self.cancel = threading.Event()
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.abandoned = False
        self.submitted_at = time.monotonic()


class _Worker:
    def __init__(self, pool: StagingWorkers, name: str):
        self.pool = pool
        self.jobs: queue.SimpleQueue[StagingJob | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                job.result = job.fn(job.cancel)
            except BaseException as exc:  # handed to whoever waits on the job, or reported if abandoned
                job.error = exc
            if not self.pool._finished(self, job):
                return


class StagingWorkers:
    """Long-lived daemon workers with a bound on abandoned jobs (see the module docstring)."""

    def __init__(
        self, *, max_abandoned: int = 2, telemetry: TelemetryEmitter | None = None, name: str = "tolaria-staging"
    ):
        if max_abandoned < 0:
            raise ValueError(f"max_abandoned must be >= 0, got {max_abandoned}")
        self.max_abandoned = max_abandoned
        self.telemetry = emitter_or_default(telemetry)
        self.name = name
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._abandoned = 0
        self._names = itertools.count()
        self._closed = False

    @property
    def outstanding_abandoned(self) -> int:
        """Abandoned jobs still running."""
        return self._abandoned

    @property
    def thread_count(self) -> int:
        """Worker threads alive (idle or busy)."""
        with self._lock:
            return len(self._idle) + len(self._busy)

    def submit(self, fn: Callable[[threading.Event], Any], label: str) -> StagingJob:
        """Starts ``fn`` on an idle worker (creating one if needed and allowed)."""
        job = StagingJob(fn, label)
        with self._lock:
            if self._closed:
                raise StateError(f"staging workers are closed; cannot start {label}")
            if not self._idle and self._busy and self._abandoned >= self.max_abandoned:
                raise StagingBusyError(
                    f"{self._abandoned} abandoned staging read(s) are still running (bound {self.max_abandoned}); "
                    f"not starting {label} -- the storage is stalled or far too slow"
                )
            worker = self._idle.pop() if self._idle else _Worker(self, f"{self.name}-{next(self._names)}")
            self._busy.add(worker)
        worker.jobs.put(job)
        return job

    def abandon(self, job: StagingJob) -> None:
        """Gives up on ``job``: sets its cancel flag and counts it until it ends. Never waits."""
        with self._lock:
            job.cancel.set()
            if job.done.is_set() or job.abandoned:
                job.result = None  # finished just too late: discard the staged state now
                return
            job.abandoned = True
            self._abandoned += 1

    def _finished(self, worker: _Worker, job: StagingJob) -> bool:
        """Called by a worker when its job ends; False tells the worker to exit."""
        with self._lock:
            job.done.set()
            self._busy.discard(worker)
            abandoned = job.abandoned
            if abandoned:
                self._abandoned -= 1
                job.result = None  # nobody will apply it
            keep = not self._closed and not self._idle
            if keep:
                self._idle.append(worker)
        if abandoned:
            elapsed = time.monotonic() - job.submitted_at
            if job.error is not None:
                outcome = f"failed ({type(job.error).__name__}: {job.error})"
            else:
                outcome = "finished; result discarded"
            report(
                self.telemetry,
                "state.staging_abandoned_finished",
                "warning",
                f"abandoned {job.label} {outcome} after {elapsed:.3f}s",
                label=job.label,
                elapsed_s=elapsed,
            )
        return keep

    def close(self) -> None:
        """Lets every worker exit; busy ones exit when their job ends. Never waits for them."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.jobs.put(None)
