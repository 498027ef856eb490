"""``tolaria train``: the embedded default task from the command line, with fault demos.

With no arguments it trains the embedded two-digit task (see :mod:`.tasks`) with PCGrad on the CPU,
shows a progress bar and prints a summary table. ``--inject-fault`` demonstrates recovery:

- ``nan``: the losses turn NaN for a few steps in the first epoch: the steps are skipped, the
  run rolls back to its newest snapshot, and training goes on;
- ``hang-policy``: the control policy hangs on its first call: the call times out, the loop goes on
  in conservative mode, and control resumes once calls succeed again;
- ``kill``: the process kills itself (SIGKILL) in the middle of the second epoch, after the first
  durable checkpoint: ``tolaria train --resume --out DIR`` picks the run up from that checkpoint.

A ``--config FILE`` is a TOML file of :class:`~tolaria.trainer.TrainerConfig` keys plus an optional
``[task]`` table of :class:`~tolaria.trainer.tasks.DigitsTaskConfig` keys.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tolaria.distributed import DistributedContext, fsdp_wrap, release_process_groups

from .config import ConfigError, DistributedConfig, TrainerConfig
from .gradient import AGGREGATOR_NAMES
from .loop import HALTED, INTERRUPTED, RunSummary, Trainer, default_run_dir
from .mediator import ControlState
from .task_zoo import DEFAULT_TASK, TASK_NAMES, build_task
from .tasks import DigitsTaskConfig
from .wiring import open_context

log = logging.getLogger("tolaria.train")

FAULTS = ("nan", "hang-policy", "kill")
SHARDING_CHOICES = typing.get_args(typing.get_type_hints(DistributedConfig)["sharding"])
DEMO_CONTROL_TIMEOUT_S = 2.0


# ---- the control policy and executor of the demo -------------------------------------------------


@dataclass(frozen=True)
class ReportProgress:
    """The demo policy's command: report the epoch's losses (the executor logs it)."""

    epoch: int
    losses: Mapping[str, float]


class EpochReportPolicy:
    """A small policy: one :class:`ReportProgress` per epoch end. With ``hang_first`` its first
    call blocks until :meth:`release` (or forever), to show that a hung policy cannot stall training."""

    def __init__(self, *, hang_first: bool = False):
        self.hang_first = hang_first
        self.calls = 0
        self._release = threading.Event()

    def evaluate(self, state: ControlState) -> list[ReportProgress]:
        self.calls += 1
        if self.hang_first and self.calls == 1:
            self._release.wait()  # hangs: the mediator abandons this call after its timeout
        return [ReportProgress(state.epoch, dict(state.losses))]

    def release(self) -> None:
        self._release.set()


class LoggingExecutor:
    """Carries out :class:`ReportProgress` commands by logging them; anything else is an error."""

    def __init__(self) -> None:
        self.applied: list[ReportProgress] = []

    def apply(self, command: Any) -> str:
        if not isinstance(command, ReportProgress):
            raise TypeError(f"LoggingExecutor cannot apply {command!r}")
        self.applied.append(command)
        text = ", ".join(f"{k} {v:.4f}" for k, v in command.losses.items())
        log.info("policy report for epoch %d: %s", command.epoch + 1, text)
        return text


# ---- fault injection -------------------------------------------------------------------------


class FaultyLoss:
    """Wraps a loss function; injects NaN losses over some calls, or kills the process at one call."""

    def __init__(
        self,
        loss_fn: Callable[[Any, Any], Any],
        *,
        nan_calls: range = range(0),
        kill_at: int | None = None,
        kill_message: str = "",
    ):
        self.loss_fn = loss_fn
        self.nan_calls = nan_calls
        self.kill_at = kill_at
        self.kill_message = kill_message
        self.calls = 0

    def __call__(self, outputs: Any, batch: Any) -> Any:
        self.calls += 1
        if self.kill_at is not None and self.calls == self.kill_at:
            print(self.kill_message, file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        losses = self.loss_fn(outputs, batch)
        if self.calls in self.nan_calls:
            if isinstance(losses, Mapping):
                return {name: loss * float("nan") for name, loss in losses.items()}
            return losses * float("nan")
        return losses


# ---- arguments and configuration ------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file of TrainerConfig keys (and an optional [task] table)"
    )
    parser.add_argument("--out", metavar="DIR", help="run folder (default ./runs/<timestamp>)")
    parser.add_argument(
        "--task",
        choices=TASK_NAMES,
        default=DEFAULT_TASK,
        help=f"what to train (default {DEFAULT_TASK}; digit-attributes: K = 4 heads that conflict; "
        "see tolaria.trainer.task_zoo)",
    )
    parser.add_argument("--epochs", type=int, metavar="N", help="passes over the data (default 5)")
    parser.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps")
    parser.add_argument(
        "--aggregator",
        metavar="NAME",
        help=f"how the tasks' gradients combine (default pcgrad; one of {', '.join(AGGREGATOR_NAMES)})",
    )
    parser.add_argument(
        "--mode",
        choices=("buffer", "low_memory"),
        help="buffer (default: a K x N gradient buffer) or low_memory (the same update from the Gram matrix "
        "folded during one batched backward; declined, with a message, where it would not save memory); "
        "sets aggregation_mode",
    )
    parser.add_argument(
        "--aggregation-level",
        choices=("params", "features"),
        help="params (default) or features (aggregate the gradients at the shared trunk's output: an "
        "approximation at about the cost of a plain step); sets aggregation_level",
    )
    parser.add_argument("--device", metavar="DEVICE", help='"cpu" (default), "cuda", "cuda:N" or "auto"')
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    parser.add_argument(
        "--sharding",
        choices=SHARDING_CHOICES,
        help="under torchrun: none (every rank all-reduces the whole K x N buffer; default), zero (buffer "
        "reduce-scattered, each rank aggregates its columns) or fsdp (the model wrapped by FSDP2's fully_shard); "
        "sets [distributed] sharding",
    )
    parser.add_argument(
        "--inject-fault",
        choices=FAULTS,
        help="demonstrate recovery: nan (NaN losses: skip, roll back), hang-policy (a hung policy times out), "
        "kill (SIGKILL mid-epoch 2; then --resume)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_config(path: str | None) -> tuple[TrainerConfig, DigitsTaskConfig, set[str]]:
    """The trainer and task configs of a TOML file (defaults without one), and the keys it set."""
    if path is None:
        return TrainerConfig(), DigitsTaskConfig(), set()
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    task = data.pop("task", {})
    try:
        return TrainerConfig.from_dict(data), DigitsTaskConfig.from_dict(task, where="task."), set(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# The flags of `tolaria train` and `tolaria compare` that set one top-level config key each.
FLAG_KEYS = {
    "epochs": "epochs",
    "max_steps": "max_steps",
    "aggregator": "aggregator",
    "mode": "aggregation_mode",
    "aggregation_level": "aggregation_level",
}


def flag_overrides(args: argparse.Namespace, *flags: str) -> dict[str, Any]:
    """The config changes the given flags ask for (a flag left out of the command line changes nothing)."""
    return {FLAG_KEYS[flag]: getattr(args, flag) for flag in flags if getattr(args, flag) is not None}


def build_config(args: argparse.Namespace) -> tuple[TrainerConfig, DigitsTaskConfig]:
    """The run's configuration: the file's, then the flags over it."""
    config, task, given = load_config(args.config)
    changes: dict[str, Any] = {"progress": not args.no_progress}
    changes |= flag_overrides(args, "epochs", "max_steps", "aggregator", "mode", "aggregation_level")
    if args.device is not None:
        changes["device"] = args.device
    elif "device" not in given:
        changes["device"] = "cpu"  # the embedded task is sized for a CPU
    if args.sharding is not None:
        changes["distributed"] = dataclasses.replace(config.distributed, sharding=args.sharding)
    if args.resume:
        if args.out is None and config.run_dir is None:
            raise ConfigError("--resume needs the run folder to continue: give --out DIR")
        changes["checkpoint"] = dataclasses.replace(config.checkpoint, resume=True)
    elif _resumes_after_a_restart(args.out or config.run_dir):
        changes["checkpoint"] = dataclasses.replace(config.checkpoint, resume=True)
    changes["run_dir"] = args.out if args.out is not None else config.run_dir or str(default_run_dir())
    if args.inject_fault == "hang-policy" and "control_timeout_s" not in given:
        changes["control_timeout_s"] = DEMO_CONTROL_TIMEOUT_S
    return config.replace(**changes), task


def _resumes_after_a_restart(run_dir: str | None) -> bool:
    """Under ``torchrun --max-restarts``, whether this attempt picks the run up from its checkpoints.

    A restarted attempt (``TORCHELASTIC_RESTART_COUNT`` > 0) resumes when the run folder holds a
    checkpoint manifest; without a fixed run folder it could not find the run, which is an error
    rather than a silent fresh start."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if attempt == 0:
        if run_dir is None and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0:
            log.warning(
                "torchrun may restart this group, but the run folder is not fixed: give --out DIR so that "
                "a restarted attempt resumes the run instead of starting a new one"
            )
        return False
    if run_dir is None:
        raise ConfigError(
            f"torchrun restarted this group (attempt {attempt}), but the run folder is not fixed, so this attempt "
            "cannot find the run to resume: give --out DIR (or run_dir in the config)"
        )
    folder = Path(run_dir)
    if any((folder / sub / "manifest.json").exists() for sub in ("checkpoints", "sharded-checkpoints")):
        log.warning("torchrun restart (attempt %d): resuming from the newest checkpoint in %s", attempt, folder)
        return True
    log.warning("torchrun restart (attempt %d): %s holds no checkpoint yet; the run starts over", attempt, folder)
    return False


