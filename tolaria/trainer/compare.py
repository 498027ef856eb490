"""``tolaria compare``: train one task with several aggregators over several seeds, side by side.

Each (aggregator, seed) pair is one ordinary :class:`~tolaria.trainer.Trainer` run, in this
process, in its own folder ``OUT/runs/<aggregator>-seed<s>`` (``tolaria report`` draws any of
them). The task's data split, the model's initialisation and the shuffles depend on the seed only,
so on one seed every aggregator starts from the same model and sees the same batches. Printed:

- per source, the held-out accuracy at the end (mean ± standard deviation over the seeds);
- the step time: the median interval between consecutive steps of the real runs (forward,
  backward, aggregation, optimizer step, telemetry);
- the peak memory: tensor bytes of a separate two-step run of the same trainer (data, model,
  optimizer state, gradient buffer, the first rollback snapshot), measured as
  :mod:`.peak_memory` describes (on the CPU with the profiler, which is why it is a separate run);
- the conflict rate: the fraction of steps where at least one pair of sources has a negative
  cosine (from the per-step cosine matrix the trainer logs), the mean share of such pairs, and the
  mean over steps of the most negative pairwise cosine (how hard they conflict: sources that are
  merely orthogonal, cosine about 0, have negative pairs on half the steps too);
- against the ``mean`` aggregator (when compared): the accuracy differences larger than two
  standard errors.

``OUT/compare.png`` draws, per source, the held-out accuracy (each epoch's end) and the training
loss against the step, one line per aggregator, the mean over the seeds; ``OUT/compare.json`` keeps
every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import sys
import time
import typing
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .command import flag_overrides
from .config import ConfigError, TrainerConfig
from .gradient import AGGREGATOR_NAMES
from .loop import Trainer
from .peak_memory import measure_peak_memory
from .report import load_records
from .task_zoo import TASK_NAMES, build_task
from .tasks import DigitsTaskConfig

DEFAULT_AGGREGATORS = ("pcgrad", "upgrad", "mgda", "mean")
PLOT_FILE = "compare.png"
RESULTS_FILE = "compare.json"
MEMORY_STEPS = 2
MODES = typing.get_args(typing.get_type_hints(TrainerConfig)["aggregation_mode"])
LEVELS = typing.get_args(typing.get_type_hints(TrainerConfig)["aggregation_level"])


@dataclass
class RunResult:
    """One (aggregator, seed) run: final metrics, timings and the curves."""

    aggregator: str
    seed: int
    status: str
    steps: int
    metrics: dict[str, float]
    step_ms: float
    conflict_steps: float  # fraction of steps with at least one negative pairwise cosine
    negative_pairs: float  # mean fraction of source pairs with a negative cosine
    min_cosine: float  # mean over steps of the smallest pairwise cosine
    losses: dict[str, dict[int, float]] = field(default_factory=dict)  # source -> step -> loss
    evals: dict[str, dict[int, float]] = field(default_factory=dict)  # metric -> step -> value


class StepClock:
    """Wraps a loss function and notes the time of every call (one per step)."""

    def __init__(self, loss_fn: Callable[[Any, Any], Any]):
        self.loss_fn = loss_fn
        self.times: list[float] = []

    def __call__(self, outputs: Any, batch: Any) -> Any:
        self.times.append(time.perf_counter())
        return self.loss_fn(outputs, batch)

    def median_interval_ms(self) -> float:
        if len(self.times) < 3:
            return math.nan
        gaps = [b - a for a, b in zip(self.times[1:], self.times[2:])]  # the first step warms up
        return statistics.median(gaps) * 1e3


def conflict_stats(records: list[dict[str, Any]]) -> tuple[float, float, float]:
    """(fraction of logged steps with a negative pairwise cosine, mean fraction of negative pairs,
    mean of each step's smallest pairwise cosine)."""
    steps: dict[int, list[list[float]]] = {}
    for r in records:
        if r.get("kind") == "gradient.cosine" and r.get("step") is not None and isinstance(r.get("value"), list):
            steps[int(r["step"])] = r["value"]  # a step run again after a rollback: the later one counts
    if not steps:
        return math.nan, math.nan, math.nan
    any_negative, pair_share, smallest = 0, 0.0, 0.0
    for cosine in steps.values():
        k = len(cosine)
        pairs = [cosine[i][j] for i in range(k) for j in range(i + 1, k)]
        negative = sum(1 for c in pairs if c < 0)
        any_negative += negative > 0
        pair_share += negative / len(pairs)
        smallest += min(pairs)
    return any_negative / len(steps), pair_share / len(steps), smallest / len(steps)


def _curves(records: list[dict[str, Any]]) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]]]:
    losses: dict[str, dict[int, float]] = defaultdict(dict)
    evals: dict[str, dict[int, float]] = defaultdict(dict)
    for r in records:
        if r.get("kind") == "train.loss" and r.get("step") is not None:
            losses[str(r["source"])][int(r["step"])] = float(r["value"])
        elif r.get("kind") == "train.epoch" and r.get("metrics") and r.get("step") is not None:
            for name, value in r["metrics"].items():
                evals[name][int(r["step"])] = float(value)
    return dict(losses), dict(evals)


