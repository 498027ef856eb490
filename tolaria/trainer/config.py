"""``TrainerConfig``: the typed, validated schema of a training run.

A config is plain dataclasses: top-level run settings plus one section per concern
(``checkpoint``, ``lr``, ``profiler``, ``telemetry``, ``safety``). It is built in Python, from a
dict (:meth:`TrainerConfig.from_dict`) or from a TOML file (:meth:`TrainerConfig.from_toml`).
Every value is checked on construction; an unknown key (including the prototype's legacy keys such
as ``tolaria_agg_per_layer_enabled``) raises :class:`ConfigError` listing the valid keys. There is
no compatibility layer for old names.

Example TOML::

    epochs = 5
    device = "cpu"
    aggregator = "pcgrad"
    control_timeout_s = 2.0

    [aggregator_options]
    reduction = "mean"

    [checkpoint]
    snapshot_every_steps = 50

    [lr]
    policy = "cosine"
    warmup_steps = 20

    [telemetry]
    log_every_steps = 10
    rate_limits = { "safety.step_skipped" = 5.0 }
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DEVICES_HELP = '"auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N"'
AMP_MODES = ("auto", "bf16", "off")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key and what was expected."""


# ---- validation helpers ----------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"table of {_type_name(k)} -> {_type_name(v)}"
    return getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the annotation ``tp`` (the small set of types configs use)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        return isinstance(value, Mapping) and all(_matches(k, key_tp) and _matches(v, val_tp) for k, v in value.items())
    if isinstance(tp, type):
        return isinstance(value, tp)
    raise TypeError(f"config annotation {tp!r} is not supported by the validator")


def _coerce(value: Any, tp: Any) -> Any:
    """Ints are accepted where floats are expected (TOML writes ``2`` for 2.0); dicts are copied."""
    if tp is float or (typing.get_origin(tp) in (typing.Union, types.UnionType) and float in typing.get_args(tp)):
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


class _Section:
    """Shared machinery of every config dataclass: type checks, ``from_dict``, ``to_dict``."""

    def _check_types(self, where: str) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            tp = hints[f.name]
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, tp):
                    raise ConfigError(f"{where}{f.name} must be a {tp.__name__} (a table), got {type(value).__name__}")
                continue
            if not _matches(value, tp):
                raise ConfigError(f"{where}{f.name} must be {_type_name(tp)}, got {value!r}")
            object.__setattr__(self, f.name, _coerce(value, tp))

    @classmethod
    def valid_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = ""):
        """Builds the section from a mapping; unknown keys raise :class:`ConfigError` listing valid ones."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where.rstrip('.') or 'config'} must be a table, got {type(data).__name__}")
        valid = cls.valid_keys()
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ConfigError(
                f"unknown config key{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(where + k for k in unknown)}; valid keys{' in [' + where.rstrip('.') + ']' if where else ''} "
                f"are: {', '.join(valid)}"
            )
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            tp = hints[key]
            if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
                value = tp.from_dict(value, where=f"{where}{key}.")
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            if where and not str(exc).startswith(where):
                raise ConfigError(f"{where}{exc}") from None
            raise

    def to_dict(self) -> dict[str, Any]:
        """The section as plain data (TOML/JSON-ready)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]


