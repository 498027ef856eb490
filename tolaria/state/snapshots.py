"""The fast tier: in-memory snapshots in an LRU cache bounded by bytes.

A snapshot is a tensor copy of the model, optimizer and extra state (:func:`~tolaria.state.trees.pack`:
flat buffers, pinned and asynchronous for CUDA models), never pickled bytes. The cache counts the
exact bytes its snapshots hold. Replacing a step's snapshot releases the old one's bytes before the
new one is allocated, and least recently used snapshots are evicted until the new one fits, so the
memory held never exceeds the budget.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from tolaria.state.errors import StateError
from tolaria.state.reporting import report
from tolaria.state.trees import PackedTree, pack, plan_pack
from tolaria.telemetry import TelemetryEmitter, emitter_or_default

__all__ = ["SnapshotInfo", "Snapshot", "SnapshotCache"]

log = logging.getLogger("tolaria.state")


@dataclass(frozen=True)
class SnapshotInfo:
    """What :meth:`SnapshotCache.put` did: the step stored, its bytes, and the steps it evicted."""

    step: int
    nbytes: int
    evicted: tuple[int, ...]
    replaced: bool
    cache_bytes: int


@dataclass
class Snapshot:
    """One cached snapshot: the step it was taken at and its packed tensors."""

    step: int
    packed: PackedTree

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes


class SnapshotCache:
    """LRU cache of snapshots keyed by step, bounded by ``capacity_bytes``.

    Thread-safe. ``nbytes`` is exactly the sum of the bytes of the snapshots held.
    """

    def __init__(self, capacity_bytes: int, telemetry: TelemetryEmitter | None = None):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = int(capacity_bytes)
        self.telemetry = emitter_or_default(telemetry)
        self._entries: OrderedDict[int, Snapshot] = OrderedDict()  # least recently used first
        self._nbytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached snapshots (flat buffers, alignment padding included)."""
        return self._nbytes

    def steps(self) -> list[int]:
        """Cached steps, ascending."""
        with self._lock:
            return sorted(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def _remove(self, step: int) -> Snapshot:
        snapshot = self._entries.pop(step)
        self._nbytes -= snapshot.nbytes
        return snapshot

    def put(self, step: int, tree: Any) -> SnapshotInfo:
        """Copies ``tree`` into a new snapshot for ``step`` (replacing any older one for that step)."""
        try:
            plan = plan_pack(tree, path=f"snapshot of step {step}")  # one walk: the bytes needed, then the copy
        except Exception as exc:
            self._report_failure(step, exc, [])
            raise
        need = plan.nbytes
        if need > self.capacity_bytes:
            raise StateError(
                f"snapshot of step {step} needs {need} bytes but the fast cache holds at most "
                f"{self.capacity_bytes} bytes; raise fast_cache_mb"
            )
        with self._lock:
            replaced = step in self._entries
            if replaced:
                self._remove(step)  # the old copy's bytes are released before the new one is made
            evicted: list[int] = []
            while self._nbytes + need > self.capacity_bytes:
                oldest = next(iter(self._entries))
                self._remove(oldest)
                evicted.append(oldest)
            try:
                packed = pack(plan)
            except Exception as exc:
                self._report_failure(step, exc, ([step] if replaced else []) + evicted)
                raise
            self._entries[step] = Snapshot(step, packed)
            self._nbytes += need
            cache_bytes = self._nbytes
        if evicted:
            self.telemetry.count("state.snapshots_evicted", len(evicted))
            log.debug("fast cache evicted snapshots of steps %s to fit step %d", evicted, step)
        return SnapshotInfo(step, need, tuple(evicted), replaced, cache_bytes)

    def _report_failure(self, step: int, exc: Exception, lost: list[int]) -> None:
        message = f"snapshot of step {step} failed ({type(exc).__name__}: {exc}); snapshots released for it: {lost}"
        report(self.telemetry, "state.snapshot_failed", "error", message, step=step, released=lost)

    def get(self, step: int) -> Snapshot | None:
        """The snapshot of exactly ``step`` (marked recently used), or None."""
        with self._lock:
            snapshot = self._entries.get(step)
            if snapshot is not None:
                self._entries.move_to_end(step)
            return snapshot

    def nearest_at_or_before(self, step: int) -> Snapshot | None:
        """The snapshot with the largest step <= ``step`` (marked recently used), or None."""
        with self._lock:
            candidates = [s for s in self._entries if s <= step]
            if not candidates:
                return None
            best = max(candidates)
            self._entries.move_to_end(best)
            return self._entries[best]

    def discard(self, step: int) -> bool:
        """Drops the snapshot of ``step``; False if there was none."""
        with self._lock:
            if step not in self._entries:
                return False
            self._remove(step)
            return True

    def clear(self) -> None:
        """Drops every snapshot."""
        with self._lock:
            self._entries.clear()
            self._nbytes = 0