@dataclass
class CompareSettings:
    """What ``tolaria compare`` runs (the command line's flags)."""

    task: str
    aggregators: tuple[str, ...]
    seeds: int
    out: Path
    config: TrainerConfig
    task_config: DigitsTaskConfig
    measure_memory: bool = True


def _run_config(settings: CompareSettings, aggregator: str, seed: int, run_dir: Path, **changes: Any) -> TrainerConfig:
    base = settings.config
    return base.replace(
        aggregator=aggregator,
        seed=seed,
        run_dir=str(run_dir),
        progress=False,
        telemetry=dataclasses.replace(base.telemetry, log_every_steps=1, jsonl=True),
        **changes,
    )


def train_one(settings: CompareSettings, aggregator: str, seed: int) -> RunResult:
    """One real training run of ``aggregator`` on ``seed``; its telemetry gives the curves."""
    run_dir = settings.out / "runs" / f"{aggregator}-seed{seed}"
    if (run_dir / "telemetry.jsonl").exists():
        raise FileExistsError(f"{run_dir} already holds a run; give another --out or remove that folder")
    task = build_task(settings.task, dataclasses.replace(settings.task_config, seed=seed))
    clock = StepClock(task.loss_fn)
    config = _run_config(settings, aggregator, seed, run_dir)
    trainer = Trainer(
        task.model, task.optimizer, task.data, clock, config, evaluate=task.evaluate, shared=task.model.trunk
    )
    summary = trainer.fit()
    records = load_records(run_dir)
    losses, evals = _curves(records)
    conflict_steps, negative_pairs, min_cosine = conflict_stats(records)
    return RunResult(
        aggregator=aggregator,
        seed=seed,
        status=summary.status,
        steps=summary.steps,
        metrics=dict(summary.metrics),
        step_ms=clock.median_interval_ms(),
        conflict_steps=conflict_steps,
        negative_pairs=negative_pairs,
        min_cosine=min_cosine,
        losses=losses,
        evals=evals,
    )


def peak_memory_bytes(settings: CompareSettings, aggregator: str) -> int:
    """Peak tensor memory of building the task and trainer and running :data:`MEMORY_STEPS` steps."""
    run_dir = settings.out / "runs" / f"{aggregator}-memory"
    if (run_dir / "telemetry.jsonl").exists():
        raise FileExistsError(f"{run_dir} already holds a run; give another --out or remove that folder")

    def short_run() -> None:
        task = build_task(settings.task, dataclasses.replace(settings.task_config, seed=0))
        config = _run_config(settings, aggregator, 0, run_dir, max_steps=MEMORY_STEPS, epochs=1)
        Trainer(task.model, task.optimizer, task.data, task.loss_fn, config, shared=task.model.trunk).fit()

    _, peak = measure_peak_memory(short_run, _device_of(settings.config))
    return peak