# ---- the command -----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    try:
        return _train(args)
    finally:
        # --sharding fsdp: the model's DTensors kept the process group alive past its destruction at the
        # end of the run. With the model gone (``_train`` returned), free the group now, so that its
        # worker threads end before Python shuts down (else the process may abort at exit). It warns
        # if a group is still held.
        release_process_groups()


def _train(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config, task_config = build_config(args)
        folders = [Path(config.run_dir or "") / sub for sub in ("checkpoints", "sharded-checkpoints")]
        if config.checkpoint.resume and not any(folder.exists() for folder in folders):
            raise ConfigError(
                f"--resume: {config.run_dir} has no checkpoints folder; is it a `tolaria train` run folder?"
            )
    except ConfigError as exc:
        print(f"tolaria train: error: {exc}", file=sys.stderr)
        return 2
    task = build_task(args.task, task_config)
    loss_fn: Callable[[Any, Any], Any] = task.loss_fn
    policy = EpochReportPolicy(hang_first=args.inject_fault == "hang-policy")
    executor = LoggingExecutor()
    steps_per_epoch = len(task.data)
    fault = args.inject_fault
    if fault == "nan":
        first = max(1, steps_per_epoch // 2)
        calls = range(first, first + config.safety.rollback_after)
        loss_fn = FaultyLoss(task.loss_fn, nan_calls=calls)
        print(
            f"injected fault: NaN losses at batches {calls.start}..{calls.stop - 1} of the run "
            f"(rollback after {config.safety.rollback_after} in a row)",
            file=sys.stderr,
        )
    elif fault == "kill":
        if config.checkpoint.resume:
            print("note: --inject-fault kill is ignored when resuming", file=sys.stderr)
        else:
            kill_at = steps_per_epoch + max(1, steps_per_epoch // 2)
            message = (
                f"injected fault: killing this process (SIGKILL) at batch {kill_at}, in the middle of epoch 2.\n"
                f"Resume with: tolaria train --resume --out {config.run_dir}"
            )
            loss_fn = FaultyLoss(task.loss_fn, kill_at=kill_at, kill_message=message)
            if config.epochs < 2 or (config.max_steps is not None and config.max_steps < kill_at):
                print(f"note: the run ends before batch {kill_at}; the kill fault will not fire", file=sys.stderr)
    elif fault == "hang-policy":
        print(
            f"injected fault: the control policy hangs on its first call (timeout {config.control_timeout_s:g} s)",
            file=sys.stderr,
        )

    ctx = _fsdp_context(config, task) if config.distributed.sharding == "fsdp" else None
    try:
        # The heads are task-specific: only the trunk's gradients are aggregated.
        trainer = Trainer(
            task.model,
            task.optimizer,
            task.data,
            loss_fn,
            config,
            policy=policy,
            executor=executor,
            evaluate=task.evaluate,
            shared=task.model.trunk,
            ctx=ctx,
        )
        if ctx is not None:
            trainer._owns_ctx = True  # built here for the wrapping; the trainer closes it with itself
    except (ConfigError, ValueError, TypeError) as exc:  # a bad setting, an aggregator's bad options
        if ctx is not None:
            ctx.close()
        print(f"tolaria train: error: {exc}", file=sys.stderr)
        if "aggregator" in str(exc):
            print("  (an aggregator's options go in the [aggregator_options] table of --config FILE)", file=sys.stderr)
        return 2
    try:
        trainer.aggregator.check_sources(len(task.sources))
    except ValueError as exc:
        trainer.close()
        print(
            f"tolaria train: error: the {'default' if task.name == DEFAULT_TASK else task.name} task has "
            f"{len(task.sources)} gradient sources "
            f"({', '.join(task.sources)}): {exc}",
            file=sys.stderr,
        )
        return 2
    main = trainer.ctx.is_main  # under torchrun, only rank 0 prints (every rank writes its telemetry)
    if main:
        print(
            f"training {task.description} ({len(trainer.data)} steps/epoch"
            f"{f' per rank, {trainer.ctx.world_size} ranks' if trainer.ctx.is_distributed else ''}) with "
            f"{trainer.aggregator!r} on {trainer.device}; run folder {trainer.run_dir}",
            file=sys.stderr,
        )
    with _logging_around_progress(config.progress):
        try:
            summary = trainer.fit()
        except KeyboardInterrupt:
            print("tolaria train: interrupted", file=sys.stderr)
            return 130
        finally:
            policy.release()  # lets a hung demo call return, so its thread ends
    if main:
        print(summary.table())
        print(f"plots: tolaria report {summary.run_dir}")
    return _exit_code(summary)


def _fsdp_context(config: TrainerConfig, task: Any) -> DistributedContext:
    """``--sharding fsdp``: joins the process group as the trainer would, wraps the task's model with
    FSDP2's ``fully_shard`` (:func:`tolaria.distributed.fsdp_wrap`) and points its optimizer (which
    has no state yet) at the sharded parameters, since both must happen before the trainer starts. In
    one process there is nothing to shard: the model stays as it is (the stage runs as ``"none"``)."""
    ctx, _ = open_context(config, None)
    if ctx.is_distributed:
        names = {id(p): name for name, p in task.model.named_parameters()}
        fsdp_wrap(task.model, ctx)  # replaces every parameter by a DTensor of the same name
        sharded = dict(task.model.named_parameters())
        for group in task.optimizer.param_groups:
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]
    return ctx


def _exit_code(summary: RunSummary) -> int:
    if summary.status == HALTED:
        return 3
    if summary.status == INTERRUPTED:
        return 130
    return 0


@contextlib.contextmanager
def _logging_around_progress(progress: bool):
    if not progress:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield


__all__ = [
    "FLAG_KEYS",
    "flag_overrides",
    "EpochReportPolicy",
    "FAULTS",
    "FaultyLoss",
    "LoggingExecutor",
    "ReportProgress",
    "SHARDING_CHOICES",
    "add_arguments",
    "build_config",
    "run",
]
