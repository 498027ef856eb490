"""Cross-process signals over POSIX shared memory: the emergency level and the rollback deadline.

A signal is one small record in a named shared-memory segment. One process writes it with
``trigger``; every process attached to the name reads it with ``read`` or blocks in ``wait`` until
the next trigger. The classes are compiled (``tolaria._signal``, C++):

- :class:`SharedEmergencySignal`: ``trigger(level, reason, monotonic_ms=None)`` with an
  :class:`~tolaria.emergency.EmergencyLevel` from NOTICE to HALT (anything else, NONE included, is a
  ``ValueError``: NONE is what ``clear()`` sets); ``raise_level(...)``, the same only if the level
  goes up, decided atomically across processes; ``lower_level(from_level, to_level, reason)``, a
  lowering (to NONE: a clear) only if the level is still ``from_level``, so a concurrent escalation
  is never undone; ``read()`` gives a :class:`SignalState`
  ``(level, reason, timestamp_ms, generation, is_set)``.
- :class:`SharedDeadlineSignal`: ``trigger(reason, monotonic_ms=None)``; ``read()`` gives a
  :class:`DeadlineState` ``(timestamp_ms, reason, generation, is_set)``.

Both share one primitive and these rules:

- ``create(name)`` makes the segment (mode 0600), ``attach(name)`` opens it (``FileNotFoundError``
  when missing). Names are 1 to 200 letters, digits, ``.``, ``_`` or ``-`` (no ``/``), else
  ``ValueError``. The segment header holds a magic number and a layout version: a name holding
  anything else raises :class:`SignalLayoutError`.
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

from tolaria._signal import (
    MAX_REASON_BYTES,
    DeadlineState,
    SharedDeadlineSignal,
    SharedEmergencySignal,
    SignalLayoutError,
    SignalState,
)

__all__ = [
    "MAX_REASON_BYTES",
    "DeadlineState",
    "SharedDeadlineSignal",
    "SharedEmergencySignal",
    "SignalLayoutError",
    "SignalState",
]
