"""OptimizerManager: rebuilds keep groups, settings and state by identity; the circuit breaker."""

import copy
import logging

import pytest
import torch
from torch import nn

from tolaria.optim import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, OptimizerManager, RebuildResult
from tolaria.telemetry import MemorySink, TelemetryEmitter


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _emitter():
    sink = MemorySink()
    return TelemetryEmitter(sinks=[sink], batch_size=1), sink


def _param(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64))


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


OPTIMIZERS = {
    "adamw": (
        lambda groups: torch.optim.AdamW(groups, lr=0.02, weight_decay=0.05, betas=(0.8, 0.95)),
        ("exp_avg", "exp_avg_sq", "step"),
    ),
    "sgd_momentum": (
        lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True),
        ("momentum_buffer",),
    ),
}


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_rebuild_keeps_groups_settings_and_state_and_steps_like_a_reference(kind):
    make, state_keys = OPTIMIZERS[kind]
    a, b, c, d, e = (_param(n, seed) for seed, n in enumerate((5, 3, 4, 6, 2)))
    opt = make(
        [
            {"params": [a, b], "lr": 0.01, "weight_decay": 0.1, "name": "body", "layer_decay": 0.7},
            {"params": [c], "lr": 0.001, "name": "head"},
        ]
    )
    for step in range(3):
        _grads([a, b, c], seed=10 + step)
        opt.step()
    old_state = {p: dict(opt.state[p]) for p in (a, c)}
    old_settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    reference = copy.deepcopy(opt)  # same params (copied), same state, same settings
    ref_a, ref_b, ref_c = (p for g in reference.param_groups for p in g["params"])

    telemetry, _ = _emitter()
    manager = OptimizerManager(opt, telemetry=telemetry)
    result = manager.rebuild([a, c, d, e])  # b removed; d and e added

    assert result == RebuildResult(True, result.latency_ms, None, added=2, removed=1, kept=2, breaker_state=CLOSED)
    new = manager.optimizer
    assert new is not opt and type(new) is type(opt)
    assert [g["params"] for g in new.param_groups] == [[a], [c], [d, e]]
    for group, settings in zip(new.param_groups[:2], old_settings):
        assert {k: v for k, v in group.items() if k != "params"} == settings  # every key, custom keys too
    assert new.param_groups[2]["lr"] == opt.defaults["lr"] != 0.01
    assert {k: v for k, v in new.param_groups[2].items() if k != "params"} == opt.defaults
    for p in (a, c):
        for key in state_keys:
            assert new.state[p][key] is old_state[p][key], f"state {key!r} was not carried by identity"
    assert b not in new.state and d not in new.state

    # One step after the rebuild equals: the old optimizer stepping a and c (b has no gradient),
    # and a fresh optimizer with the defaults stepping d and e.
    _grads([a, c, d, e], seed=99)
    _grads([ref_a, ref_c], seed=99)
    fresh_d, fresh_e = d.detach().clone().requires_grad_(), e.detach().clone().requires_grad_()
    fresh_d.grad, fresh_e.grad = d.grad.clone(), e.grad.clone()
    fresh = make([fresh_d, fresh_e])
    ref_b_before = ref_b.detach().clone()
    new.step()
    reference.step()
    fresh.step()
    torch.testing.assert_close(a, ref_a, rtol=0, atol=0)
    torch.testing.assert_close(c, ref_c, rtol=0, atol=0)
    torch.testing.assert_close(d, fresh_d, rtol=0, atol=0)
    torch.testing.assert_close(e, fresh_e, rtol=0, atol=0)
    torch.testing.assert_close(ref_b, ref_b_before, rtol=0, atol=0)  # sanity: no grad, no move
    assert telemetry.counters["optim.rebuilds"] == 1


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_new_params_join_a_chosen_group_or_given_settings(kind):
    make, _ = OPTIMIZERS[kind]
    a, b, c = _param(3, 0), _param(3, 1), _param(2, 2)
    opt = make([{"params": [a], "lr": 0.01, "tag": "x"}, {"params": [b], "lr": 0.3, "tag": "y"}])
    manager = OptimizerManager(opt, telemetry=_emitter()[0])
    assert manager.rebuild([a, b, c], new_param_group=1).success
    groups = manager.optimizer.param_groups
    assert len(groups) == 2 and groups[1]["params"] == [b, c] and groups[1]["lr"] == 0.3 and groups[1]["tag"] == "y"

    d = _param(2, 3)
    assert manager.rebuild([a, b, c, d], new_param_group={"lr": 1e-4, "tag": "new"}).success
    groups = manager.optimizer.param_groups
    assert groups[2]["params"] == [d] and groups[2]["lr"] == 1e-4 and groups[2]["tag"] == "new"
    assert groups[2]["weight_decay"] == opt.defaults["weight_decay"]


