"""Hung control calls are stopped, not leaked: a cancellation token for cooperative calls, and a
policy process killed on a timeout (issue 18, defect 8)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from tolaria.telemetry import MemorySink, TelemetryEmitter
from tolaria.trainer import Trainer, TrainerConfig
from tolaria.trainer.isolation import CancellationToken, PolicyIsolationError, accepts_cancel
from tolaria.trainer.mediator import ControlMediator, ControlState

from .helpers import make_problem


def _state(epoch: int = 0) -> ControlState:
    return ControlState(
        epoch=epoch,
        step=epoch,
        losses={"a": 1.0},
        metrics={},
        lr=(0.1,),
        conflict_rate=None,
        emergency_level="NONE",
        conservative=False,
        elapsed_s=0.0,
    )


def _wait_until(predicate, limit_s: float = 10.0) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class _CooperativeExecutor:
    """Blocks until cancelled (as a long apply that checks its token would), then returns."""

    def __init__(self) -> None:
        self.saw_cancel: list[str | None] = []
        self.thread: threading.Thread | None = None

    def apply(self, command, cancel):
        self.thread = threading.current_thread()
        cancel.wait(60)
        self.saw_cancel.append(cancel.reason if cancel.cancelled else None)
        return "stopped"


class _CooperativePolicy:
    def evaluate(self, state, *, cancel):
        cancel.wait(60)
        cancel.raise_if_cancelled()
        return []


# Module level: a policy run in a child process is pickled by reference to this module.
class ScriptedPolicy:
    """Epoch 0: hangs (never looks at any token); 1: raises; 2: a command that cannot be pickled; 3: none."""

    def evaluate(self, state):
        if state.epoch == 0:
            time.sleep(3600)
        if state.epoch == 1:
            raise ValueError(f"no decision at epoch {state.epoch}")
        return [threading.Lock()] if state.epoch == 2 else []


class _RaisingPolicy:
    def evaluate(self, state):
        raise ValueError(f"no decision at epoch {state.epoch}")


@pytest.fixture
def sink():
    return MemorySink()


def test_which_callables_take_the_token():
    assert accepts_cancel(_CooperativeExecutor().apply)
    assert accepts_cancel(_CooperativePolicy().evaluate)
    assert not accepts_cancel(ScriptedPolicy().evaluate)
    assert not accepts_cancel(lambda state, **kw: None)  # only a declared ``cancel`` is passed
    assert not accepts_cancel(print)  # no signature to read: the plain call
    token = CancellationToken()
    assert not token.cancelled and not token.wait(0)
    token.cancel("first")
    token.cancel("second")
    assert token.is_set() and token.reason == "first"


@pytest.mark.timeout(30)
def test_a_cooperative_hung_executor_sees_its_token_and_its_thread_ends(sink):
    executor = _CooperativeExecutor()

    class OneCommand:
        def evaluate(self, state):
            return ["graft"]

    mediator = ControlMediator(
        OneCommand(), executor, timeout_s=0.2, recovery_calls=0, telemetry=TelemetryEmitter([sink], batch_size=1)
    )
    report = mediator.consult(_state())
    assert report.failures and "did not return within 0.2 s" in report.failures[0]
    assert "cancel token is set" in report.failures[0]
    assert _wait_until(lambda: mediator.abandoned_alive == 0)  # the thread ended: nothing leaked
    assert executor.saw_cancel == ["executor.apply timed out after 0.2 s"]
    assert executor.thread is not None and not executor.thread.is_alive()
    [finished] = sink.of_kind("control.abandoned_call_finished")
    assert finished["cooperative"] is True and finished["call"] == "executor.apply"
    mediator.close()
    assert not sink.of_kind("control.hung_at_shutdown")


@pytest.mark.timeout(30)
def test_a_cooperative_hung_policy_raises_when_cancelled(sink):
    mediator = ControlMediator(_CooperativePolicy(), timeout_s=0.2, telemetry=TelemetryEmitter([sink], batch_size=1))
    assert mediator.consult(_state()).failures
    assert _wait_until(lambda: mediator.abandoned_alive == 0)
    [finished] = sink.of_kind("control.abandoned_call_finished")
    assert finished["error"].startswith("CallCancelled: policy.evaluate timed out")
    mediator.close()


def test_an_unpicklable_policy_is_refused_at_construction():
    class Local:  # a local class cannot be pickled by reference
        def evaluate(self, state):
            return []

    with pytest.raises(PolicyIsolationError, match="must be picklable"):
        ControlMediator(Local(), policy_isolation="process")
    with pytest.raises(ValueError, match="policy_isolation"):
        ControlMediator(Local(), policy_isolation="fiber")


@pytest.mark.timeout(120)
def test_a_hung_isolated_policy_is_killed_and_the_run_goes_on(tmp_path, sink):
    # The same raising policy in-process: its failure must read the same from the child.
    with ControlMediator(_RaisingPolicy(), timeout_s=5) as inprocess:
        [expected_error] = inprocess.consult(_state(1)).failures

    model, optimizer, batches, loss = make_problem()
    config = TrainerConfig(
        epochs=4,
        device="cpu",
        run_dir=str(tmp_path),
        control_timeout_s=0.5,
        control_policy_isolation="process",
        control_failure_threshold=10,
    )
    trainer = Trainer(
        model, optimizer, batches, loss, config, policy=ScriptedPolicy(), telemetry=TelemetryEmitter([sink])
    )
    process = trainer.mediator.policy_process
    assert process is not None
    summary = trainer.fit()

    assert summary.status == "completed" and summary.epochs == 4
    assert summary.control_failures == 3  # the hang, the raise, the unpicklable command
    [killed] = sink.of_kind("control.policy_timeout")
    assert "its process (pid" in killed["message"] and "was killed" in killed["message"]
    with pytest.raises(ProcessLookupError):  # killed and reaped: no process is left hanging
        os.kill(killed["pid"], 0)
    [timeout, raised, unsendable] = sink.of_kind("control.timeout") + sink.of_kind("control.error")
    assert timeout["call"] == "policy.evaluate" and raised["message"] == expected_error
    assert "cannot be sent to the trainer process" in unsendable["message"] and "picklable" in unsendable["message"]
    # As for an in-process timeout: conservative mode, then recovery once calls succeed again.
    assert sink.of_kind("control.conservative") and sink.of_kind("control.recovered")
    assert "control calls failing: policy.evaluate did not return" in sink.of_kind("emergency.escalated")[0]["message"]
    assert process.starts == 2 and process.process is None  # one replacement; closed with the trainer
