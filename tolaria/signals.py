"""Signals: the emergency level and the rollback deadline, across processes and within one.

The emergency level itself is :class:`EmergencyLevel` (NONE to HALT; :func:`as_level` checks a
value). :class:`LocalEmergencySignal` carries it within one process, with the semantics of
:class:`SharedEmergencySignal` below; ``tolaria.emergency`` (the controller) re-exports all three.

Across processes, a signal is one small record in a named shared-memory segment. One process writes it with
``trigger``; every process attached to the name reads it with ``read`` or blocks in ``wait`` until
the next trigger. The classes are compiled (``tolaria._signal``, C++):

- :class:`SharedEmergencySignal`: ``trigger(level, reason, monotonic_ms=None)`` with an
  :class:`EmergencyLevel` from NOTICE to HALT (anything else, NONE included, is a
  ``ValueError``: NONE is what ``clear()`` sets); ``raise_level(...)``, the same only if the level
  goes up, decided atomically across processes; ``lower_level(from_level, to_level, reason)``, a
  lowering (to NONE: a clear) only if the level is still ``from_level``, so a concurrent escalation
  is never undone; ``read()`` gives a :class:`SignalState`
  ``(level, reason, timestamp_ms, generation, is_set)``.
- :class:`SharedDeadlineSignal`: ``trigger(reason, monotonic_ms=None)``; ``read()`` gives a
  :class:`DeadlineState` ``(timestamp_ms, reason, generation, is_set)``.

Both share one primitive and these rules:

- ``create(name)`` makes the segment (mode 0600), ``attach(name)`` opens it (``FileNotFoundError``
  when missing). ``create_or_attach(name)`` does whichever applies: of several processes calling it
  at once (the ranks of one host), exactly one creates and the others attach (``created`` says
  which); none fails. Names are 1 to 200 letters, digits, ``.``, ``_`` or ``-`` (no ``/``), else
  ``ValueError``. The segment header holds a magic number and a layout version: a name holding
  anything else raises :class:`SignalLayoutError`.
- Only segments of this process's effective user, writable by no one else (no group or other write
  bit), are attached or reclaimed; any other raises ``PermissionError``: another user could forge or
  suppress a HALT through it.
- Nothing read from a segment is trusted (another process may overwrite any byte): the header is
  checked on every call, every record read is checked (level, reason length and UTF-8, timestamp),
  and a bad one raises :class:`SignalLayoutError`; a record mid-write or a writer lock held for
  ``STUCK_S`` (0.5) seconds raises ``RuntimeError`` instead of hanging. A ``raise_level`` or
  ``trigger`` replaces a corrupted record; ``lower_level`` leaves it alone (it may hide a higher
  level). The one thing not survived: a process of the same user truncating the segment after
  others mapped it (their next access faults); same-user processes are as trusted as the process.
- A segment whose creator died (crash, ``SIGKILL``) is reclaimed by ``create``: adopted in place
  when it has this layout (processes still attached stay connected; the record is cleared and
  ``reclaimed_pid`` names the dead creator), replaced when it has another layout version. One whose
  creator is alive raises ``FileExistsError``. A writer that dies mid-write leaves a record that
  ``read()`` reports (``RuntimeError``) and the next ``trigger``/``clear`` repairs.
- Every write is one record published under a seqlock: a reader in another process never sees half
  of one trigger and half of another. ``generation`` grows with every ``trigger`` and ``clear``.
- ``reason`` is UTF-8, cut to :data:`MAX_REASON_BYTES` (256) bytes on a character boundary.
  ``monotonic_ms`` defaults to now on the clock behind :func:`time.monotonic`, which every process on
  the host shares; times are milliseconds.
- ``clear()`` resets everything (not set, level NONE, empty reason, timestamp 0.0) and bumps the
  generation; it does not release waiters.
- ``wait(timeout_s, after_generation=None)`` releases the GIL and sleeps until a trigger with a
  generation above ``after_generation`` (default: the generation when called), returning ``True``,
  or until the timeout, returning ``False``. On Linux it sleeps on a futex in the segment (woken by
  the writer directly); elsewhere it polls every 0.2 ms. To never miss a trigger, read the
  generation first and pass it::

      state = signal.read()
      ...
      if signal.wait(5.0, after_generation=state.generation):
          handle(signal.read())

- ``close()`` releases this process's handle; ``unlink()`` removes the name. Used as a context
  manager, a handle closes on exit, and the handle that created the segment also unlinks it.

Handles are not picklable: each process attaches by name.
"""

from __future__ import annotations

import numbers
import threading
from enum import IntEnum

from tolaria._signal import (
    MAX_REASON_BYTES,
    DeadlineState,
    SharedDeadlineSignal,
    SharedEmergencySignal,
    SignalLayoutError,
    SignalState,
)
from tolaria._validation import check_timeout, check_timestamp_ms

__all__ = [
    "MAX_REASON_BYTES",
    "DeadlineState",
    "EmergencyLevel",
    "LocalEmergencySignal",
    "SharedDeadlineSignal",
    "SharedEmergencySignal",
    "SignalLayoutError",
    "SignalState",
    "as_level",
]


class EmergencyLevel(IntEnum):
    """How careful training must be; higher is more severe."""

    NONE = 0
    NOTICE = 1
    ELEVATED = 2
    CONSERVATIVE = 3
    HALT = 4


