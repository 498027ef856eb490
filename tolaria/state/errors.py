"""Errors raised by the state manager: each names what was wrong and where."""

from __future__ import annotations

__all__ = [
    "StateError",
    "CheckpointError",
    "StateMismatchError",
    "OptimizerStateError",
    "StagingCancelled",
    "StagingBusyError",
]


class StateError(RuntimeError):
    """Base class for every failure of :mod:`tolaria.state`."""


class CheckpointError(StateError):
    """A durable checkpoint could not be written, read or verified (the message says which and why)."""


class StateMismatchError(StateError, ValueError):
    """A snapshot or checkpoint does not fit the model it is restored into (keys, shapes, dtypes)."""


class OptimizerStateError(StateMismatchError):
    """Saved optimizer state does not load into the given optimizer.

    Raised instead of ever continuing from fresh optimizer state.
    """


class StagingCancelled(StateError):
    """A background staging read saw its cancel flag (its rollback gave up at the deadline)."""


class StagingBusyError(StateError):
    """Too many abandoned staging reads are still running; no new one is started."""
