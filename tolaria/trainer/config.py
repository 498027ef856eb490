"""``TrainerConfig``: the typed, validated schema of a training run.

A config is plain dataclasses: top-level run settings plus one section per concern
(``checkpoint``, ``lr``, ``profiler``, ``telemetry``, ``safety``). It is built in Python, from a
dict (:meth:`TrainerConfig.from_dict`) or from a TOML file (:meth:`TrainerConfig.from_toml`).
Every value is checked on construction; an unknown key (including the prototype's legacy keys such
as ``tolaria_agg_per_layer_enabled``) raises :class:`ConfigError` listing the valid keys. There is
no compatibility layer for old names.

A section that configures one component is declared by that component and composed here:
``lr`` is ``tolaria.lr.LRConfig``; ``profiler`` subclasses ``tolaria.profiler.ProfilerConfig``. The
validation machinery (type checks, ``from_dict``, ``to_dict``, :class:`ConfigError`) lives in
``tolaria._validation`` and applies to every dataclass section alike. All of them stay importable
from here.

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
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tolaria import profiler as _profiler
from tolaria._validation import ConfigError, Section, check_bound, check_interval, check_nonempty
from tolaria.lr import LRConfig
from tolaria.registry import SINKS

DEVICES_HELP = '"auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N"'
AMP_MODES = ("auto", "bf16", "off")

# The old private names, kept for modules that import them from here (trainer/tasks.py and others).
_Section = Section
_positive = check_bound


# ---- sections --------------------------------------------------------------------------------


@dataclass
class CheckpointConfig(Section):
    """Snapshots (fast tier, in memory) and durable checkpoints (disk), through ``StateManager``.

    Attributes:
        snapshot_every_steps: fast-tier snapshot cadence in optimizer steps (default 50). One is
            always taken before the first step; rollbacks return to the newest snapshot. 0 keeps only
            that first one.
        checkpoint_every_epochs: durable checkpoint cadence in epochs (default 1). 0 writes only the
            final checkpoint (taken at the end of every run, halted runs included).
        checkpoint_every_steps: also a durable checkpoint every this many optimizer steps, mid-epoch
            included (default 0: none), so a killed run loses at most that many steps.
        keep_last: durable checkpoints kept on disk (default 3).
        fast_cache_mb: memory bound of the fast tier in MiB (default 512).
        rollback_deadline_s: a rollback that cannot finish within this many seconds fails and leaves
            the model untouched (default 5.0).
        resume: restore the newest verifying checkpoint of the run folder before training (default
            False). Training continues where the checkpoint was taken: the next epoch, or the batch
            after the last one used of an interrupted epoch, with the random states of that moment
            (see ``tolaria.trainer.run_position``).
        on_failure: what a failed durable checkpoint (a full disk, an I/O error) does; every failure is
            a ``train.checkpoint_failed`` event and raises the emergency level to ELEVATED, and the
            previous checkpoints stay as they were. ``"retry"`` (default): the next checkpoint on the
            cadence is the retry; ``max_failures`` consecutive failures halt the run. ``"emit"``:
            report only, never halt. ``"halt"``: the first failure halts the run.
        max_failures: consecutive failed checkpoints that halt a ``"retry"`` run (default 3).
    """

    snapshot_every_steps: int = 50
    checkpoint_every_epochs: int = 1
    checkpoint_every_steps: int = 0
    keep_last: int = 3
    fast_cache_mb: float = 512.0
    rollback_deadline_s: float = 5.0
    resume: bool = False
    on_failure: Literal["emit", "retry", "halt"] = "retry"
    max_failures: int = 3

    def __post_init__(self) -> None:
        self._check_types("checkpoint.")
        check_bound("checkpoint.", "max_failures", self.max_failures)
        check_bound("checkpoint.", "snapshot_every_steps", self.snapshot_every_steps, allow_zero=True)
        check_bound("checkpoint.", "checkpoint_every_epochs", self.checkpoint_every_epochs, allow_zero=True)
        check_bound("checkpoint.", "checkpoint_every_steps", self.checkpoint_every_steps, allow_zero=True)
        check_bound("checkpoint.", "keep_last", self.keep_last)
        check_bound("checkpoint.", "fast_cache_mb", self.fast_cache_mb)
        check_bound("checkpoint.", "rollback_deadline_s", self.rollback_deadline_s)


@dataclass(frozen=True)  # frozen as its base is (a dataclass cannot thaw a frozen parent)
class ProfilerConfig(_profiler.ProfilerConfig, Section):
    """Bounded ``torch.profiler`` windows (``tolaria.profiler``), one session per epoch; off by default.

    The fields and defaults are ``tolaria.profiler.ProfilerConfig``'s (this is a subclass); the
    section checks them as every section does, and lets ``trace_dir`` default to the run folder.

    Attributes:
        enabled: profile the run (default False).
        trace_dir: folder for the traces (default: ``<run_dir>/traces``).
        wait, warmup, active_steps, repeat: the per-epoch ``torch.profiler.schedule`` in steps
            (defaults 1, 1, 3, 1: ``tolaria.profiler``'s).
        record_shapes, profile_memory, with_stack: passed to ``torch.profiler.profile`` (default False).
    """

    # Narrowed from str | Path: a section is plain TOML/JSON data (to_dict).
    trace_dir: str | None = None

    def __post_init__(self) -> None:
        # Replaces the base's checks: errors are ConfigErrors naming the key, and an enabled
        # section without trace_dir is valid (the trainer gives it <run_dir>/traces).
        self._check_types("profiler.")
        check_nonempty("profiler.", "trace_dir", self.trace_dir, "folder (default: <run_dir>/traces)")
        for name in ("wait", "warmup"):
            check_bound("profiler.", name, getattr(self, name), allow_zero=True)
        check_bound("profiler.", "active_steps", self.active_steps)
        check_bound("profiler.", "repeat", self.repeat)


@dataclass
class TelemetryConfig(Section):
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
        sinks: more sinks, by their names in ``tolaria.registry.SINKS`` (default none; ``"csv"``:
            ``metrics.csv`` in the run folder). A new sink is one module plus one line there.
    """

    jsonl: bool = True
    log_severity: Literal["debug", "info", "warning", "error", "critical", "off"] = "off"
    tensorboard: bool = False
    log_every_steps: int = 10
    batch_size: int = 64
    rate_limits: dict[str, float] = field(default_factory=lambda: {"safety.step_skipped": 5.0})
    sinks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self._check_types("telemetry.")
        unknown = [name for name in self.sinks if name not in SINKS]
        if unknown:
            raise ConfigError(f"telemetry.sinks: unknown sink {unknown[0]!r}; valid names are {', '.join(SINKS)}")
        check_bound("telemetry.", "log_every_steps", self.log_every_steps)
        check_bound("telemetry.", "batch_size", self.batch_size)
        for kind, rate in self.rate_limits.items():
            if rate <= 0:
                raise ConfigError(f"telemetry.rate_limits[{kind!r}] must be > 0, got {rate}")


@dataclass
class SafetyConfig(Section):
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
        check_bound("safety.", "rollback_after", self.rollback_after)
        check_bound("safety.", "max_rollbacks", self.max_rollbacks, allow_zero=True)
        check_bound("safety.", "max_grad_norm", self.max_grad_norm)
        check_bound("safety.", "epoch_time_budget_s", self.epoch_time_budget_s)
        check_bound("safety.", "halt_check_every_steps", self.halt_check_every_steps)
        if self.emergency_signal is not None and not self.emergency_signal:
            raise ConfigError("safety.emergency_signal must be a non-empty name or omitted")


@dataclass
class DistributedConfig(Section):
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
        sharding: how the K x N gradient buffer is spread over the ranks (default ``"none"``):
            ``"none"`` every rank holds and all-reduces all of it; ``"zero"`` a plain model, the
            buffer reduce-scattered by columns, each rank aggregates its shard (K N / W memory);
            ``"fsdp"`` the model is wrapped by FSDP2's ``fully_shard`` and rows hold the local
            gradient shards. With ``"zero"`` or ``"fsdp"`` checkpoints are written by every rank
            through ``torch.distributed.checkpoint`` (``tolaria.state.sharded_checkpoints``), and a
            run resumes on another world size. Ignored in a single process.
    """

    emergency_check_every: int = 1
    bucket_mb: float = 25.0
    timeout_s: float = 600.0
    sharding: Literal["none", "zero", "fsdp"] = "none"

    def __post_init__(self) -> None:
        self._check_types("distributed.")
        check_bound("distributed.", "emergency_check_every", self.emergency_check_every)
        check_bound("distributed.", "bucket_mb", self.bucket_mb)
        check_bound("distributed.", "timeout_s", self.timeout_s)


@dataclass
class TrainerConfig(Section):
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
        aggregation_mode: ``"buffer"`` (default: the K x N gradient buffer) or ``"low_memory"`` (the
            same update from the Gram matrix folded during one batched backward, never K x N; declined
            with a ``gradient.memory_mode`` event where it would not save memory; Gramian aggregators).
        aggregation_level: ``"params"`` (default) or ``"features"``: the sources' gradients taken at
            the shared trunk's output (an approximation, MGDA-UB / ``rep_grad``; needs ``shared``).
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
        control_policy_isolation: ``"thread"`` (default) or ``"process"``: the policy runs in a child
            process, killed when a call times out (the policy, its state and commands must be picklable).
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
    aggregation_mode: Literal["buffer", "low_memory"] = "buffer"
    aggregation_level: Literal["params", "features"] = "params"
    control_timeout_s: float = 5.0
    control_every_steps: int = 0
    control_failure_threshold: int = 3
    control_cooldown_s: float = 30.0
    control_recovery_calls: int = 1
    control_max_abandoned: int = 2
    control_policy_isolation: Literal["thread", "process"] = "thread"
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
        check_bound("", "epochs", self.epochs)
        check_bound("", "max_steps", self.max_steps)
        check_interval("", "seed", self.seed, -(2**63), 2**63 - 1)  # torch.manual_seed's, with room for seed + epoch
        check_nonempty("", "run_dir", self.run_dir, "folder (default: runs/<timestamp>)")
        check_bound("", "control_timeout_s", self.control_timeout_s)
        check_bound("", "control_every_steps", self.control_every_steps, allow_zero=True)
        check_bound("", "control_failure_threshold", self.control_failure_threshold)
        check_bound("", "control_cooldown_s", self.control_cooldown_s, allow_zero=True)
        check_bound("", "control_recovery_calls", self.control_recovery_calls, allow_zero=True)
        check_bound("", "control_max_abandoned", self.control_max_abandoned, allow_zero=True)
        _check_device(self.device)
        if self.aggregation_mode == "low_memory" and self.aggregation_level == "features":
            raise ConfigError('aggregation_mode = "low_memory" applies to aggregation_level = "params" only')
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
