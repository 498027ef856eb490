"""Stopping hung control calls: a cancellation token for cooperative calls, a child process for policies.

A Python thread cannot be killed, so the mediator (:mod:`.mediator`) abandons a call that outlives
its timeout. Two ways make that a stop rather than a leak:

- **Cooperative.** A policy's ``evaluate`` or an executor's ``apply`` that declares a parameter
  named ``cancel`` is called with a :class:`CancellationToken` as ``cancel=``; the mediator sets it
  when the call times out. The call checks it (``cancel.cancelled``, ``cancel.wait(s)`` in place of
  ``time.sleep(s)``, ``cancel.raise_if_cancelled()``) and returns, and its worker thread ends.
  Callables without such a parameter are called with the state (or the command) only, as before.
- **Isolated.** With ``policy_isolation="process"`` the policy runs in a child process (a policy is a
  function of the :class:`~tolaria.trainer.mediator.ControlState` summary), which is killed
  (SIGKILL) when a call times out; a replacement starts at once, off the training path. The policy
  object, the state and the returned commands cross a pipe, so they must be picklable (a policy
  defined at module level, commands of plain values); the errors say so. Processes are started with
  the ``spawn`` method: as with any ``multiprocessing`` program, the script that builds the trainer
  must guard its entry point with ``if __name__ == "__main__":``. On Linux the child is killed by the
  kernel when the trainer process dies (``PR_SET_PDEATHSIG``; strictly, when the thread that started
  it ends: the next call then finds it gone, reports it, and starts another).
"""

from __future__ import annotations

import ctypes
import inspect
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CallCancelled",
    "CancellationToken",
    "IsolatedResult",
    "PolicyIsolationError",
    "PolicyProcess",
    "accepts_cancel",
]

# A child imports the policy's module and tolaria (for ControlState) before it is ready.
START_TIMEOUT_S = 120.0
_STOP_JOIN_S = 2.0


class CallCancelled(RuntimeError):
    """Raised by :meth:`CancellationToken.raise_if_cancelled` once the call was cancelled."""


class PolicyIsolationError(RuntimeError):
    """The policy cannot run in a child process (not picklable, or its process failed to start)."""


class CancellationToken:
    """Set by the mediator when the call it was given to timed out; a cooperative call checks it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None

    def cancel(self, reason: str) -> None:
        """Asks the call to stop (idempotent: the first reason is kept)."""
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def is_set(self) -> bool:
        """Same as :attr:`cancelled` (the ``threading.Event`` spelling, for code that takes either)."""
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Sleeps up to ``timeout`` seconds, waking at once on cancellation; returns :attr:`cancelled`."""
        return self._event.wait(timeout)

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise CallCancelled(self.reason or "cancelled")


