"""Learning-rate schedules and the :class:`LRController` that applies them.

Time. Every schedule here is a closed-form function of the **global optimizer step**: the number of
optimizer steps already taken in the whole run (0 before the first step), never a per-epoch counter
that resets. ``LRController.apply(step)`` sets the LR that optimizer step number ``step`` will use,
so after ``k`` calls of a ``torch.optim.lr_scheduler`` scheduler's ``step()`` the torch LR equals
``apply(k)``. Because the LR is a pure function of the step, resuming needs only the step (and the
base LRs, kept in :meth:`LRController.state_dict`), and nothing drifts from repeated updates.

Epoch-based schedules take ``steps_per_epoch``: the schedule's clock then reads the epoch index
``step // steps_per_epoch`` instead of the step, and every duration (``t_max``, ``step_size``,
``restarts``, ``warmup_steps``) counts epochs. That is what a torch scheduler stepped once per epoch
gives, sampled at every optimizer step.

Per-group base LRs. Each param group's LR is computed from that group's own base LR (its
``initial_lr`` if it has one, as torch schedulers leave it, else its ``lr`` at construction), so a
multi-group optimizer keeps its ratios. ``eta_min`` is an absolute LR, as in ``CosineAnnealingLR``.

Warmup composes with the main schedule like ``torch.optim.lr_scheduler.SequentialLR`` with
``schedulers=[LinearLR(start_factor=warmup_start_factor, total_iters=warmup_steps), main]`` and
``milestones=[warmup_steps]``: for ``t < warmup_steps`` the LR is
``base * (warmup_start_factor + (1 - warmup_start_factor) * t / warmup_steps)``; from then on it is
``main(t - warmup_steps)``, so the main schedule starts from its own beginning (at the base LR) when
warmup ends and, e.g., a cosine reaches ``eta_min`` at ``t = warmup_steps + t_max``. No floor is
applied anywhere.

Configuration. :class:`LRConfig` is the ``[lr]`` section of a run configuration (validated like
every ``TrainerConfig`` section); its :meth:`LRConfig.controller_kwargs` are ``build_controller``'s
keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from . import lr_schedules
from ._validation import Section, check_bound, check_int, check_interval
from .lr_schedules import (
    ConstantSchedule,
    CosineRestartsSchedule,
    CosineSchedule,
    LinearSchedule,
    Schedule,
    StepSchedule,
    WarmupSchedule,
)
from .optim import OptimizerManager
from .telemetry import TelemetryEmitter, emitter_or_default

POLICIES = ("constant", "cosine", "step", "linear")


def _group_lr(group: dict[str, Any], index: int, key: str = "lr") -> float:
    if key not in group:
        raise ValueError(
            f"optimizer param group {index} has no {key!r}; an LR controller needs every group's LR "
            f"(keys present: {sorted(k for k in group if k != 'params')})"
        )
    value = group[key]
    return float(value.item() if isinstance(value, torch.Tensor) else value)


class LRController:
    """Sets every param group's LR from one schedule, as a function of the global optimizer step.

    Args:
        optimizer: the optimizer whose groups it drives, or an
            :class:`~tolaria.optim.OptimizerManager`: the controller then follows the manager's live
            optimizer and re-attaches by itself after every rebuild. Every group must have an ``lr``
            (``ValueError`` otherwise, at construction). Base LRs are each group's ``initial_lr``
            when present (left by a torch scheduler or an earlier controller), else its ``lr``;
            ``initial_lr`` is then set on the group, as torch schedulers do, so it travels with the
            optimizer's own ``state_dict``.
        schedule: a closed-form schedule (see :func:`build_controller`).
        steps_per_epoch: when given, the schedule's clock is ``step // steps_per_epoch`` (epoch-based
            schedule; durations count epochs). Otherwise the clock is the step.
        telemetry: emitter for construction/resume/attach events.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | OptimizerManager,
        schedule: Schedule,
        *,
        steps_per_epoch: int | None = None,
        telemetry: TelemetryEmitter | None = None,
    ):
        if steps_per_epoch is not None:
            check_int("steps_per_epoch", steps_per_epoch, 1)
        self.schedule = schedule
        self.steps_per_epoch = steps_per_epoch
        self.telemetry = emitter_or_default(telemetry)
        self.last_step: int | None = None
        self.manager = optimizer if isinstance(optimizer, OptimizerManager) else None
        self.optimizer = optimizer.optimizer if isinstance(optimizer, OptimizerManager) else optimizer
        self.base_lrs: list[float] = self._capture_base_lrs(self.optimizer)
        self.telemetry.event(
            "lr.controller", message="LR controller built", config=self.config(), base_lrs=list(self.base_lrs)
        )

    @staticmethod
    def _capture_base_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
        groups = optimizer.param_groups
        # Every group needs an 'lr' (it is what apply() sets), whatever its base comes from.
        current = [_group_lr(g, i) for i, g in enumerate(groups)]
        bases = [
            _group_lr(g, i, "initial_lr") if "initial_lr" in g else lr for i, (g, lr) in enumerate(zip(groups, current))
        ]
        for group, base in zip(groups, bases):
            group.setdefault("initial_lr", base)
        return bases

    def config(self) -> dict[str, Any]:
        """The schedule and clock, as plain data (compared on :meth:`load_state_dict`)."""
        return {"schedule": self.schedule.config(), "steps_per_epoch": self.steps_per_epoch}

    def clock(self, step: int) -> int:
        """The schedule's time at global step ``step``: the step, or its epoch index."""
        check_int("step", step, 0)
        return step if self.steps_per_epoch is None else step // self.steps_per_epoch

    def lr_at(self, step: int) -> list[float]:
        """The LRs (one per group) for global step ``step``, without touching the optimizer."""
        t = self.clock(step)
        return [self.schedule.lr(base, t) for base in self.base_lrs]

    def _follow_manager(self) -> None:
        if self.manager is not None and self.manager.optimizer is not self.optimizer:
            self.attach(self.manager.optimizer)

    def apply(self, step: int) -> list[float]:
        """Sets each group's LR for global optimizer step ``step`` and returns the LRs set."""
        self._follow_manager()
        groups = self.optimizer.param_groups
        if len(groups) != len(self.base_lrs):
            raise ValueError(
                f"optimizer has {len(groups)} param groups but the LR controller knows {len(self.base_lrs)}; "
                "call attach(optimizer) after the optimizer is rebuilt, or build the controller on its OptimizerManager"
            )
        lrs = self.lr_at(step)
        for group, lr in zip(groups, lrs):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)  # tensor LRs (capturable/fused) are updated in place
            else:
                group["lr"] = lr
        self.last_step = step
        return lrs

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Drives ``optimizer`` instead (e.g. after ``OptimizerManager.rebuild``).

        Groups carrying ``initial_lr`` keep that base LR; new groups take their current ``lr``.
        """
        self.base_lrs = self._capture_base_lrs(optimizer)
        self.optimizer = optimizer
        self.telemetry.event(
            "lr.attach", message="LR controller attached to a new optimizer", base_lrs=list(self.base_lrs)
        )

    def get_last_lr(self) -> list[float]:
        """The LRs set by the last :meth:`apply` (``ValueError`` before the first)."""
        if self.last_step is None:
            raise ValueError("apply(step) has not been called yet")
        return self.lr_at(self.last_step)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: base LRs, last step applied, and the configuration."""
        return {"base_lrs": list(self.base_lrs), "last_step": self.last_step, "config": self.config()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores base LRs and last step, and re-applies the LR of that step if there is one.

        Raises ``ValueError`` if the saved schedule differs from this controller's, or the number
        of base LRs differs from the optimizer's number of groups.
        """
        missing = {"base_lrs", "last_step", "config"} - set(state_dict)
        if missing:
            raise ValueError(f"LR controller state_dict is missing {sorted(missing)}")
        if state_dict["config"] != self.config():
            raise ValueError(
                f"LR controller state was saved for {state_dict['config']}, but this controller is {self.config()}"
            )
        self._follow_manager()
        base_lrs = [float(b) for b in state_dict["base_lrs"]]
        if len(base_lrs) != len(self.optimizer.param_groups):
            raise ValueError(
                f"LR controller state has {len(base_lrs)} base LRs but the optimizer has "
                f"{len(self.optimizer.param_groups)} param groups"
            )
        self.base_lrs = base_lrs
        for group, base in zip(self.optimizer.param_groups, base_lrs):
            group["initial_lr"] = base
        self.last_step = None
        if state_dict["last_step"] is not None:
            self.apply(int(state_dict["last_step"]))
        self.telemetry.event("lr.resume", message="LR controller state loaded", last_step=self.last_step)


def build_controller(
    optimizer: torch.optim.Optimizer | OptimizerManager,
    policy: str,
    *,
    t_max: int | None = None,
    eta_min: float = 0.0,
    step_size: int | None = None,
    gamma: float = 0.1,
    warmup_steps: int = 0,
    warmup_start_factor: float = 1.0 / 3.0,
    restarts: int | None = None,
    t_mult: int = 1,
    start_factor: float = 1.0,
    end_factor: float = 0.0,
    steps_per_epoch: int | None = None,
    telemetry: TelemetryEmitter | None = None,
) -> LRController:
    """Builds an :class:`LRController` for a named policy (``optimizer`` may be an ``OptimizerManager``).

    Policies (``t`` is the clock: the global step, or the epoch with ``steps_per_epoch``):

    - ``constant``: the base LR.
    - ``cosine``: ``CosineAnnealingLR(T_max=t_max, eta_min=eta_min)``, followed past ``t_max``; or,
      with ``restarts=T_0``, ``CosineAnnealingWarmRestarts(T_0=restarts, T_mult=t_mult,
      eta_min=eta_min)`` (then ``t_max`` must not be given).
    - ``step``: ``StepLR(step_size=step_size, gamma=gamma)``.
    - ``linear``: ``LinearLR(start_factor=start_factor, end_factor=end_factor, total_iters=t_max)``.

    ``warmup_steps > 0`` puts a ``LinearLR(start_factor=warmup_start_factor, total_iters=warmup_steps)``
    warmup in front, composed as ``SequentialLR`` does (see the module docstring). An unknown policy,
    a missing required argument or an argument the policy does not use raises ``ValueError``.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown LR policy {policy!r}; valid policies are {', '.join(POLICIES)}")
    unused = []
    if t_max is not None and policy not in ("cosine", "linear"):
        unused.append("t_max")
    if step_size is not None and policy != "step":
        unused.append("step_size")
    if restarts is not None and policy != "cosine":
        unused.append("restarts")
    if t_mult != 1 and restarts is None:
        unused.append("t_mult (only used with restarts)")
    if eta_min != 0.0 and policy != "cosine":
        unused.append("eta_min")
    if (start_factor != 1.0 or end_factor != 0.0) and policy != "linear":
        unused.append("start_factor/end_factor")
    if warmup_start_factor != 1.0 / 3.0 and warmup_steps == 0:
        unused.append("warmup_start_factor (only used with warmup_steps > 0)")
    if unused:
        raise ValueError(f"LR policy {policy!r} does not use {', '.join(unused)}; remove it or pick another policy")

    main: Schedule
    if policy == "constant":
        main = ConstantSchedule()
    elif policy == "cosine":
        if restarts is not None:
            if t_max is not None:
                raise ValueError(
                    "LR policy 'cosine' takes either t_max (one annealing, CosineAnnealingLR) or "
                    "restarts=T_0 (SGDR, CosineAnnealingWarmRestarts), not both"
                )
            main = CosineRestartsSchedule(t_0=restarts, t_mult=t_mult, eta_min=eta_min)
        elif t_max is None:
            raise ValueError("LR policy 'cosine' needs t_max (or restarts=T_0 for SGDR warm restarts)")
        else:
            main = CosineSchedule(t_max=t_max, eta_min=eta_min)
    elif policy == "step":
        if step_size is None:
            raise ValueError("LR policy 'step' needs step_size")
        main = StepSchedule(step_size=step_size, gamma=gamma)
    else:
        if t_max is None:
            raise ValueError("LR policy 'linear' needs t_max (the steps over which the factor moves)")
        main = LinearSchedule(total_iters=t_max, start_factor=start_factor, end_factor=end_factor)

    check_int("warmup_steps", warmup_steps, 0)
    schedule: Schedule = main
    if warmup_steps > 0:
        schedule = WarmupSchedule(main=main, warmup_steps=warmup_steps, start_factor=warmup_start_factor)
    return LRController(optimizer, schedule, steps_per_epoch=steps_per_epoch, telemetry=telemetry)


@dataclass
class LRConfig(Section):
    """The learning-rate policy, applied by ``tolaria.lr.build_controller`` at every optimizer step.

    The base LR is the optimizer's own ``lr`` (per param group). Options left at ``None`` are not
    passed, so ``build_controller`` applies its own defaults and rejects options a policy does not use.

    Attributes:
        policy: ``"constant"`` (default), ``"cosine"``, ``"step"`` or ``"linear"``.
        warmup_steps: linear warmup steps before the policy starts (default 0).
        warmup_start_factor: LR factor at the first warmup step (default: ``build_controller``'s, 1/3).
        t_max: length of the cosine/linear schedule in steps (default: the run's total steps, when
            the data has a length or ``max_steps`` is set, minus the warmup).
        eta_min: floor LR of the cosine (default 0.0).
        step_size, gamma: for ``"step"``: multiply the LR by ``gamma`` every ``step_size`` steps.
        restarts, t_mult: for ``"cosine"``: SGDR restarts with period ``restarts`` growing by ``t_mult``.
        start_factor, end_factor: for ``"linear"``: LR factors at the start and end.
    """

    # The [lr] table of a run configuration (``tolaria.trainer.TrainerConfig.lr``): its fields are
    # build_controller's keywords, so they are declared here, beside it, and nowhere else.
    policy: Literal["constant", "cosine", "step", "linear"] = "constant"
    warmup_steps: int = 0
    warmup_start_factor: float | None = None
    t_max: int | None = None
    eta_min: float | None = None
    step_size: int | None = None
    gamma: float | None = None
    restarts: int | None = None
    t_mult: int | None = None
    start_factor: float | None = None
    end_factor: float | None = None

    def __post_init__(self) -> None:
        self._check_types("lr.")
        check_bound("lr.", "warmup_steps", self.warmup_steps, allow_zero=True)
        # The schedules' own bounds, checked here too so that a bad [lr] table fails as the config
        # loads (naming the key), not when the trainer builds its controller.
        for name in ("t_max", "step_size", "restarts", "t_mult", "gamma"):
            check_bound("lr.", name, getattr(self, name))
        check_bound("lr.", "eta_min", self.eta_min, allow_zero=True)
        check_interval("lr.", "warmup_start_factor", self.warmup_start_factor, 0.0, 1.0, low_open=True)
        check_interval("lr.", "start_factor", self.start_factor, 0.0, 1.0)
        check_interval("lr.", "end_factor", self.end_factor, 0.0, 1.0)

    def controller_kwargs(self) -> dict[str, Any]:
        """The options given (not ``None``), as keyword arguments of ``build_controller``."""
        return {
            k: v
            for k, v in self.to_dict().items()
            if k != "policy" and v is not None and not (k == "warmup_steps" and v == 0)
        }


__all__ = [
    "POLICIES",
    *lr_schedules.__all__,  # re-exported: the schedules' home before they had a module of their own
    "LRController",
    "LRConfig",
    "build_controller",
]
