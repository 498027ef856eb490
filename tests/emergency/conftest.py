"""Fixtures for the emergency tests: unique signal names, removed afterwards whatever happened."""

import os
import uuid

import pytest

from .workers import SPAWN


@pytest.fixture
def signal_name():
    name = f"tolaria-test-{os.getpid()}-{uuid.uuid4().hex[:10]}"
    yield name
    # A test that failed half-way may leave its segment behind: remove it (Linux keeps them in /dev/shm).
    leftover = f"/dev/shm/{name}"
    if os.path.exists(leftover):
        os.unlink(leftover)


@pytest.fixture
def spawn():
    """The spawn multiprocessing context: children start clean, as separate programs would."""
    return SPAWN
