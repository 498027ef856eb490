"""Fixtures shared by the state tests."""

from __future__ import annotations

import pytest

from tolaria.telemetry import MemorySink


@pytest.fixture
def sink() -> MemorySink:
    return MemorySink()
