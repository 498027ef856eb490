"""LR schedules against torch.optim.lr_scheduler, step by step (1e-12), and the controller's contract."""

import math

import pytest
import torch
from torch.optim import lr_scheduler as tls

from tolaria.lr import POLICIES, LRController, build_controller
from tolaria.telemetry import MemorySink, TelemetryEmitter

BASE_LRS = (0.1, 0.03, 0.5)  # three groups with different base LRs: ratios must survive


def _optimizer(base_lrs=BASE_LRS, cls=torch.optim.SGD, **kwargs):
    groups = [{"params": [torch.zeros(2, dtype=torch.float64, requires_grad=True)], "lr": lr} for lr in base_lrs]
    return cls(groups, **kwargs)


def _torch_lrs(make_scheduler, steps, base_lrs=BASE_LRS, steps_per_epoch=None):
    """LRs a torch scheduler gives at global steps 0..steps-1, on its own optimizer.

    Stepped once per optimizer step, or once per epoch when ``steps_per_epoch`` is given.
    """
    opt = _optimizer(base_lrs)
    sched = make_scheduler(opt)
    out = []
    for step in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()  # no gradients: a no-op, but keeps torch's "scheduler before optimizer" check quiet
        if steps_per_epoch is None or (step + 1) % steps_per_epoch == 0:
            sched.step()
    return out


def _ours(controller, steps):
    out = []
    for step in range(steps):
        returned = controller.apply(step)
        assert returned == [g["lr"] for g in controller.optimizer.param_groups]
        out.append(returned)
    return out


def _assert_same(ours, ref):
    assert len(ours) == len(ref)
    for step, (a, b) in enumerate(zip(ours, ref)):
        for group, (x, y) in enumerate(zip(a, b)):
            assert abs(x - y) <= 1e-12, f"step {step}, group {group}: ours {x!r} vs torch {y!r}"


def _quiet():
    return TelemetryEmitter(sinks=[MemorySink()])


@pytest.mark.parametrize("t_max,eta_min", [(1, 0.0), (7, 0.0), (10, 0.005), (25, 0.02)])
def test_cosine_matches_cosine_annealing_lr_past_t_max(t_max, eta_min):
    steps = 5 * t_max + 13  # several half-periods past t_max
    ours = _ours(build_controller(_optimizer(), "cosine", t_max=t_max, eta_min=eta_min, telemetry=_quiet()), steps)
    ref = _torch_lrs(lambda o: tls.CosineAnnealingLR(o, T_max=t_max, eta_min=eta_min), steps)
    _assert_same(ours, ref)


def test_cosine_has_no_flat_tail():
    ctl = build_controller(_optimizer(), "cosine", t_max=10, telemetry=_quiet())
    at_end, after = ctl.lr_at(10)[0], ctl.lr_at(11)[0]
    assert at_end == pytest.approx(0.0, abs=1e-15)
    assert after > at_end  # keeps following the cosine, as PyTorch does
    assert ctl.lr_at(20)[0] == pytest.approx(BASE_LRS[0], abs=1e-15)


@pytest.mark.parametrize("t_0,t_mult,eta_min", [(1, 1, 0.0), (5, 1, 0.001), (3, 2, 0.0), (4, 3, 0.01)])
def test_restarts_match_cosine_annealing_warm_restarts(t_0, t_mult, eta_min):
    steps = 200
    ctl = build_controller(_optimizer(), "cosine", restarts=t_0, t_mult=t_mult, eta_min=eta_min, telemetry=_quiet())
    ref = _torch_lrs(lambda o: tls.CosineAnnealingWarmRestarts(o, T_0=t_0, T_mult=t_mult, eta_min=eta_min), steps)
    _assert_same(_ours(ctl, steps), ref)


@pytest.mark.parametrize("step_size,gamma", [(1, 0.5), (7, 0.1), (30, 0.9)])
def test_step_matches_step_lr(step_size, gamma):
    steps = 120
    ctl = build_controller(_optimizer(), "step", step_size=step_size, gamma=gamma, telemetry=_quiet())
    _assert_same(_ours(ctl, steps), _torch_lrs(lambda o: tls.StepLR(o, step_size=step_size, gamma=gamma), steps))


@pytest.mark.parametrize("t_max,start_factor,end_factor", [(10, 1.0, 0.0), (33, 0.5, 0.1), (5, 0.2, 1.0)])
def test_linear_matches_linear_lr(t_max, start_factor, end_factor):
    steps = 3 * t_max
    ctl = build_controller(
        _optimizer(), "linear", t_max=t_max, start_factor=start_factor, end_factor=end_factor, telemetry=_quiet()
    )
    ref = _torch_lrs(
        lambda o: tls.LinearLR(o, start_factor=start_factor, end_factor=end_factor, total_iters=t_max), steps
    )
    _assert_same(_ours(ctl, steps), ref)


