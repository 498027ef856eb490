"""Bounded ``torch.profiler`` windows, one profiling session per epoch.

A :class:`BoundedProfiler` records at most ``repeat`` windows per epoch, each on the schedule
``torch.profiler.schedule(wait=wait, warmup=warmup, active=active_steps, repeat=repeat)``: it skips
``wait`` steps, warms up for ``warmup`` steps, then records exactly ``active_steps`` steps and writes
one Chrome trace. The schedule restarts at every epoch.

Trace files never overwrite one another: each name carries the run id, the epoch, the step at
which the window closed and a UTC timestamp (``{run_id}-epoch00003-step0000005-20250101T120000123456Z.pt.trace.json``),
and the file is reserved with an exclusive create before the profiler writes it.

Failures are loud but never stop training: if the profiler fails to start, step, stop or export,
the error is logged (``tolaria.profiler`` logger), emitted as a ``profiler.failure`` event and
counted (``profiler.failures``), that epoch's profiling ends, and the training loop carries on. An
exception raised by the training loop itself inside the ``epoch`` context is never swallowed.

Configuration errors are raised up front, in the constructor: enabling profiling without a trace
directory raises :class:`ProfilerConfigError`.

Typical wiring in a training loop::

    profiler = build_profiler(config.profiler, run_id=run_id, telemetry=telemetry)
    for epoch in range(epochs):
        with profiler.epoch(epoch, first_step=global_step) as prof:
            for batch in loader:
                train_step(batch)
                prof.step()
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.profiler

from ._validation import check_int
from .telemetry import TelemetryEmitter, emitter_or_default

log = logging.getLogger("tolaria.profiler")

_RUN_ID = re.compile(r"[A-Za-z0-9._-]+")


class ProfilerConfigError(ValueError):
    """The profiler was configured in a way that cannot work (raised before training starts)."""


def _check_count(name: str, value: Any, minimum: int) -> int:
    # The shared int check, in this module's wording: "profiler <name> must be an int >= <minimum>".
    return check_int(f"profiler {name}", value, minimum, error=ProfilerConfigError, range_message=False)


@dataclass(frozen=True)
class ProfilerConfig:
    """Profiling settings, as a run configuration holds them.

    The fields and defaults are declared here only: the trainer's ``[profiler]`` section
    (``tolaria.trainer.config.ProfilerConfig``) is a subclass that adds the configuration checks and
    lets the run folder supply ``trace_dir``.

    ``enabled=True`` needs a ``trace_dir`` (:class:`ProfilerConfigError` otherwise, at construction).
    ``wait``, ``warmup``, ``active_steps`` and ``repeat`` are ``torch.profiler.schedule``'s
    ``wait``, ``warmup``, ``active`` and ``repeat``, applied afresh in every epoch; ``repeat`` must be
    at least 1 so that windows stay bounded.
    """

    enabled: bool = False
    trace_dir: str | Path | None = None
    wait: int = 1
    warmup: int = 1
    active_steps: int = 3
    repeat: int = 1
    record_shapes: bool = False
    profile_memory: bool = False
    with_stack: bool = False

    def __post_init__(self) -> None:
        _check_count("wait", self.wait, 0)
        _check_count("warmup", self.warmup, 0)
        _check_count("active_steps", self.active_steps, 1)
        _check_count("repeat", self.repeat, 1)
        if self.enabled and (self.trace_dir is None or str(self.trace_dir) == ""):
            raise ProfilerConfigError("profiling is enabled but no trace_dir is set; give a directory for the traces")


class ProfilerWindow:
    """The profiling session of one epoch; call :meth:`step` once per training step.

    ``traces`` lists the files this epoch wrote; ``failed`` tells whether the profiler failed (the
    failure was logged and emitted; the epoch then runs unprofiled).
    """

    def __init__(self, profiler: BoundedProfiler | None, epoch: int, first_step: int | None):
        self._owner = profiler
        self.epoch = epoch
        self.first_step = first_step
        self.steps = 0
        self.traces: list[Path] = []
        self.failed = False
        self._prof: torch.profiler.profile | None = None

    @property
    def active(self) -> bool:
        """Whether a torch profiler is running for this epoch."""
        return self._prof is not None

    def step(self) -> None:
        """Marks the end of one training step. Never raises: a failure is logged and emitted."""
        self.steps += 1
        if self._prof is None:
            return
        try:
            self._prof.step()
        except Exception as exc:  # reported, then this epoch continues unprofiled
            self._fail("step", exc)
            self._stop()

    # ---- driven by BoundedProfiler.epoch -------------------------------------------------------

    def _start(self) -> None:
        owner = self._owner
        assert owner is not None
        try:
            prof = torch.profiler.profile(
                activities=owner.activities,
                schedule=torch.profiler.schedule(
                    wait=owner.wait, warmup=owner.warmup, active=owner.active_steps, repeat=owner.repeat
                ),
                on_trace_ready=self._export,
                record_shapes=owner.record_shapes,
                profile_memory=owner.profile_memory,
                with_stack=owner.with_stack,
            )
            prof.start()
        except Exception as exc:
            self._fail("start", exc)
            return
        self._prof = prof

    def _stop(self) -> None:
        prof, self._prof = self._prof, None
        if prof is None:
            return
        try:
            prof.stop()  # exports a partly recorded active window, if the epoch ended inside one
        except Exception as exc:
            self._fail("stop", exc)

    def _export(self, prof: torch.profiler.profile) -> None:
        owner = self._owner
        assert owner is not None
        step = prof.step_num if self.first_step is None else self.first_step + prof.step_num
        try:
            path = owner._reserve_trace_path(self.epoch, step)
        except OSError as exc:
            self._fail("export", exc)
            return
        try:
            prof.export_chrome_trace(str(path))
        except Exception as exc:
            self._fail("export", exc, path=str(path))
            try:
                path.unlink(missing_ok=True)  # drop the empty reserved file
            except OSError as cleanup_exc:
                self._fail("export cleanup", cleanup_exc, path=str(path))
            return
        self.traces.append(path)
        owner._trace_written(self, path, step)

    def _fail(self, phase: str, exc: BaseException, **fields: Any) -> None:
        self.failed = True
        assert self._owner is not None
        self._owner._failure(phase, self.epoch, exc, steps=self.steps, **fields)


class BoundedProfiler:
    """Profiles bounded windows of training, one ``torch.profiler`` session per epoch.

    Args:
        trace_dir: where traces go (created if missing). ``None`` raises :class:`ProfilerConfigError`.
        wait, warmup, active_steps, repeat: the per-epoch ``torch.profiler.schedule``.
        run_id: first part of every trace name; default the telemetry emitter's ``run_id``.
        telemetry: emitter for ``profiler.trace`` / ``profiler.failure`` events and counters.
        activities: ``torch.profiler.ProfilerActivity`` values; default CPU, plus CUDA when available.
        record_shapes, profile_memory, with_stack: passed to ``torch.profiler.profile``.
    """

    enabled = True

    def __init__(
        self,
        trace_dir: str | Path | None,
        *,
        wait: int = 1,
        warmup: int = 1,
        active_steps: int = 3,
        repeat: int = 1,
        run_id: str | None = None,
        telemetry: TelemetryEmitter | None = None,
        activities: Iterable[torch.profiler.ProfilerActivity] | None = None,
        record_shapes: bool = False,
        profile_memory: bool = False,
        with_stack: bool = False,
    ):
        if trace_dir is None or str(trace_dir) == "":
            raise ProfilerConfigError("profiling needs a trace directory; trace_dir is not set")
        self.wait = _check_count("wait", wait, 0)
        self.warmup = _check_count("warmup", warmup, 0)
        self.active_steps = _check_count("active_steps", active_steps, 1)
        self.repeat = _check_count("repeat", repeat, 1)
        self.telemetry = emitter_or_default(telemetry)
        if run_id is None:
            run_id = str(self.telemetry.attributes.get("run_id") or uuid.uuid4().hex[:12])
        self.run_id = run_id
        if not _RUN_ID.fullmatch(self.run_id):
            raise ProfilerConfigError(
                f"run_id {self.run_id!r} is not usable in a file name (letters, digits, . _ - only)"
            )
        self.trace_dir = Path(trace_dir)
        try:
            self.trace_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ProfilerConfigError(f"cannot create trace directory {self.trace_dir}: {exc}") from exc
        if activities is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.activities = list(activities)
        self.record_shapes = record_shapes
        self.profile_memory = profile_memory
        self.with_stack = with_stack
        self.traces: list[Path] = []
        self.failures: list[dict[str, Any]] = []

    @classmethod
    def from_config(
        cls, config: ProfilerConfig, *, run_id: str | None = None, telemetry: TelemetryEmitter | None = None
    ) -> BoundedProfiler:
        """A profiler from a :class:`ProfilerConfig` (which must be enabled)."""
        if not config.enabled:
            raise ProfilerConfigError(
                "ProfilerConfig.enabled is False; use build_profiler() to get a disabled profiler"
            )
        return cls(
            config.trace_dir,
            wait=config.wait,
            warmup=config.warmup,
            active_steps=config.active_steps,
            repeat=config.repeat,
            run_id=run_id,
            telemetry=telemetry,
            record_shapes=config.record_shapes,
            profile_memory=config.profile_memory,
            with_stack=config.with_stack,
        )

    @contextmanager
    def epoch(self, epoch: int, *, first_step: int | None = None) -> Iterator[ProfilerWindow]:
        """Profiles one epoch: yields a :class:`ProfilerWindow`; call its ``step()`` once per step.

        ``first_step`` (the global step the epoch starts at) makes trace names carry global steps;
        without it they carry the step within the epoch. Profiler failures never escape this
        context; exceptions from the loop body always do.
        """
        _check_count("epoch", epoch, 0)
        window = ProfilerWindow(self, epoch, first_step)
        window._start()
        try:
            yield window
        finally:
            window._stop()
            if not window.traces and not window.failed:
                message = (
                    f"epoch {epoch} ended after {window.steps} steps without a trace: the schedule needs more than "
                    f"wait + warmup = {self.wait + self.warmup} steps before it records"
                )
                log.warning(message)
                self.telemetry.event(
                    "profiler.no_trace", severity="warning", message=message, epoch=epoch, steps=window.steps
                )

    # ---- used by ProfilerWindow ----------------------------------------------------------------

    def _reserve_trace_path(self, epoch: int, step: int) -> Path:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        stem = f"{self.run_id}-epoch{epoch:05d}-step{step:07d}-{stamp}"
        for attempt in range(1000):
            path = self.trace_dir / (f"{stem}.pt.trace.json" if attempt == 0 else f"{stem}-{attempt}.pt.trace.json")
            try:
                path.open("x").close()  # exclusive create: an existing trace is never overwritten
                return path
            except FileExistsError:
                continue  # taken: try the next suffix
        raise FileExistsError(f"no free trace file name for {stem} in {self.trace_dir} after 1000 attempts")

    def _trace_written(self, window: ProfilerWindow, path: Path, step: int) -> None:
        self.traces.append(path)
        self.telemetry.count("profiler.traces")
        self.telemetry.event(
            "profiler.trace", message=f"profiler trace written to {path}", path=str(path), epoch=window.epoch, step=step
        )

    def _failure(self, phase: str, epoch: int, exc: BaseException, **fields: Any) -> None:
        error = f"{type(exc).__name__}: {exc}"
        message = f"profiler {phase} failed in epoch {epoch} ({error}); training continues without this trace"
        log.error(message)
        self.failures.append({"phase": phase, "epoch": epoch, "error": error, **fields})
        self.telemetry.count("profiler.failures")
        self.telemetry.event(
            "profiler.failure", severity="error", message=message, phase=phase, epoch=epoch, error=error, **fields
        )


class DisabledProfiler:
    """Stands in for :class:`BoundedProfiler` when profiling is off: same API, records nothing."""

    enabled = False
    traces: tuple[Path, ...] = ()
    failures: tuple[dict[str, Any], ...] = ()

    @contextmanager
    def epoch(self, epoch: int, *, first_step: int | None = None) -> Iterator[ProfilerWindow]:
        yield ProfilerWindow(None, epoch, first_step)


def build_profiler(
    config: ProfilerConfig, *, run_id: str | None = None, telemetry: TelemetryEmitter | None = None
) -> BoundedProfiler | DisabledProfiler:
    """The profiler a run's configuration asks for: bounded when enabled, a no-op otherwise."""
    if config.enabled:
        return BoundedProfiler.from_config(config, run_id=run_id, telemetry=telemetry)
    return DisabledProfiler()


__all__ = [
    "ProfilerConfig",
    "ProfilerConfigError",
    "ProfilerWindow",
    "BoundedProfiler",
    "DisabledProfiler",
    "build_profiler",
]
