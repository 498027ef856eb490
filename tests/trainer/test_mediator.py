"""The control mediator: timeouts on one long-lived worker, conservative mode, circuit breaker."""

import threading

import pytest

from tolaria.telemetry import MemorySink, TelemetryEmitter
from tolaria.trainer.mediator import ControlMediator, ControlState

TIMEOUT = 0.2


def state(epoch=0):
    return ControlState(
        epoch=epoch,
        step=10 * epoch,
        losses={"a": 1.0},
        metrics={},
        lr=(0.1,),
        conflict_rate=0.5,
        emergency_level="NONE",
        conservative=False,
        elapsed_s=1.0,
    )


class Policy:
    """Returns the commands it is given; hangs while ``hang`` is set (until ``release``), or raises."""

    def __init__(self, commands=("cmd",)):
        self.commands = list(commands)
        self.hang = False
        self.fail = False
        self.release = threading.Event()
        self.calls = 0
        self.threads = set()

    def evaluate(self, s):
        self.calls += 1
        self.threads.add(threading.get_ident())
        if self.hang:
            self.release.wait()
        if self.fail:
            raise RuntimeError("policy broke")
        return list(self.commands)


class Executor:
    def __init__(self, fail_on=None):
        self.applied = []
        self.fail_on = fail_on

    def apply(self, command):
        if command == self.fail_on:
            raise ValueError(f"cannot apply {command}")
        self.applied.append(command)
        return "ok"


@pytest.fixture
def sink():
    return MemorySink()


@pytest.fixture
def make(sink):
    made = []

    def build(policy, executor=None, **kw):
        kw.setdefault("timeout_s", TIMEOUT)
        m = ControlMediator(policy, executor, telemetry=TelemetryEmitter([sink], batch_size=1), **kw)
        made.append((m, policy))
        return m

    yield build
    for m, policy in made:
        policy.release.set()  # let hung test calls end so their threads exit
        m.close()


def test_commands_are_applied_on_one_long_lived_worker(make, sink):
    policy, executor = Policy(["x", "y"]), Executor()
    m = make(policy, executor)
    for epoch in range(3):
        report = m.consult(state(epoch))
        assert report.applied == ["x", "y"] and not report.failures
    assert executor.applied == ["x", "y"] * 3
    assert len(policy.threads) == 1 and threading.get_ident() not in policy.threads
    assert len(sink.of_kind("control.applied")) == 6


@pytest.mark.timeout(30)
def test_hung_policy_does_not_hold_the_caller(make, sink):
    policy, executor = Policy(), Executor()
    policy.hang = True  # blocks until released: only the timeout can return control to us
    m = make(policy, executor)
    report = m.consult(state())
    assert report.failures and "did not return within" in report.failures[0]
    assert report.conservative and m.conservative
    assert executor.applied == []
    [event] = sink.of_kind("control.timeout")
    assert event["severity"] == "error" and event["call"] == "policy.evaluate"
    assert m.abandoned_alive == 1


@pytest.mark.timeout(30)
def test_conservative_mode_withholds_until_calls_succeed(make, sink):
    policy, executor = Policy(["c"]), Executor()
    m = make(policy, executor, recovery_calls=1)
    policy.hang = True
    m.consult(state(0))
    policy.hang = False
    probe = m.consult(state(1))  # succeeds on a fresh worker; its commands are withheld
    assert probe.evaluated and probe.withheld == ["c"] and probe.applied == []
    assert not m.conservative
    normal = m.consult(state(2))
    assert normal.applied == ["c"]
    assert executor.applied == ["c"]
    assert sink.of_kind("control.withheld") and sink.of_kind("control.recovered")


def test_recovery_calls_zero_applies_the_first_successful_call(make):
    policy, executor = Policy(["c"]), Executor()
    m = make(policy, executor, recovery_calls=0)
    policy.fail = True
    m.consult(state(0))
    assert m.conservative
    policy.fail = False
    assert m.consult(state(1)).applied == ["c"]
    assert not m.conservative


