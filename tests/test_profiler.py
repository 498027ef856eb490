"""Bounded profiler: bounded windows, distinct traces, loud but non-fatal failures, up-front config errors."""

import json
import logging

import pytest
import torch
from torch import nn

from tolaria.profiler import (
    BoundedProfiler,
    DisabledProfiler,
    ProfilerConfig,
    ProfilerConfigError,
    build_profiler,
)
from tolaria.telemetry import MemorySink, TelemetryEmitter


def _telemetry():
    sink = MemorySink()
    return TelemetryEmitter(sinks=[sink], batch_size=1, attributes={"run_id": "run42"}), sink


def _train(profiler, epochs, steps, first_step=0):
    """A tiny training loop wired the way the trainer wires the profiler."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    done = 0
    windows = []
    for epoch in range(epochs):
        with profiler.epoch(epoch, first_step=first_step + epoch * steps) as prof:
            for _ in range(steps):
                opt.zero_grad()
                model(torch.randn(3, 4)).pow(2).sum().backward()
                opt.step()
                prof.step()
                done += 1
        windows.append(prof)
    return done, windows


def test_two_profiled_epochs_leave_two_distinct_traces(tmp_path):
    telemetry, sink = _telemetry()
    profiler = BoundedProfiler(tmp_path / "traces", wait=1, warmup=1, active_steps=2, telemetry=telemetry)
    done, windows = _train(profiler, epochs=2, steps=6)

    assert done == 12
    files = sorted((tmp_path / "traces").iterdir())
    assert len(files) == 2 and len(set(files)) == 2 and profiler.traces == [w.traces[0] for w in windows]
    for epoch, path in enumerate(profiler.traces):
        # Window closes after wait + warmup + active = 4 steps of the epoch; names carry global steps.
        assert path.name.startswith(f"run42-epoch{epoch:05d}-step{epoch * 6 + 4:07d}-")
        assert path.name.endswith(".pt.trace.json")
        json.loads(path.read_text())  # a complete Chrome trace
    assert telemetry.counters["profiler.traces"] == 2
    assert [r["epoch"] for r in sink.of_kind("profiler.trace")] == [0, 1]
    assert not sink.of_kind("profiler.failure")


def test_active_steps_bounds_what_is_recorded(tmp_path):
    profiler = BoundedProfiler(tmp_path, wait=1, warmup=1, active_steps=2, repeat=2, telemetry=_telemetry()[0])

    with profiler.epoch(0) as prof:
        for step in range(12):
            with torch.profiler.record_function(f"train_step_{step}"):
                torch.ones(8).sum()
            prof.step()

    assert len(prof.traces) == 2  # repeat=2 windows, then nothing more however long the epoch
    recorded = []
    for path in prof.traces:
        names = {e.get("name") for e in json.loads(path.read_text())["traceEvents"]}
        recorded.append(sorted(int(n.rsplit("_", 1)[1]) for n in names if n and n.startswith("train_step_")))
    # schedule(wait=1, warmup=1, active=2): steps 2-3 recorded, then 6-7.
    assert recorded == [[2, 3], [6, 7]]


def test_trace_names_never_collide(tmp_path):
    profiler = BoundedProfiler(tmp_path, wait=0, warmup=1, active_steps=1, telemetry=_telemetry()[0], run_id="same")
    paths = [profiler._reserve_trace_path(epoch=3, step=5) for _ in range(3)]
    assert len(set(paths)) == 3 and all(p.exists() for p in paths)


def test_enabled_without_trace_dir_raises_up_front():
    with pytest.raises(ProfilerConfigError, match="no trace_dir"):
        ProfilerConfig(enabled=True)
    with pytest.raises(ProfilerConfigError, match="trace directory"):
        BoundedProfiler(None)
    with pytest.raises(ProfilerConfigError, match="trace directory"):
        BoundedProfiler("")
    assert isinstance(ProfilerConfigError("x"), ValueError)


def test_bad_configuration_raises_up_front(tmp_path):
    with pytest.raises(ProfilerConfigError, match="active_steps must be an int >= 1"):
        ProfilerConfig(enabled=True, trace_dir=tmp_path, active_steps=0)
    with pytest.raises(ProfilerConfigError, match="repeat"):
        BoundedProfiler(tmp_path, repeat=0)
    with pytest.raises(ProfilerConfigError, match="run_id"):
        BoundedProfiler(tmp_path, run_id="../escape")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ProfilerConfigError, match="cannot create trace directory"):
        BoundedProfiler(blocker / "traces")


def test_build_profiler_follows_the_config(tmp_path):
    assert isinstance(build_profiler(ProfilerConfig()), DisabledProfiler)
    telemetry, _ = _telemetry()
    config = ProfilerConfig(enabled=True, trace_dir=tmp_path, active_steps=4, wait=0)
    profiler = build_profiler(config, telemetry=telemetry)
    assert isinstance(profiler, BoundedProfiler)
    assert (profiler.active_steps, profiler.wait, profiler.run_id) == (4, 0, "run42")
    done, windows = _train(DisabledProfiler(), epochs=1, steps=3)
    assert done == 3 and not windows[0].active and windows[0].steps == 3


@pytest.mark.parametrize("phase", ["start", "step", "export"])
def test_profiler_failure_is_reported_and_training_continues(tmp_path, monkeypatch, caplog, phase):
    def boom(*args, **kwargs):
        raise RuntimeError(f"injected {phase} failure")

    method = {"start": "start", "step": "step", "export": "export_chrome_trace"}[phase]
    monkeypatch.setattr(torch.profiler.profile, method, boom)
    telemetry, sink = _telemetry()
    profiler = BoundedProfiler(tmp_path, wait=0, warmup=1, active_steps=1, telemetry=telemetry)

    with caplog.at_level(logging.ERROR, logger="tolaria.profiler"):
        done, windows = _train(profiler, epochs=2, steps=4)

    assert done == 8  # the loop ran every step of every epoch
    assert all(w.failed and not w.active for w in windows)
    failures = sink.of_kind("profiler.failure")
    assert [(r["phase"], r["epoch"]) for r in failures] == [(phase, 0), (phase, 1)]
    assert all(r["severity"] == "error" and f"injected {phase} failure" in r["error"] for r in failures)
    assert telemetry.counters["profiler.failures"] == 2
    assert f"profiler {phase} failed in epoch 0" in caplog.text
    assert list(tmp_path.iterdir()) == []  # no empty or partial trace left behind
    assert [f["phase"] for f in profiler.failures] == [phase, phase]


def test_training_errors_are_not_swallowed(tmp_path):
    profiler = BoundedProfiler(tmp_path, wait=0, warmup=1, active_steps=2, telemetry=_telemetry()[0])
    with pytest.raises(ZeroDivisionError):
        with profiler.epoch(0) as prof:
            prof.step()
            raise ZeroDivisionError("a failure inside the window")
    assert not prof.active  # the profiler was stopped on the way out
    with profiler.epoch(1) as prof:  # and the next epoch can profile again
        for _ in range(3):
            prof.step()
    assert len(prof.traces) == 1


def test_short_epoch_is_reported(tmp_path):
    telemetry, sink = _telemetry()
    profiler = BoundedProfiler(tmp_path, wait=5, warmup=1, active_steps=2, telemetry=telemetry)
    with profiler.epoch(0) as prof:
        for _ in range(3):
            prof.step()
    assert prof.traces == [] and not prof.failed
    (record,) = sink.of_kind("profiler.no_trace")
    assert record["severity"] == "warning" and "3 steps" in record["message"]
