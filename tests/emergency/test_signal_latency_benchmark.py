"""benchmarks/signal_latency.py's own behaviour (not its timings): every method's waiter is woken by
its own signal once per round, and the latencies it reports are real trigger-to-wake intervals."""

import importlib
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    # On sys.path, not loaded from a file: spawned waiters import the module by name.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("signal_latency")


def exit_at_once(*args):
    raise SystemExit(3)


def test_every_method_wakes_once_per_round(bench):
    rounds = bench.WARMUP + 8
    started = time.monotonic()
    latencies = bench.measure(["signal", "event", "poll"], rounds, seed=1)
    elapsed_us = (time.monotonic() - started) * 1e6
    assert set(latencies) == {"signal", "event", "poll"}
    for method, values in latencies.items():
        assert len(values) == 8, method
        # A wake is measured from the writer's stamp to the waiter's: positive, and inside the run.
        assert all(0 < v < elapsed_us for v in values), (method, values)


def test_a_dead_waiter_is_reported_not_waited_for(bench, monkeypatch):
    monkeypatch.setattr(bench, "_waiter", exit_at_once)
    with pytest.raises(RuntimeError, match="signal waiter stopped answering before round 1"):
        bench.measure(["signal"], bench.WARMUP + 1, seed=0)


def test_percentile_is_nearest_rank(bench):
    values = list(range(1, 101))
    assert bench.percentile(values, 50) == 50
    assert bench.percentile(values, 99) == 99
    assert bench.percentile(values, 100) == 100
    assert bench.percentile([7.0], 99) == 7.0