def test_policy_error_is_reported_and_counts(make, sink):
    policy = Policy()
    policy.fail = True
    m = make(policy, Executor())
    report = m.consult(state())
    assert report.failures == ["policy.evaluate raised RuntimeError: policy broke"]
    assert sink.of_kind("control.error") and m.failures == 1 and m.conservative


def test_breaker_opens_after_threshold_and_skips(make, sink):
    policy = Policy()
    policy.fail = True
    m = make(policy, Executor(), failure_threshold=2, cooldown_s=3600.0)
    m.consult(state(0))
    m.consult(state(1))
    assert m.breaker.state == "open"
    calls = policy.calls
    report = m.consult(state(2))
    assert report.skipped and "circuit breaker open" in report.skipped
    assert policy.calls == calls  # not called at all
    assert sink.of_kind("control.skipped") and sink.of_kind("control.breaker")


def test_breaker_half_opens_after_cooldown(make):
    policy = Policy(["c"])
    policy.fail = True
    m = make(policy, Executor(), failure_threshold=1, cooldown_s=0.0, recovery_calls=0)
    m.consult(state(0))
    policy.fail = False
    assert m.consult(state(1)).applied == ["c"]  # cooldown 0: the probe goes through and closes it
    assert m.breaker.state == "closed"


def test_failed_apply_withholds_the_rest(make, sink):
    policy, executor = Policy(["a", "bad", "c"]), Executor(fail_on="bad")
    m = make(policy, executor)
    report = m.consult(state())
    assert report.applied == ["a"] and report.withheld == ["c"]
    assert "ValueError: cannot apply bad" in report.failures[0]
    assert m.conservative


def test_commands_without_executor_are_a_failure(make):
    m = make(Policy(["a"]), None)
    report = m.consult(state())
    assert report.failures and "no executor" in report.failures[0]


def test_non_iterable_result_is_an_error(make):
    class Bad(Policy):
        def evaluate(self, s):
            return 42

    report = make(Bad()).consult(state())
    assert "must return an iterable" in report.failures[0]


@pytest.mark.timeout(30)
def test_hung_workers_are_bounded_then_refused_then_resumed(make, sink):
    policy = Policy()
    policy.hang = True
    m = make(policy, Executor(), max_abandoned=1, failure_threshold=100)
    m.consult(state(0))  # worker 1 hangs
    m.consult(state(1))  # worker 2 (a replacement) hangs
    assert m.abandoned_alive == 2
    report = m.consult(state(2))  # a third would exceed the bound: refused without a call
    assert policy.calls == 2 and "refused" in report.failures[0]
    assert sink.of_kind("control.disabled")
    policy.release.set()
    policy.hang = False
    for _ in range(200):  # the hung calls return; their threads exit (no timing asserted)
        if m.abandoned_alive == 0:
            break
        threading.Event().wait(0.01)
    assert m.abandoned_alive == 0
    assert len(sink.of_kind("control.abandoned_call_finished")) == 2
    assert m.consult(state(3)).evaluated


@pytest.mark.timeout(30)
def test_close_does_not_wait_for_a_hung_call(make, sink):
    policy = Policy()
    policy.hang = True
    m = make(policy, Executor())
    m.consult(state())
    m.close()  # returns although the call is still blocked
    [event] = sink.of_kind("control.hung_at_shutdown")
    assert event["calls"] == ["policy.evaluate"]
    with pytest.raises(RuntimeError, match="closed"):
        m.call("x", lambda: None)


def test_bad_arguments():
    with pytest.raises(TypeError, match="evaluate"):
        ControlMediator(object())
    with pytest.raises(TypeError, match="apply"):
        ControlMediator(Policy(), object())
    with pytest.raises(ValueError, match="timeout_s"):
        ControlMediator(Policy(), timeout_s=0)
