"""A check both signal kinds' tests share: closing a signal ends a thread waiting on it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["assert_close_ends_a_waiter"]


def assert_close_ends_a_waiter(sig: Any, close: Callable[[], None]) -> None:
    """A thread in ``sig.wait(30)`` returns with a ValueError saying the signal is closed once ``close()`` runs."""
    errors = []

    def wait():
        try:
            sig.wait(30.0)
        except ValueError as exc:
            errors.append(str(exc))

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.05)  # let it block (a close before the wait is another, also tested, path)
    close()
    waiter.join(10)
    assert not waiter.is_alive()
    assert len(errors) == 1 and "closed" in errors[0]
