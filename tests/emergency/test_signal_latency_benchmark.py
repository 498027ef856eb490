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
    wakes = bench.measure(["signal", "event", "poll"], rounds, seed=1)
    elapsed_us = (time.monotonic() - started) * 1e6
    assert set(wakes) == {"signal", "event", "poll"}
    for method, w in wakes.items():
        assert len(w.latencies_us) == len(w.on_writer_cpu) == 8, method
        # A wake is measured from the writer's stamp to the waiter's: positive, and inside the run.
        assert all(0 < v < elapsed_us for v in w.latencies_us), (method, w.latencies_us)
        assert all(isinstance(same, bool) for same in w.on_writer_cpu), (method, w.on_writer_cpu)


def test_cpu_split_counts_every_wake_once(bench, capsys):
    wakes = {
        "signal": bench.Wakes([10.0, 20.0, 90.0], [True, True, False]),
        "event": bench.Wakes([50.0, 60.0], [False, False]),
        "poll": bench.Wakes([500.0], [True]),
    }
    bench.print_cpu_split(wakes)
    rows = {line.split("  ")[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert rows["SharedEmergencySignal (futex)"][-6:] == [
        "2",
        "10.0",
        "20.0",
        "1",
        "90.0",
        "90.0",
    ]  # nearest rank: p50 of two is the lower
    assert rows["multiprocessing.Event"][-6:] == ["0", "-", "-", "2", "50.0", "60.0"]
    assert rows["shared_memory flag, 1 ms poll"][-6:] == ["1", "500.0", "500.0", "0", "-", "-"]


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
