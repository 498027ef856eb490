"""SafetyGuard: skip, roll back after a streak, escalate, halt, epoch budgets."""

import pytest
import torch

from tolaria.emergency import EmergencyController, EmergencyLevel, LocalEmergencySignal
from tolaria.signals import SignalLayoutError
from tolaria.state import StateManager
from tolaria.telemetry import MemorySink, TelemetryEmitter
from tolaria.trainer.config import SafetyConfig
from tolaria.trainer.gradient import SourceStats
from tolaria.trainer.safety import HALT, ROLLED_BACK, SKIP, STEP, SafetyGuard

from .helpers import make_problem


def stats(finite=True):
    loss = 1.0 if finite else float("nan")
    return SourceStats(
        names=("a", "b"),
        losses=(loss, 1.0),
        weights=(1.0, 1.0),
        norms=(1.0, 1.0),
        shares=(0.5, 0.5),
        conflicts=0,
        cosine=((1.0, 0.0), (0.0, 1.0)),
        grad_norm=1.0,
        finite=finite,
    )


@pytest.fixture
def env(tmp_path):
    sink = MemorySink()
    telemetry = TelemetryEmitter([sink], batch_size=1)
    state = StateManager(tmp_path / "state", fast_cache_mb=16, keep_last=2, telemetry=telemetry)
    signal = LocalEmergencySignal()
    emergency = EmergencyController(signal=signal, telemetry=telemetry)
    model, optimizer, _, _ = make_problem()
    yield sink, telemetry, state, emergency, signal, model, optimizer
    state.close()


def guard(env, **cfg):
    sink, telemetry, state, emergency, *_ = env
    return SafetyGuard(SafetyConfig(**cfg), state, emergency, rollback_deadline_s=5.0, telemetry=telemetry)


def test_finite_steps_pass(env):
    g = guard(env)
    *_, model, optimizer = env
    assert g.check_step(stats(), 0, model, optimizer).action == STEP
    assert g.skipped_steps == 0


def test_streak_skips_then_rolls_back_to_the_snapshot(env):
    sink, _, state, emergency, _, model, optimizer = env
    g = guard(env, rollback_after=3)
    state.snapshot(5, model, optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # drift after the snapshot, to be undone
    assert g.check_step(stats(False), 7, model, optimizer).action == SKIP
    assert emergency.level == EmergencyLevel.NOTICE
    assert g.check_step(stats(False), 7, model, optimizer).action == SKIP
    verdict = g.check_step(stats(False), 7, model, optimizer)
    assert verdict.action == ROLLED_BACK and verdict.step == 5
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p, b, rtol=0, atol=0)
    assert emergency.level == EmergencyLevel.ELEVATED
    assert g.skipped_steps == 3 and g.rollbacks == 1 and g.streak == 0
    [event] = sink.of_kind("safety.rollback")
    assert event["ok"] and event["tier"] == "fast" and event["restored_step"] == 5
    assert len(sink.of_kind("safety.step_skipped")) == 3


def test_a_finite_step_resets_the_streak(env):
    *_, model, optimizer = env
    g = guard(env, rollback_after=2)
    g.check_step(stats(False), 1, model, optimizer)
    g.check_step(stats(True), 1, model, optimizer)
    assert g.check_step(stats(False), 2, model, optimizer).action == SKIP


def test_too_many_rollbacks_halt(env):
    sink, _, state, emergency, _, model, optimizer = env
    g = guard(env, rollback_after=1, max_rollbacks=1)
    state.snapshot(0, model, optimizer)
    assert g.check_step(stats(False), 3, model, optimizer).action == ROLLED_BACK
    verdict = g.check_step(stats(False), 3, model, optimizer)
    assert verdict.action == HALT and "max_rollbacks" in verdict.reason
    assert emergency.level == EmergencyLevel.HALT
    assert g.halt_reason() is not None


def test_failed_rollback_halts(env):
    sink, *_ = env
    *_, model, optimizer = env
    g = guard(env, rollback_after=1)  # no snapshot and no checkpoint: nothing to roll back to
    verdict = g.check_step(stats(False), 3, model, optimizer)
    assert verdict.action == HALT and "failed" in verdict.reason
    assert sink.of_kind("safety.rollback")[0]["severity"] == "critical"


def test_halt_from_the_signal(env):
    *_, signal, _, _ = env
    g = guard(env)
    assert g.halt_reason() is None
    signal.trigger(EmergencyLevel.HALT, "operator says stop")
    assert g.halt_reason() == "operator says stop"


def test_epoch_budget_breach_is_an_event(env):
    sink, *_ = env
    g = guard(env, epoch_time_budget_s=1.0)
    assert not g.check_epoch_time(0, 0.5)
    assert g.check_epoch_time(1, 2.5)
    [event] = sink.of_kind("safety.epoch_budget")
    assert event["elapsed_s"] == 2.5 and event["budget_s"] == 1.0


def test_clean_epoch_lowers_the_level_it_raised(env):
    _, _, state, emergency, _, model, optimizer = env
    g = guard(env, rollback_after=5)
    g.check_step(stats(False), 1, model, optimizer)
    g.end_epoch(0)  # the epoch had an incident: level stays
    assert emergency.level == EmergencyLevel.NOTICE
    g.end_epoch(1)
    assert emergency.level == EmergencyLevel.NONE


def test_a_level_raised_by_someone_else_is_left_alone(env):
    _, _, _, emergency, *_ = env
    g = guard(env)
    emergency.escalate(EmergencyLevel.ELEVATED, "someone else")
    g.end_epoch(0)
    assert emergency.level == EmergencyLevel.ELEVATED


@pytest.mark.parametrize("error", [SignalLayoutError("bad reason length"), RuntimeError("record stuck mid-write")])
def test_an_unreadable_signal_halts_at_the_step_boundary_loudly(env, monkeypatch, error):
    sink, _, _, emergency, *_ = env
    g = guard(env)
    assert g.halt_reason() is None

    def unreadable(_self):
        raise error

    monkeypatch.setattr(type(emergency), "level", property(unreadable))
    reason = g.halt_reason()
    assert reason is not None and "emergency signal unreadable" in reason and str(error) in reason
    assert [r["kind"] for r in sink.records if r.get("kind") == "safety.signal_unreadable"]
