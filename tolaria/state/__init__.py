"""Training state: the one owner of snapshots, durable checkpoints and rollback.

- :class:`StateManager` -- the entry point: ``snapshot`` (fast in-memory tier), ``checkpoint``
  (durable, atomic, checksummed), ``restore_latest`` and deadline-bound ``rollback``.
- :class:`RollbackResult` -- what a rollback did, including the deadline signal it raised.
- Errors: :class:`StateError` and its kinds (:class:`CheckpointError`, :class:`StateMismatchError`,
  :class:`OptimizerStateError`, ...).

Only this package calls ``torch.save``/``torch.load``, and every load uses ``weights_only=True``.
"""

from tolaria.state.checkpoints import CheckpointEntry, CheckpointStore
from tolaria.state.errors import (
    CheckpointError,
    OptimizerStateError,
    StagingBusyError,
    StagingCancelled,
    StateError,
    StateMismatchError,
)
from tolaria.state.manager import RestoredState, StateManager
from tolaria.state.rollback import RollbackResult
from tolaria.state.snapshots import SnapshotCache, SnapshotInfo

__all__ = [
    "CheckpointEntry",
    "CheckpointError",
    "CheckpointStore",
    "OptimizerStateError",
    "RestoredState",
    "RollbackResult",
    "SnapshotCache",
    "SnapshotInfo",
    "StagingBusyError",
    "StagingCancelled",
    "StateError",
    "StateManager",
    "StateMismatchError",
]