def accepts_cancel(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` declares a ``cancel`` parameter that can be passed by keyword."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: called the plain way
        return False
    param = parameters.get("cancel")
    return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


@dataclass(frozen=True)
class IsolatedResult:
    """How one call in the child process ended: ``kind`` is "ok", "raised", "timeout" (the process was
    killed) or "died"; ``error`` completes "policy.evaluate ..." (e.g. "raised ValueError: ...")."""

    kind: str
    value: Any = None
    error: str | None = None
    pid: int | None = None


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel SIGKILLs this child when the trainer process dies, even by SIGKILL, so a
    policy hung at that moment is not left behind (an idle child also exits when its pipe closes)."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed in the policy process")
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _serve(conn: Any, policy: Any, parent_pid: int) -> None:
    """The child: evaluates the policy on each state received, until told to stop or orphaned."""
    _die_with_parent(parent_pid)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            state = conn.recv()
        except EOFError:  # the trainer process is gone
            return
        if state is None:
            return
        try:
            value = policy.evaluate(state)
            if isinstance(value, Iterable) and not isinstance(value, (str, bytes, list, tuple)):
                value = list(value)  # a generator cannot cross the pipe; its commands can
        except Exception as exc:  # reported by the trainer exactly as an in-process raise
            conn.send(("raised", f"raised {type(exc).__name__}: {exc}"))
            continue
        try:
            conn.send(("ok", value))
        except Exception as exc:  # pickling failed before anything was written
            conn.send(
                (
                    "raised",
                    f"returned commands that cannot be sent to the trainer process ({type(exc).__name__}: {exc}); "
                    "with policy_isolation='process' commands must be picklable plain values",
                )
            )


class PolicyProcess:
    """One child process evaluating ``policy``, call by call; killed when a call times out.

    Started at construction (so its start-up overlaps training); :meth:`evaluate` waits for it to be
    ready (up to ``start_timeout_s``, not counted against the call's timeout).
    """

    def __init__(self, policy: Any, *, start_timeout_s: float = START_TIMEOUT_S):
        self.policy = policy
        self.start_timeout_s = start_timeout_s
        self._context = multiprocessing.get_context("spawn")
        self.process: Any = None
        self.pid: int | None = None
        self._conn: Any = None
        self.starts = 0
        self.start()

    def start(self) -> None:
        """Starts a fresh child (the previous one must be stopped)."""
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_serve, args=(child, self.policy, os.getpid()), name="tolaria-policy", daemon=True
        )
        try:
            process.start()  # pickles the policy for the child
        except Exception as exc:
            parent.close()
            child.close()
            raise PolicyIsolationError(
                f"policy_isolation='process' runs the policy in a child process, so the policy must be picklable "
                f"(an instance of a class defined at module level): {type(exc).__name__}: {exc}"
            ) from exc
        child.close()
        self.process, self._conn, self.pid = process, parent, None
        self.starts += 1

    def _await_ready(self) -> IsolatedResult | None:
        if self.pid is not None:
            return None
        if not self._conn.poll(self.start_timeout_s):
            pid = self.process.pid
            self.kill()
            self.start()
            return IsolatedResult(
                "died",
                error=f"failed: the policy process (pid {pid}) was not ready within {self.start_timeout_s:g} s; "
                "it was killed",
                pid=pid,
            )
        try:
            _, self.pid = self._conn.recv()
        except (EOFError, OSError):
            return self._died("before it was ready (could its module be imported in a fresh interpreter?)")
        return None

    def _died(self, when: str) -> IsolatedResult:
        self.process.join(_STOP_JOIN_S)
        pid, code = self.process.pid, self.process.exitcode
        self._conn.close()
        self.start()  # the next call gets a fresh process
        return IsolatedResult(
            "died", error=f"failed: the policy process (pid {pid}) exited with code {code} {when}", pid=pid
        )

    def evaluate(self, state: Any, timeout_s: float) -> IsolatedResult:
        """Runs ``policy.evaluate(state)`` in the child; kills it if it has not answered in ``timeout_s``."""
        not_ready = self._await_ready()
        if not_ready is not None:
            return not_ready
        try:
            self._conn.send(state)
        except (BrokenPipeError, EOFError, OSError):
            return self._died("before the call")
        except Exception as exc:
            return IsolatedResult(
                "raised",
                error=f"failed: the state cannot be sent to the policy process ({type(exc).__name__}: {exc}); "
                "with policy_isolation='process' it must be picklable",
                pid=self.pid,
            )
        if not self._conn.poll(timeout_s):
            pid = self.pid
            self.kill()
            self.start()  # the replacement starts now, off the next call's path
            return IsolatedResult(
                "timeout", error=f"did not return within {timeout_s:g} s; its process (pid {pid}) was killed", pid=pid
            )
        try:
            kind, payload = self._conn.recv()
        except (EOFError, OSError):
            return self._died("during the call")
        if kind == "ok":
            return IsolatedResult("ok", value=payload, pid=self.pid)
        return IsolatedResult("raised", error=payload, pid=self.pid)

    def kill(self) -> None:
        """SIGKILLs the child and reaps it (its pid is gone when this returns)."""
        self.process.kill()
        self.process.join(_STOP_JOIN_S)
        self._conn.close()

    def close(self) -> None:
        """Asks the child to exit; kills it if it does not (a hung call never blocks shutdown)."""
        if self.process is None:
            return
        try:
            self._conn.send(None)
            asked = self.pid is not None  # a child still starting up is not listening yet
        except (OSError, ValueError):  # the pipe is broken: the child is gone, or killed below
            asked = False
        self.process.join(_STOP_JOIN_S if asked else 0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(_STOP_JOIN_S)
        self._conn.close()
        self.process = None