def test_constant_is_the_base_lr():
    steps = 50
    ctl = build_controller(_optimizer(), "constant", telemetry=_quiet())
    _assert_same(_ours(ctl, steps), _torch_lrs(lambda o: tls.LambdaLR(o, lambda _: 1.0), steps))


def _main_scheduler(policy):
    return {
        "constant": (dict(), lambda o: tls.LambdaLR(o, lambda _: 1.0)),
        "cosine": (dict(t_max=12, eta_min=0.001), lambda o: tls.CosineAnnealingLR(o, T_max=12, eta_min=0.001)),
        "restarts": (dict(restarts=4, t_mult=2), lambda o: tls.CosineAnnealingWarmRestarts(o, T_0=4, T_mult=2)),
        "step": (dict(step_size=6, gamma=0.5), lambda o: tls.StepLR(o, step_size=6, gamma=0.5)),
        "linear": (
            dict(t_max=9, end_factor=0.1),
            lambda o: tls.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=9),
        ),
    }[policy]


@pytest.mark.parametrize("policy", ["constant", "cosine", "restarts", "step", "linear"])
@pytest.mark.parametrize("warmup_steps,start_factor", [(1, 0.5), (5, 1.0 / 3.0), (8, 0.01)])
def test_warmup_matches_sequential_lr(policy, warmup_steps, start_factor):
    kwargs, make_main = _main_scheduler(policy)
    steps = 90
    ctl = build_controller(
        _optimizer(),
        "cosine" if policy == "restarts" else policy,
        warmup_steps=warmup_steps,
        warmup_start_factor=start_factor,
        telemetry=_quiet(),
        **kwargs,
    )

    def sequential(o):
        warm = tls.LinearLR(o, start_factor=start_factor, end_factor=1.0, total_iters=warmup_steps)
        return tls.SequentialLR(o, schedulers=[warm, make_main(o)], milestones=[warmup_steps])

    _assert_same(_ours(ctl, steps), _torch_lrs(sequential, steps))


def test_warmup_has_no_hidden_floor():
    ctl = build_controller(
        _optimizer((1e-5,)), "constant", warmup_steps=10, warmup_start_factor=1e-3, telemetry=_quiet()
    )
    assert ctl.apply(0) == [pytest.approx(1e-8, rel=1e-12)]
    assert ctl.apply(5) == [pytest.approx(1e-5 * (1e-3 + (1 - 1e-3) * 0.5), rel=1e-12)]
    assert ctl.apply(10) == [pytest.approx(1e-5, rel=1e-12)]


@pytest.mark.parametrize("warmup_steps", [0, 2])
def test_epoch_based_schedule_matches_torch_stepped_per_epoch(warmup_steps):
    steps_per_epoch, epochs = 7, 30
    ctl = build_controller(
        _optimizer(),
        "cosine",
        t_max=10,
        eta_min=0.001,
        warmup_steps=warmup_steps,
        steps_per_epoch=steps_per_epoch,
        telemetry=_quiet(),
    )

    def make(o):
        main = tls.CosineAnnealingLR(o, T_max=10, eta_min=0.001)
        if not warmup_steps:
            return main
        warm = tls.LinearLR(o, start_factor=1.0 / 3.0, total_iters=warmup_steps)
        return tls.SequentialLR(o, schedulers=[warm, main], milestones=[warmup_steps])

    ref = _torch_lrs(make, steps_per_epoch * epochs, steps_per_epoch=steps_per_epoch)
    _assert_same(_ours(ctl, steps_per_epoch * epochs), ref)
    assert ctl.clock(steps_per_epoch * 3 + 2) == 3


def test_multi_group_ratios_are_kept():
    ctl = build_controller(_optimizer(), "cosine", t_max=20, warmup_steps=3, telemetry=_quiet())
    for step in range(0, 40, 3):
        lrs = ctl.apply(step)
        for lr, base in zip(lrs, BASE_LRS):
            assert lr / base == pytest.approx(lrs[0] / BASE_LRS[0], rel=1e-12)


def test_group_without_lr_raises_at_construction():
    opt = _optimizer()
    del opt.param_groups[1]["lr"]
    with pytest.raises(ValueError, match="param group 1 has no 'lr'"):
        build_controller(opt, "constant", telemetry=_quiet())


def test_unknown_policy_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        build_controller(_optimizer(), "cosin", t_max=3)
    for policy in POLICIES:
        assert policy in str(info.value)