def test_groups_keep_their_index_when_emptied():
    a, b = _param(2, 0), _param(2, 1)
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    manager = OptimizerManager(opt, telemetry=_emitter()[0])
    result = manager.rebuild([b])
    assert result.success and result.removed == 1 and result.added == 0
    groups = manager.optimizer.param_groups
    assert groups[0]["params"] == [] and groups[1]["params"] == [b] and groups[1]["lr"] == 0.5


def test_module_with_named_parameters_keeps_and_extends_names():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    opt = torch.optim.AdamW(model.named_parameters(), lr=0.01)
    model(torch.randn(5, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    exp_avg = opt.state[model[0].weight]["exp_avg"]

    model[2] = nn.Linear(4, 3).double()  # replaced head: two parameters out, two in
    manager = OptimizerManager(opt, telemetry=_emitter()[0])
    result = manager.rebuild(model)
    assert (result.success, result.added, result.removed, result.kept) == (True, 2, 2, 2)
    groups = manager.optimizer.param_groups
    assert groups[0]["param_names"] == ["0.weight", "0.bias"]
    assert groups[1]["param_names"] == ["2.weight", "2.bias"]
    assert manager.optimizer.state[model[0].weight]["exp_avg"] is exp_avg

    with pytest.raises(ValueError, match="need names"):
        manager.rebuild([*model.parameters(), _param(2, 9)])


def test_bad_arguments_raise():
    a = _param(2, 0)
    manager = OptimizerManager(torch.optim.SGD([a], lr=0.1), telemetry=_emitter()[0])
    with pytest.raises(ValueError, match="no parameters"):
        manager.rebuild([])
    with pytest.raises(ValueError, match="more than once"):
        manager.rebuild([a, a])
    with pytest.raises(TypeError, match="item 1"):
        manager.rebuild([a, 3.0])
    with pytest.raises(ValueError, match="not a group index"):
        manager.rebuild([a, _param(2, 1)], new_param_group=4)
    with pytest.raises(TypeError, match="not a single tensor"):
        manager.rebuild(a)
    with pytest.raises(ValueError, match="failure_threshold"):
        OptimizerManager(torch.optim.SGD([a], lr=0.1), failure_threshold=0)


class FlakyAdamW(torch.optim.AdamW):
    """AdamW whose load_state_dict fails while ``fail`` is set: a state that cannot be loaded."""

    fail = False

    def load_state_dict(self, state_dict):
        if FlakyAdamW.fail:
            raise ValueError("exp_avg has the wrong layout")
        super().load_state_dict(state_dict)


@pytest.fixture
def flaky():
    FlakyAdamW.fail = True
    yield
    FlakyAdamW.fail = False


def _stepped_flaky():
    a, b = _param(4, 0), _param(4, 1)
    opt = FlakyAdamW([a], lr=0.01)
    _grads([a], 0)
    opt.step()
    return opt, a, b


def test_state_that_fails_to_load_fails_the_rebuild_loudly(flaky, caplog):
    opt, a, b = _stepped_flaky()
    exp_avg = opt.state[a]["exp_avg"].clone()
    telemetry, sink = _emitter()
    manager = OptimizerManager(opt, telemetry=telemetry)
    with caplog.at_level(logging.ERROR, logger="tolaria.optim"):
        result = manager.rebuild([a, b])
    assert not result.success and not result.skipped
    assert "state failed to load" in result.error and "ValueError: exp_avg has the wrong layout" in result.error
    assert manager.optimizer is opt  # the old optimizer stays, with its state: never fresh state
    torch.testing.assert_close(opt.state[a]["exp_avg"], exp_avg)
    assert "exp_avg has the wrong layout" in caplog.text
    failures = sink.of_kind("optim.failure")
    assert failures and failures[0]["severity"] == "error" and "wrong layout" in failures[0]["message"]
    assert telemetry.counters["optim.failures"] == 1


def test_breaker_opens_skips_half_opens_and_closes(flaky):
    opt, a, b = _stepped_flaky()
    clock = FakeClock()
    telemetry, sink = _emitter()
    manager = OptimizerManager(opt, failure_threshold=2, cooldown_s=30.0, telemetry=telemetry, clock=clock)

    assert not manager.rebuild([a, b]).success
    assert manager.breaker_state == CLOSED
    second = manager.rebuild([a, b])
    assert not second.success and second.breaker_state == OPEN

    FlakyAdamW.fail = False
    skipped = manager.rebuild([a, b])
    assert skipped.skipped and not skipped.success and "circuit breaker open" in skipped.error
    assert "retry in 30.0s" in skipped.error
    assert manager.optimizer is opt

    clock.now += 29.9
    assert manager.rebuild([a, b]).skipped
    clock.now += 0.1
    assert manager.breaker_state == HALF_OPEN
    trial = manager.rebuild([a, b])
    assert trial.success and trial.added == 1 and manager.optimizer is not opt

    # The trial is provisional: a failure reported before the next rebuild reopens the breaker.
    manager.report_failure(RuntimeError("loss went NaN after the rebuild"))
    assert manager.breaker_state == OPEN
    assert manager.rebuild([a, b]).skipped

    clock.now += 30.0
    assert manager.rebuild([a, b]).success
    manager.report_success()
    assert manager.breaker_state == CLOSED

    assert manager.stats() == {
        "rebuilds": 2,
        "failures": 3,
        "skips": 3,
        "last_latency_ms": manager.last_latency_ms,
        "breaker_state": CLOSED,
        "consecutive_failures": 0,
        "generation": 2,
    }
    assert telemetry.counters == {"optim.failures": 3, "optim.skips": 3, "optim.rebuilds": 2}
    transitions = [(r["previous"], r["state"]) for r in sink.of_kind("optim.breaker")]
    assert transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    assert [r["value"] for r in sink.of_kind("optim.breaker_state")] == [s for _, s in transitions]
    assert len(sink.of_kind("optim.rebuild_latency_ms")) == 4  # two failed, two successful attempts
    assert any("loss went NaN" in r["message"] for r in sink.of_kind("optim.failure"))


def test_rebuild_then_fail_churn_opens_the_breaker():
    a = _param(3, 0)
    clock = FakeClock()
    manager = OptimizerManager(
        torch.optim.SGD([a], lr=0.1, momentum=0.9),
        failure_threshold=3,
        cooldown_s=5.0,
        telemetry=_emitter()[0],
        clock=clock,
    )
    for _ in range(3):
        assert manager.rebuild([a]).success  # every rebuild "succeeds"...
        manager.report_failure("step after rebuild raised")  # ...and the next step fails
    assert manager.breaker_state == OPEN
    assert manager.rebuild([a]).skipped


def test_success_confirmed_by_the_next_rebuild_resets_the_count():
    a = _param(3, 0)
    manager = OptimizerManager(torch.optim.SGD([a], lr=0.1), failure_threshold=2, telemetry=_emitter()[0])
    manager.report_failure("transient")
    assert manager.rebuild([a]).success  # provisional
    assert manager.breaker.consecutive_failures == 1
    assert manager.rebuild([a]).success  # confirms the previous one
    assert manager.breaker.consecutive_failures == 0
    manager.report_failure("once")
    assert manager.breaker_state == CLOSED


def test_optimizer_property_is_the_live_object():
    a = _param(3, 0)
    opt = torch.optim.SGD([a], lr=0.1)
    manager = OptimizerManager(opt, telemetry=_emitter()[0])
    assert manager.optimizer is opt
    manager.optimizer.param_groups[0]["lr"] = 0.7  # edits reach the managed optimizer
    assert opt.param_groups[0]["lr"] == 0.7


def test_circuit_breaker_alone():
    clock = FakeClock()
    seen = []
    breaker = CircuitBreaker(1, 10.0, clock=clock, on_transition=lambda o, n: seen.append((o, n)))
    assert breaker.allow()
    breaker.record_failure()
    assert not breaker.allow() and breaker.retry_in_s() == 10.0
    clock.now += 10.0
    assert breaker.allow() and breaker.state == HALF_OPEN
    breaker.record_failure()
    assert breaker.state == OPEN and breaker.retry_in_s() == 10.0
    clock.now += 10.0
    breaker.record_success()
    assert breaker.state == CLOSED and breaker.consecutive_failures == 0
    assert seen == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_lr_controller_follows_the_manager_across_rebuilds():
    from tolaria.lr import build_controller

    a, b, c = _param(3, 0), _param(3, 1), _param(3, 2)
    opt = torch.optim.AdamW([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}], lr=0.5)
    telemetry, _ = _emitter()
    manager = OptimizerManager(opt, telemetry=telemetry)
    ctl = build_controller(manager, "step", step_size=10, gamma=0.5, telemetry=telemetry)
    assert ctl.apply(5) == [0.1, 0.01]
    ctl.apply(15)  # groups now at half their base LR
    assert manager.rebuild([a, b, c]).success
    # Kept groups keep their base LR (initial_lr travels with the group); the new group's base is the default.
    assert ctl.apply(25) == pytest.approx([0.025, 0.0025, 0.125], rel=1e-12)
    assert ctl.optimizer is manager.optimizer
    assert [g["lr"] for g in manager.optimizer.param_groups] == ctl.get_last_lr()


def test_state_is_cast_when_a_parameter_changes_dtype():
    a = _param(4, 0)
    opt = torch.optim.AdamW([a], lr=0.01)
    _grads([a], 0)
    opt.step()
    exp_avg = opt.state[a]["exp_avg"]
    a.data = a.data.float()  # same Parameter object, new dtype
    manager = OptimizerManager(opt, telemetry=_emitter()[0])
    assert manager.rebuild([a]).success
    moved = manager.optimizer.state[a]["exp_avg"]
    assert moved.dtype == torch.float32
    torch.testing.assert_close(moved, exp_avg.float())
