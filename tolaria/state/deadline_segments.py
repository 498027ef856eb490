"""The state manager's shared-memory deadline segments: made when first needed, removed at exit,
and reclaimed from processes that died without removing theirs.

A ``StateManager`` names its segment ``tolaria-deadline-<pid>-<n>``. A process that crashes, is
killed, or never calls ``close()`` would leave it in ``/dev/shm`` for good; so the segment is created
only when a rollback first arms a deadline (or someone asks for it), a finaliser unlinks it when the
manager is collected or the interpreter exits, and every creation first removes the segments of
this prefix whose creator process no longer exists (only the current user's).
"""

from __future__ import annotations

import itertools
import logging
import os
import weakref
from collections.abc import Callable
from pathlib import Path

from tolaria.signals import SharedDeadlineSignal

__all__ = ["PREFIX", "SHM_DIR", "create_deadline_signal", "reclaim_dead_segments"]

log = logging.getLogger(__name__)

PREFIX = "tolaria-deadline-"
SHM_DIR = Path("/dev/shm")  # where Linux keeps POSIX shared-memory names
_names = itertools.count()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def reclaim_dead_segments(shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlinks this user's ``tolaria-deadline-<pid>-<n>`` segments whose process is gone; returns
    their names. Nothing happens where there is no ``/dev/shm`` (the names live elsewhere there)."""
    if not shm_dir.is_dir():
        return []
    reclaimed = []
    for path in shm_dir.glob(PREFIX + "*"):
        pid_text = path.name[len(PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _alive(int(pid_text)):
            continue
        try:
            if path.stat().st_uid != os.getuid():
                continue
            path.unlink()
        except FileNotFoundError:  # another process reclaimed it first
            continue
        except OSError as exc:
            log.warning("could not reclaim the stale deadline segment %s: %s", path.name, exc)
            continue
        reclaimed.append(path.name)
    if reclaimed:
        log.info("reclaimed %d deadline segment(s) of dead processes: %s", len(reclaimed), ", ".join(reclaimed))
    return reclaimed


def _unlink_at_exit(signal: SharedDeadlineSignal) -> None:
    if not signal.closed:
        signal.close()
    try:
        signal.unlink()
    except FileNotFoundError:  # already unlinked (close() ran, or someone removed it)
        return


def create_deadline_signal(owner: object) -> tuple[SharedDeadlineSignal, Callable[[], None]]:
    """A new segment for ``owner`` (after reclaiming dead processes' ones), and the function that
    closes and unlinks it; that function also runs when ``owner`` is collected or at exit."""
    reclaim_dead_segments()
    signal = SharedDeadlineSignal.create(f"{PREFIX}{os.getpid()}-{next(_names)}")
    return signal, weakref.finalize(owner, _unlink_at_exit, signal)