def _device_of(config: TrainerConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


# ---- summarising --------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(results: Sequence[RunResult], memory: dict[str, int]) -> str:
    """The comparison table: accuracy per source (mean ± std over seeds), step time, memory, conflicts."""
    by_agg: dict[str, list[RunResult]] = defaultdict(list)
    for r in results:
        by_agg[r.aggregator].append(r)
    metrics = sorted({m for r in results for m in r.metrics})
    header = ["aggregator", *(m.removeprefix("accuracy/") for m in metrics), "mean acc", "step ms", "peak MB"]
    header += ["conflict steps", "neg. pairs", "min cos"]
    rows = []
    for agg, runs in by_agg.items():
        row = [agg]
        for m in metrics:
            mean, std = _mean_std([r.metrics[m] for r in runs if m in r.metrics])
            row.append(f"{mean:.4f} ± {std:.4f}")
        row.append(f"{statistics.fmean(statistics.fmean(r.metrics[m] for m in metrics) for r in runs):.4f}")
        row.append(f"{statistics.median(r.step_ms for r in runs):.2f}")
        row.append(f"{memory[agg] / 2**20:.1f}" if agg in memory else "-")
        row.append(f"{statistics.fmean(r.conflict_steps for r in runs):.2f}")
        row.append(f"{statistics.fmean(r.negative_pairs for r in runs):.2f}")
        row.append(f"{statistics.fmean(r.min_cosine for r in runs):+.3f}")
        rows.append(row)
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    line = " | ".join(h.ljust(w) for h, w in zip(header, widths))
    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line, rule, *(" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)])


def differences_from_mean(results: Sequence[RunResult]) -> list[str]:
    """Per aggregator and metric: the accuracy difference to ``mean`` where it exceeds two
    standard errors of the difference (seeds as the samples)."""
    by_agg: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        for m, v in r.metrics.items():
            by_agg[r.aggregator][m].append(v)
    if "mean" not in by_agg:
        return []
    lines = []
    for agg, metrics in by_agg.items():
        if agg == "mean":
            continue
        for m, values in sorted(metrics.items()):
            base = by_agg["mean"].get(m)
            if not base or len(values) < 2 or len(base) < 2:
                continue
            diff = statistics.fmean(values) - statistics.fmean(base)
            se = math.sqrt(statistics.variance(values) / len(values) + statistics.variance(base) / len(base))
            if abs(diff) > 2 * se:
                lines.append(f"{agg} vs mean, {m}: {diff:+.4f} (2 standard errors: {2 * se:.4f})")
    return lines


def _seed_mean(series: Sequence[dict[int, float]]) -> tuple[list[int], list[float]]:
    """The mean over the seeds at the steps every seed has."""
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    return common, [statistics.fmean(s[step] for s in series) for step in common]


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot(results: Sequence[RunResult], sources: Sequence[str], out: Path, title: str) -> None:
    """One PNG: per source, held-out accuracy (top) and training loss (bottom) against the step,
    one line per aggregator (the mean over the seeds; the loss a moving mean over 10 steps)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    by_agg: dict[str, list[RunResult]] = defaultdict(list)
    for r in results:
        by_agg[r.aggregator].append(r)
    fig, axes = plt.subplots(2, len(sources), figsize=(3.6 * len(sources), 6.4), squeeze=False)
    for col, source in enumerate(sources):
        top, bottom = axes[0][col], axes[1][col]
        for agg, runs in by_agg.items():
            steps, acc = _seed_mean([r.evals.get(f"accuracy/{source}", {}) for r in runs])
            top.plot(steps, acc, marker=".", label=agg)
            steps, loss = _seed_mean([r.losses.get(source, {}) for r in runs])
            bottom.plot(steps, _smooth(loss, 10), linewidth=1.1, label=agg)
        top.set(title=f"{source}: held-out accuracy", xlabel="step")
        bottom.set(title=f"{source}: training loss", xlabel="step", yscale="log")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# ---- the whole comparison -----------------------------------------------------------------------


@dataclass
class Comparison:
    results: list[RunResult]
    memory: dict[str, int]
    sources: tuple[str, ...]
    plot: Path
    json: Path

    def table(self) -> str:
        return table(self.results, self.memory)


def compare(settings: CompareSettings, progress: Callable[[str], None] = lambda _: None) -> Comparison:
    """Trains every (aggregator, seed), measures memory, writes the plot and the JSON."""
    for name in settings.aggregators:
        if name not in AGGREGATOR_NAMES:
            raise ConfigError(f"unknown aggregator {name!r}; valid: {', '.join(AGGREGATOR_NAMES)}")
    settings.out.mkdir(parents=True, exist_ok=True)
    sources = build_task(settings.task, settings.task_config).sources
    results, memory = [], {}
    for aggregator in settings.aggregators:
        for seed in range(settings.seeds):
            progress(f"training {aggregator}, seed {seed}")
            results.append(train_one(settings, aggregator, seed))
        if settings.measure_memory:
            memory[aggregator] = peak_memory_bytes(settings, aggregator)
    plot_path = settings.out / PLOT_FILE
    plot(results, sources, plot_path, f"{settings.task}: mean over {settings.seeds} seed(s)")
    json_path = settings.out / RESULTS_FILE
    json_path.write_text(
        json.dumps(
            {
                "task": settings.task,
                "seeds": settings.seeds,
                "peak_memory_bytes": memory,
                "runs": [dataclasses.asdict(r) for r in results],
            },
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    return Comparison(results, memory, sources, plot_path, json_path)


# ---- command line -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=TASK_NAMES, default="digit-attributes", help="default digit-attributes")
    parser.add_argument(
        "--aggregators",
        default=",".join(DEFAULT_AGGREGATORS),
        metavar="A,B,...",
        help=f"comma-separated (default {','.join(DEFAULT_AGGREGATORS)}); any of {', '.join(AGGREGATOR_NAMES)}",
    )
    parser.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds 0..N-1 per aggregator (default 3)")
    parser.add_argument("--epochs", type=int, default=10, metavar="N", help="passes over the data (default 10)")
    parser.add_argument("--max-steps", type=int, metavar="N", help="stop each run after N steps")
    parser.add_argument("--out", metavar="DIR", default="compare", help="output folder (default ./compare)")
    parser.add_argument("--device", metavar="DEVICE", default="cpu", help='"cpu" (default), "cuda", "cuda:N"')
    parser.add_argument(
        "--config", metavar="FILE", help="TOML of TrainerConfig keys and a [task] table, as for tolaria train"
    )
    parser.add_argument("--mode", choices=MODES, help="aggregation_mode of every run (default: the config's, buffer)")
    parser.add_argument(
        "--aggregation-level", choices=LEVELS, help="aggregation_level of every run (default: the config's, params)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")


def settings_from_args(args: argparse.Namespace) -> CompareSettings:
    from .command import load_config

    config, task_config, given = load_config(args.config)
    if config.aggregator_options:
        raise ConfigError("compare runs every aggregator with its defaults: remove [aggregator_options]")
    aggregators = tuple(a.strip() for a in args.aggregators.split(",") if a.strip())
    if not aggregators:
        raise ConfigError("--aggregators needs at least one name")
    if len(set(aggregators)) != len(aggregators):
        raise ConfigError(f"--aggregators names one twice: {args.aggregators}")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    changes: dict[str, Any] = {"epochs": args.epochs, "device": args.device}
    changes |= flag_overrides(args, "max_steps", "mode", "aggregation_level")
    return CompareSettings(
        task=args.task,
        aggregators=aggregators,
        seeds=args.seeds,
        out=Path(args.out),
        config=config.replace(**changes),
        task_config=task_config,
        measure_memory=not args.no_memory,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
        result = compare(settings, progress=lambda text: print(text, file=sys.stderr, flush=True))
    except (ConfigError, ValueError, FileExistsError) as exc:
        print(f"tolaria compare: error: {exc}", file=sys.stderr)
        return 2
    print(f"{settings.task}: {settings.seeds} seed(s), accuracy on held-out examples (mean ± std over seeds)")
    print(result.table())
    for line in differences_from_mean(result.results) or ["no accuracy differs from mean's by more than 2 s.e."]:
        print(line)
    print(f"curves: {result.plot}\nnumbers: {result.json}\nruns: {settings.out / 'runs'}")
    return 0


__all__ = [
    "CompareSettings",
    "Comparison",
    "RunResult",
    "StepClock",
    "add_arguments",
    "compare",
    "conflict_stats",
    "differences_from_mean",
    "peak_memory_bytes",
    "plot",
    "run",
    "settings_from_args",
    "table",
    "train_one",
]