def _positive(where: str, name: str, value: float | int | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where}{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


# ---- sections --------------------------------------------------------------------------------


@dataclass
class CheckpointConfig(_Section):
    """Snapshots (fast tier, in memory) and durable checkpoints (disk), through ``StateManager``.

    Attributes:
        snapshot_every_steps: fast-tier snapshot cadence in optimizer steps (default 50). One is
            always taken before the first step; rollbacks return to the newest snapshot. 0 keeps only
            that first one.
        checkpoint_every_epochs: durable checkpoint cadence in epochs (default 1). 0 writes only the
            final checkpoint (taken at the end of every run, halted runs included).
        keep_last: durable checkpoints kept on disk (default 3).
        fast_cache_mb: memory bound of the fast tier in MiB (default 512).
        rollback_deadline_s: a rollback that cannot finish within this many seconds fails and leaves
            the model untouched (default 5.0).
        resume: restore the newest verifying checkpoint of the run folder before training (default
            False). Training continues with the epoch after the checkpoint's (or the interrupted one).
    """

    snapshot_every_steps: int = 50
    checkpoint_every_epochs: int = 1
    keep_last: int = 3
    fast_cache_mb: float = 512.0
    rollback_deadline_s: float = 5.0
    resume: bool = False

    def __post_init__(self) -> None:
        self._check_types("checkpoint.")
        _positive("checkpoint.", "snapshot_every_steps", self.snapshot_every_steps, allow_zero=True)
        _positive("checkpoint.", "checkpoint_every_epochs", self.checkpoint_every_epochs, allow_zero=True)
        _positive("checkpoint.", "keep_last", self.keep_last)
        _positive("checkpoint.", "fast_cache_mb", self.fast_cache_mb)
        _positive("checkpoint.", "rollback_deadline_s", self.rollback_deadline_s)


@dataclass
class LRConfig(_Section):
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
        _positive("lr.", "warmup_steps", self.warmup_steps, allow_zero=True)

    def controller_kwargs(self) -> dict[str, Any]:
        """The options given (not ``None``), as keyword arguments of ``build_controller``."""
        return {k: v for k, v in self.to_dict().items() if k != "policy" and v is not None and not (k == "warmup_steps" and v == 0)}


@dataclass
class ProfilerConfig(_Section):
    """Bounded ``torch.profiler`` windows (``tolaria.profiler``), one session per epoch; off by default.

    Attributes:
        enabled: profile the run (default False).
        trace_dir: folder for the traces (default: ``<run_dir>/traces``).
        wait, warmup, active_steps, repeat: the per-epoch ``torch.profiler.schedule`` in steps
            (defaults 1, 1, 3, 1: ``tolaria.profiler``'s).
        record_shapes, profile_memory, with_stack: passed to ``torch.profiler.profile`` (default False).
    """

    enabled: bool = False
    trace_dir: str | None = None
    wait: int = 1
    warmup: int = 1
    active_steps: int = 3
    repeat: int = 1
    record_shapes: bool = False
    profile_memory: bool = False
    with_stack: bool = False

    def __post_init__(self) -> None:
        self._check_types("profiler.")
        for name in ("wait", "warmup"):
            _positive("profiler.", name, getattr(self, name), allow_zero=True)
        _positive("profiler.", "active_steps", self.active_steps)
        _positive("profiler.", "repeat", self.repeat)


@dataclass
class TelemetryConfig(_Section):
    """Where telemetry goes and how often; see ``tolaria.telemetry``.

    Attributes:
        jsonl: write ``telemetry.jsonl`` in the run folder (default True; ``tolaria report`` reads it).
        log_severity: lowest severity of the records also written to Python logging as JSON
            (default ``"off"``: components already log their own warnings and errors in words).
        tensorboard: also write TensorBoard event files to ``<run_dir>/tensorboard`` (default False;
            needs the ``tensorboard`` extra).
        log_every_steps: per-step metrics (losses, LR, per-source weights, norms, shares, conflicts,
            cosine matrix) every this many optimizer steps (default 10). Epoch summaries are always
            written.
        batch_size: records queued before a flush (default 64).
        rate_limits: records per second per kind for chatty kinds (default: 5/s for
            ``safety.step_skipped``). Records over a limit are folded into ``rate_limited`` summary
            records with their count; emergency records are never limited.
    """

    jsonl: bool = True
    log_severity: Literal["debug", "info", "warning", "error", "critical", "off"] = "off"
    tensorboard: bool = False
    log_every_steps: int = 10
    batch_size: int = 64
    rate_limits: dict[str, float] = field(default_factory=lambda: {"safety.step_skipped": 5.0})

    def __post_init__(self) -> None:
        self._check_types("telemetry.")
        _positive("telemetry.", "log_every_steps", self.log_every_steps)
        _positive("telemetry.", "batch_size", self.batch_size)
        for kind, rate in self.rate_limits.items():
            if rate <= 0:
                raise ConfigError(f"telemetry.rate_limits[{kind!r}] must be > 0, got {rate}")


@dataclass
class SafetyConfig(_Section):
    """What happens on non-finite values, emergencies and slow epochs.

    Attributes:
        rollback_after: consecutive non-finite steps (each one skipped) before a rollback to the
            newest snapshot (default 3).
        max_rollbacks: rollbacks allowed in one run; one more escalates to HALT (default 5).
        max_grad_norm: clip the aggregated gradient to this norm (default None: no clipping).
        epoch_time_budget_s: an epoch that takes longer is reported as a ``safety.epoch_budget``
            event (default None: no budget).
        emergency_signal: name of a ``SharedEmergencySignal`` to watch (and broadcast to) so that a
            HALT from another process stops this run (default None: a process-local signal only).
        halt_check_every_steps: how often the signals are read, in steps (default 1).
    """

    rollback_after: int = 3
    max_rollbacks: int = 5
    max_grad_norm: float | None = None
    epoch_time_budget_s: float | None = None
    emergency_signal: str | None = None
    halt_check_every_steps: int = 1

    def __post_init__(self) -> None:
        self._check_types("safety.")
        _positive("safety.", "rollback_after", self.rollback_after)
        _positive("safety.", "max_rollbacks", self.max_rollbacks, allow_zero=True)
        _positive("safety.", "max_grad_norm", self.max_grad_norm)
        _positive("safety.", "epoch_time_budget_s", self.epoch_time_budget_s)
        _positive("safety.", "halt_check_every_steps", self.halt_check_every_steps)
        if self.emergency_signal is not None and not self.emergency_signal:
            raise ConfigError("safety.emergency_signal must be a non-empty name or omitted")


@dataclass
class DistributedConfig(_Section):
    """Running on several processes (``torchrun --nproc-per-node N``); ignored in a single process.

    Attributes:
        emergency_check_every: the ranks agree on the highest emergency level (one 8-byte
            all-reduce) every this many steps, so HALT on any rank stops every rank at the next such
            step boundary (default 1: every step). Also agreed before every end-of-epoch halt check.
            On several ranks it replaces ``safety.halt_check_every_steps`` (a rank must not stop
            on its own signal between agreements, or the others would wait for it).
        bucket_mb: bucket size in MiB of the per-step all-reduce of the K x N gradient buffer
            (default 25.0).
        timeout_s: how long a collective waits for the other ranks before failing, when the trainer
            joins the process group itself (default 600.0). It must exceed the slowest thing one rank
            does while the others wait (rank 0's checkpoint write, an evaluation).
    """

    emergency_check_every: int = 1
    bucket_mb: float = 25.0
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        self._check_types("distributed.")
        _positive("distributed.", "emergency_check_every", self.emergency_check_every)
        _positive("distributed.", "bucket_mb", self.bucket_mb)
        _positive("distributed.", "timeout_s", self.timeout_s)


@dataclass
class TrainerConfig(_Section):
    """Everything a :class:`~tolaria.trainer.Trainer` run is configured by.

    Attributes:
        epochs: passes over the data (default 5).
        max_steps: stop after this many optimizer steps, whatever the epoch (default None).
        device: where the model runs: ``"auto"`` (default), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
            The model is moved there; batch inputs go to the model's device and the rest of the
            batch (targets) to the device of the model's outputs.
        seed: seeds torch's RNGs at the start of ``fit`` (default 0; None leaves them alone).
        aggregator: how gradient sources are combined (default ``"pcgrad"``); see
            ``tolaria.aggregation``.
        aggregator_options: keyword arguments of the aggregator (default none).
        control_timeout_s: per-call timeout of ``policy.evaluate`` and ``executor.apply`` (default 5.0).
        control_every_steps: also consult the policy every this many steps (default 0: only at
            epoch ends).
        control_failure_threshold: consecutive control failures that open the circuit breaker
            (default 3).
        control_cooldown_s: how long an open breaker refuses calls before one probe (default 30.0).
        control_recovery_calls: successful calls whose commands are withheld before conservative
            mode ends (default 1).
        control_max_abandoned: hung control workers that may be abandoned and replaced; with more
            still hung, control calls are refused (reported) until one finishes (default 2).
        amp: ``"auto"`` (default: bf16 autocast on CUDA, none on CPU), ``"bf16"`` (always) or ``"off"``.
        compile: run the model through ``torch.compile`` (default False).
        run_dir: folder for checkpoints, telemetry and traces (default None: ``./runs/<timestamp>``).
        progress: show a tqdm progress bar (default False; ``tolaria train`` turns it on).
        checkpoint, lr, profiler, telemetry, safety, distributed: the sections above.
    """

    epochs: int = 5
    max_steps: int | None = None
    device: str = "auto"
    seed: int | None = 0
    aggregator: str = "pcgrad"
    aggregator_options: dict[str, Any] = field(default_factory=dict)
    control_timeout_s: float = 5.0
    control_every_steps: int = 0
    control_failure_threshold: int = 3
    control_cooldown_s: float = 30.0
    control_recovery_calls: int = 1
    control_max_abandoned: int = 2
    amp: Literal["auto", "bf16", "off"] = "auto"
    compile: bool = False
    run_dir: str | None = None
    progress: bool = False
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.aggregator, str):
            raise ConfigError(
                f"aggregator must be a name, got {type(self.aggregator).__name__}; to train with an aggregator "
                "instance, pass it to the trainer: Trainer(..., aggregator=instance)"
            )
        self._check_types("")
        _positive("", "epochs", self.epochs)
        _positive("", "max_steps", self.max_steps)
        _positive("", "control_timeout_s", self.control_timeout_s)
        _positive("", "control_every_steps", self.control_every_steps, allow_zero=True)
        _positive("", "control_failure_threshold", self.control_failure_threshold)
        _positive("", "control_cooldown_s", self.control_cooldown_s, allow_zero=True)
        _positive("", "control_recovery_calls", self.control_recovery_calls, allow_zero=True)
        _positive("", "control_max_abandoned", self.control_max_abandoned, allow_zero=True)
        _check_device(self.device)
        if not self.aggregator:
            raise ConfigError("aggregator must be a non-empty name")

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainerConfig:
        """Reads a TOML file (see the module docstring); errors name the file and the key."""
        path = Path(path)
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def replace(self, **changes: Any) -> TrainerConfig:
        """A copy with top-level fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _check_device(device: str) -> None:
    if device in ("auto", "cpu", "cuda"):
        return
    if device.startswith("cuda:") and device[5:].isdigit():
        return
    raise ConfigError(f"device must be {DEVICES_HELP}, got {device!r}")


__all__ = [
    "ConfigError",
    "CheckpointConfig",
    "DistributedConfig",
    "LRConfig",
    "ProfilerConfig",
    "SafetyConfig",
    "TelemetryConfig",
    "TrainerConfig",
]