@pytest.mark.parametrize(
    "policy,kwargs,match",
    [
        ("cosine", {}, "needs t_max"),
        ("linear", {}, "needs t_max"),
        ("step", {}, "needs step_size"),
        ("cosine", {"t_max": 5, "restarts": 5}, "not both"),
        ("constant", {"t_max": 5}, "does not use t_max"),
        ("step", {"step_size": 2, "eta_min": 0.1}, "does not use eta_min"),
        ("cosine", {"t_max": 5, "t_mult": 2}, "t_mult"),
        ("cosine", {"t_max": 5, "warmup_start_factor": 0.1}, "warmup_start_factor"),
        ("cosine", {"t_max": 0}, "t_max must be >= 1"),
        ("cosine", {"t_max": 5, "warmup_steps": 2, "warmup_start_factor": 0.0}, r"must lie in \(0, 1\]"),
        ("step", {"step_size": 2.5}, "step_size must be an int"),
        ("cosine", {"t_max": 5, "steps_per_epoch": 0}, "steps_per_epoch must be >= 1"),
    ],
)
def test_misconfiguration_raises(policy, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_controller(_optimizer(), policy, telemetry=_quiet(), **kwargs)


def test_negative_step_raises():
    with pytest.raises(ValueError, match="step must be >= 0"):
        build_controller(_optimizer(), "constant", telemetry=_quiet()).apply(-1)


def test_resume_from_state_dict_continues_the_schedule():
    steps, cut = 80, 37
    reference = _ours(build_controller(_optimizer(), "cosine", t_max=30, warmup_steps=5, telemetry=_quiet()), steps)

    first = build_controller(_optimizer(), "cosine", t_max=30, warmup_steps=5, telemetry=_quiet())
    _ours(first, cut)
    saved = first.state_dict()

    # A fresh process: the optimizer's groups hold whatever LR they were saved or built with.
    fresh = _optimizer((9.0, 9.0, 9.0))
    sink = MemorySink()
    resumed = build_controller(fresh, "cosine", t_max=30, warmup_steps=5, telemetry=TelemetryEmitter(sinks=[sink]))
    resumed.load_state_dict(saved)
    assert resumed.base_lrs == list(BASE_LRS)
    assert resumed.last_step == cut - 1
    assert [g["lr"] for g in fresh.param_groups] == reference[cut - 1]
    _assert_same([resumed.apply(s) for s in range(cut, steps)], reference[cut:])
    resumed.telemetry.flush()
    assert sink.of_kind("lr.resume")


def test_load_state_dict_rejects_another_schedule():
    saved = build_controller(_optimizer(), "cosine", t_max=30, telemetry=_quiet()).state_dict()
    other = build_controller(_optimizer(), "cosine", t_max=31, telemetry=_quiet())
    with pytest.raises(ValueError, match="saved for"):
        other.load_state_dict(saved)
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"base_lrs": [0.1]})


def test_base_lrs_come_from_initial_lr_when_present():
    opt = _optimizer()
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
        group["lr"] = group["lr"] * 0.01  # decayed by an earlier run
    ctl = build_controller(opt, "constant", telemetry=_quiet())
    assert ctl.base_lrs == list(BASE_LRS)
    assert ctl.apply(3) == list(BASE_LRS)


def test_attach_after_a_group_is_added():
    opt = _optimizer()
    ctl = build_controller(opt, "step", step_size=2, gamma=0.5, telemetry=_quiet())
    ctl.apply(4)
    opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "lr": 1.0})
    with pytest.raises(ValueError, match="call attach"):
        ctl.apply(5)
    ctl.attach(opt)
    assert ctl.base_lrs == [*BASE_LRS, 1.0]
    assert ctl.apply(5) == pytest.approx([b * 0.25 for b in (*BASE_LRS, 1.0)], rel=1e-12)


def test_tensor_lr_is_updated_in_place():
    opt = _optimizer((0.1,), cls=torch.optim.Adam, lr=torch.tensor(0.1))
    opt.param_groups[0]["lr"] = torch.tensor(0.1, dtype=torch.float64)
    lr_tensor = opt.param_groups[0]["lr"]
    ctl = build_controller(opt, "cosine", t_max=4, telemetry=_quiet())
    ctl.apply(2)
    assert opt.param_groups[0]["lr"] is lr_tensor
    assert lr_tensor.item() == pytest.approx(0.05, abs=1e-12)


def test_get_last_lr_and_direct_controller():
    from tolaria.lr import StepSchedule

    ctl = LRController(_optimizer(), StepSchedule(step_size=3, gamma=0.1), telemetry=_quiet())
    with pytest.raises(ValueError, match="apply"):
        ctl.get_last_lr()
    ctl.apply(3)
    assert ctl.get_last_lr() == pytest.approx([b * 0.1 for b in BASE_LRS], rel=1e-12)
    assert math.isclose(ctl.lr_at(9)[2], 0.5 * 0.1**3, rel_tol=1e-12)
