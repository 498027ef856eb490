"""The learning-rate schedules: closed-form functions of the global optimizer step (or, with
``steps_per_epoch``, of the epoch index), one class each, as ``torch.optim.lr_scheduler``'s closed
forms. :mod:`tolaria.lr` applies them (``LRController``) and builds them from a policy name
(``build_controller``); see its docstring for the time base and how warmup composes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Protocol

from ._validation import check_finite, check_int

__all__ = [
    "Schedule",
    "ConstantSchedule",
    "CosineSchedule",
    "CosineRestartsSchedule",
    "StepSchedule",
    "LinearSchedule",
    "WarmupSchedule",
]


class Schedule(Protocol):
    """A closed-form LR schedule: ``lr(base_lr, t)`` for clock value ``t >= 0``."""

    name: ClassVar[str]

    def lr(self, base_lr: float, t: int) -> float: ...

    def config(self) -> dict[str, Any]: ...


class _FieldConfig:
    """``config()`` of a schedule whose fields are plain values: its name and its fields."""

    name: ClassVar[str]

    def config(self) -> dict[str, Any]:
        return {"schedule": self.name, **asdict(self)}  # type: ignore[call-overload]


@dataclass(frozen=True)
class ConstantSchedule(_FieldConfig):
    """The base LR at every step."""

    name: ClassVar[str] = "constant"

    def lr(self, base_lr: float, t: int) -> float:
        return base_lr


@dataclass(frozen=True)
class CosineSchedule(_FieldConfig):
    """``CosineAnnealingLR``'s closed form, at every ``t`` (past ``t_max`` too: no clamp, no flat tail).

    ``lr = eta_min + (base - eta_min) * (1 + cos(pi * t / t_max)) / 2``. Past ``t_max`` the cosine
    rises again with period ``2 * t_max``, exactly as PyTorch's scheduler does; use
    :class:`CosineRestartsSchedule` for SGDR-style jumps back to the base LR.
    """

    t_max: int
    eta_min: float = 0.0
    name: ClassVar[str] = "cosine"

    def __post_init__(self) -> None:
        check_int("t_max", self.t_max, 1)
        check_finite("eta_min", self.eta_min)

    def lr(self, base_lr: float, t: int) -> float:
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * t / self.t_max)) / 2


@dataclass(frozen=True)
class CosineRestartsSchedule(_FieldConfig):
    """SGDR (``CosineAnnealingWarmRestarts``): cosine cycles of length ``t_0``, ``t_0 * t_mult``, ...

    Each cycle starts again at the base LR. Cycle boundaries are found in integer arithmetic, so they
    fall exactly where PyTorch's step-by-step scheduler puts them.
    """

    t_0: int
    t_mult: int = 1
    eta_min: float = 0.0
    name: ClassVar[str] = "cosine_restarts"

    def __post_init__(self) -> None:
        check_int("restarts (T_0)", self.t_0, 1)
        check_int("t_mult", self.t_mult, 1)
        check_finite("eta_min", self.eta_min)

    def cycle(self, t: int) -> tuple[int, int]:
        """``(t_cur, t_i)``: position inside the current cycle and that cycle's length."""
        if self.t_mult == 1:
            return t % self.t_0, self.t_0
        start, length = 0, self.t_0
        while t >= start + length:  # cycles grow geometrically: O(log t) iterations
            start += length
            length *= self.t_mult
        return t - start, length

    def lr(self, base_lr: float, t: int) -> float:
        t_cur, t_i = self.cycle(t)
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2


@dataclass(frozen=True)
class StepSchedule(_FieldConfig):
    """``StepLR``: ``base * gamma ** (t // step_size)``."""

    step_size: int
    gamma: float = 0.1
    name: ClassVar[str] = "step"

    def __post_init__(self) -> None:
        check_int("step_size", self.step_size, 1)
        check_finite("gamma", self.gamma)

    def lr(self, base_lr: float, t: int) -> float:
        return base_lr * self.gamma ** (t // self.step_size)


@dataclass(frozen=True)
class LinearSchedule(_FieldConfig):
    """``LinearLR``: the factor goes linearly from ``start_factor`` to ``end_factor`` over
    ``total_iters`` and then stays at ``end_factor`` (that is the schedule's defined end, as in torch).
    """

    total_iters: int
    start_factor: float = 1.0
    end_factor: float = 0.0
    name: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        check_int("total_iters", self.total_iters, 1)
        check_finite("start_factor", self.start_factor)
        check_finite("end_factor", self.end_factor)
        if not 0.0 <= self.start_factor <= 1.0 or not 0.0 <= self.end_factor <= 1.0:
            raise ValueError(
                f"linear schedule factors must lie in [0, 1], got start_factor={self.start_factor}, "
                f"end_factor={self.end_factor}"
            )

    def lr(self, base_lr: float, t: int) -> float:
        frac = min(t, self.total_iters) / self.total_iters
        return base_lr * (self.start_factor + (self.end_factor - self.start_factor) * frac)


@dataclass(frozen=True)
class WarmupSchedule:
    """Linear warmup, then ``main`` from its own start (``SequentialLR`` semantics; see module doc).

    During warmup the factor is ``LinearLR(start_factor, end_factor=1, total_iters=warmup_steps)``'s:
    ``start_factor + (1 - start_factor) * t / warmup_steps``; from ``t = warmup_steps`` on the LR is
    ``main.lr(base, t - warmup_steps)``.
    """

    main: Schedule
    warmup_steps: int
    start_factor: float = 1.0 / 3.0
    name: ClassVar[str] = "warmup"

    def __post_init__(self) -> None:
        check_int("warmup_steps", self.warmup_steps, 1)
        check_finite("warmup_start_factor", self.start_factor)
        if not 0.0 < self.start_factor <= 1.0:
            # LinearLR's own bounds: a factor of 0 would make the first step a no-op.
            raise ValueError(f"warmup_start_factor must lie in (0, 1], got {self.start_factor}")

    def lr(self, base_lr: float, t: int) -> float:
        if t < self.warmup_steps:
            return base_lr * (self.start_factor + (1.0 - self.start_factor) * t / self.warmup_steps)
        return self.main.lr(base_lr, t - self.warmup_steps)

    def config(self) -> dict[str, Any]:
        return {
            "schedule": self.name,
            "warmup_steps": self.warmup_steps,
            "start_factor": self.start_factor,
            "main": self.main.config(),
        }