def as_level(level: object) -> EmergencyLevel:
    """``level`` as an :class:`EmergencyLevel`; anything else (bool, float, str, out of range) is a ValueError."""
    if isinstance(level, bool) or not isinstance(level, numbers.Integral):
        raise ValueError(f"invalid emergency level {level!r}: expected an EmergencyLevel or an int in 0..4")
    try:
        return EmergencyLevel(int(level))
    except ValueError:
        raise ValueError(
            f"invalid emergency level {int(level)}: EmergencyLevel values are 0..4 "
            "(NONE, NOTICE, ELEVATED, CONSERVATIVE, HALT)"
        ) from None


def _trigger_level(level: object) -> EmergencyLevel:
    checked = as_level(level)
    if checked == EmergencyLevel.NONE:
        raise ValueError("cannot trigger emergency level NONE (0): use clear() to reset the signal")
    return checked


def _utf8_prefix(text: str, max_bytes: int = MAX_REASON_BYTES) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes without splitting a character (as the shared signal does)."""
    if not isinstance(text, str):
        raise TypeError(f"reason must be a str, got {type(text).__name__}")
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    # Bytes cut mid-character are the only undecodable ones, all at the end: drop them.
    return data[:max_bytes].decode("utf-8", errors="ignore")


class LocalEmergencySignal:
    """The emergency signal within one process, with the semantics of
    :class:`SharedEmergencySignal`: ``trigger`` stamps the time (``time.monotonic``,
    milliseconds) when none is given and cuts the reason to ``MAX_REASON_BYTES`` UTF-8 bytes;
    ``clear`` resets level, reason and timestamp and bumps the generation; ``wait`` blocks (on a
    :class:`threading.Condition`) until a trigger newer than ``after_generation``.
    """

    MAX_REASON_BYTES = MAX_REASON_BYTES

    def __init__(self, name: str = "local") -> None:
        self.name = name
        self._cond = threading.Condition()
        self._level = EmergencyLevel.NONE
        self._reason = ""
        self._timestamp_ms = 0.0
        self._generation = 0
        self._trigger_generation = 0
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"emergency signal {self.name!r} is closed")

    def _publish(self, level: EmergencyLevel, reason: str, monotonic_ms: float | None) -> int:
        # Caller holds the condition's lock.
        self._level = level
        self._reason = _utf8_prefix(reason)
        self._timestamp_ms = check_timestamp_ms(monotonic_ms)
        self._generation += 1
        self._trigger_generation = self._generation
        self._cond.notify_all()
        return self._generation

    def trigger(self, level: int, reason: str, monotonic_ms: float | None = None) -> int:
        """Sets the signal to ``level`` (NOTICE..HALT) with ``reason``; returns the new generation."""
        checked = _trigger_level(level)
        check_timestamp_ms(monotonic_ms)
        with self._cond:
            self._check_open()
            return self._publish(checked, reason, monotonic_ms)

    def raise_level(self, level: int, reason: str, monotonic_ms: float | None = None) -> int | None:
        """Like :meth:`trigger`, only if ``level`` is above the current one; else returns None."""
        checked = _trigger_level(level)
        check_timestamp_ms(monotonic_ms)
        with self._cond:
            self._check_open()
            if self._level >= checked:
                return None
            return self._publish(checked, reason, monotonic_ms)

    def lower_level(self, from_level: int, to_level: int, reason: str, monotonic_ms: float | None = None) -> int | None:
        """Lowers the level from ``from_level`` to ``to_level`` (NONE clears), only if it is still
        ``from_level``; returns the new generation, or None when the level had changed."""
        source = _trigger_level(from_level)
        target = as_level(to_level)
        if target >= source:
            raise ValueError(f"lower_level needs a level below {int(source)}, got {int(target)}")
        check_timestamp_ms(monotonic_ms)
        with self._cond:
            self._check_open()
            if self._level != source:
                return None
            if target == EmergencyLevel.NONE:
                return self._clear_locked()
            return self._publish(target, reason, monotonic_ms)

    def clear(self) -> int:
        """Resets level, reason and timestamp; returns the new generation. Waiters stay asleep."""
        with self._cond:
            self._check_open()
            return self._clear_locked()

    def _clear_locked(self) -> int:
        self._level = EmergencyLevel.NONE
        self._reason = ""
        self._timestamp_ms = 0.0
        self._generation += 1
        return self._generation

    def read(self) -> SignalState:
        """The current record."""
        with self._cond:
            self._check_open()
            return SignalState(
                level=int(self._level),
                reason=self._reason,
                timestamp_ms=self._timestamp_ms,
                generation=self._generation,
                is_set=self._level != EmergencyLevel.NONE,
            )

    def is_set(self) -> bool:
        with self._cond:
            self._check_open()
            return self._level != EmergencyLevel.NONE

    @property
    def generation(self) -> int:
        with self._cond:
            self._check_open()
            return self._generation

    def wait(self, timeout_s: float | None, after_generation: int | None = None) -> bool:
        """Blocks until a trigger with a generation above ``after_generation`` (default: the current
        one) or the timeout (None: no limit); returns whether such a trigger happened."""
        timeout = check_timeout(timeout_s)
        if after_generation is not None and (isinstance(after_generation, bool) or after_generation < 0):
            raise ValueError(f"after_generation must be a generation (>= 0), got {after_generation!r}")
        with self._cond:
            self._check_open()
            target = self._generation if after_generation is None else after_generation
            self._cond.wait_for(lambda: self._trigger_generation > target or self._closed, timeout)
            if self._trigger_generation > target:
                return True
            if self._closed:
                raise ValueError(f"emergency signal {self.name!r} was closed while waiting")
            return False

    def close(self) -> None:
        """Closes the signal: waiters end with ValueError, later calls fail. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> LocalEmergencySignal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalEmergencySignal(name={self.name!r}, closed={self._closed})"
