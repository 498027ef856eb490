"""What the Trainer costs, measured step by step against the loops it replaces, in one process.

    python benchmarks/trainer_overhead.py                 # both parts (about 5 minutes on 1 CPU thread)
    python benchmarks/trainer_overhead.py --part overhead --epochs 3
    python benchmarks/trainer_overhead.py --part pcgrad --seeds 5 --threads 0
    python -m pytest benchmarks/trainer_overhead.py --benchmark-only      # pytest-benchmark: one step of each loop

Both parts interleave the two loops step by step: the Trainer's data iterable runs the reference
loop's step on the same batch (on a twin model with the same initial weights) just before handing
the batch to the Trainer, and times it; the Trainer's step is timed from the hand-over to its
request for the next batch. Both loops therefore see the same batches in the same moments, so load
from other processes on a shared machine falls on both alike. Epoch-end work (evaluation, durable
checkpoints, summaries) is reported separately.

Part 1, ``overhead``: one gradient source, telemetry on (JSONL in the run folder, per-step metrics
every 10 steps), snapshots every 50 steps, per-step safety checks, LR control; against a bare loop
(``zero_grad; loss.backward(); step``) on an MLP. Target: the Trainer's steps within 5% of the bare
loop's.

Part 2, ``pcgrad``: the two-digit default task of ``tolaria train``: the Trainer (PCGrad through
``GradientBuffer``, Gram-space weighting) against the usual PCGrad recipe (per task: ``zero_grad``,
``backward(retain_graph=True)``, clone and concatenate the grads; pairwise projections in a Python
loop with a host read per pair; scatter the sum back into ``.grad``), over several seeds. With two
tasks PCGrad has a single projection order, so both compute the same update up to rounding: the
accuracies should agree to within noise. Targets: the same accuracy, faster per step.

The pytest-benchmark form times one step of each loop of each part (the defaults above: MLP of width
1024, batch 256; the default task with seed 0). Each loop runs in a helper thread (the Trainer's
``fit()``, or the reference step over its batches) on a data iterable that the benchmark feeds one
batch per round, timed from the hand-over until the loop asks for the next batch (its whole step, as
above; epoch-end work is not timed). Both run in a helper thread alike: torch's intra-op threads
behave differently there than in the main thread. ``extra_info["x_reference"]`` holds the Trainer's
step time over the reference's. No assertion on timings.
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tolaria.trainer import TelemetryConfig, Trainer, TrainerConfig
from tolaria.trainer.tasks import TASKS, DigitsTaskConfig, accuracy, build_default_task, two_digit_loss


class Interleaved:
    """The Trainer's data: before handing over each batch, runs ``reference_step(batch)`` and times it.

    ``reference_times[i]`` is the reference loop's step i; ``trainer_times[i]`` the time from handing
    batch i to the Trainer until it asked for the next one (its whole step).
    """

    def __init__(self, data: Any, reference_step: Callable[[Any], None]):
        self.data = data
        self.reference_step = reference_step
        self.reference_times: list[float] = []
        self.trainer_times: list[float] = []

    def __len__(self) -> int:
        return len(self.data)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        batches = iter(self.data)
        handed: float | None = None
        while True:
            if handed is not None:  # the Trainer asks for the next batch: its step is over
                self.trainer_times.append(time.perf_counter() - handed)
            try:
                batch = next(batches)  # fetching a batch is neither loop's step
            except StopIteration:
                return
            start = time.perf_counter()
            self.reference_step(batch)
            self.reference_times.append(time.perf_counter() - start)
            handed = time.perf_counter()
            yield batch


def describe(name: str, times: list[float], base: list[float] | None = None) -> str:
    mean, median = statistics.fmean(times), statistics.median(times)
    line = f"{name:<22}{mean * 1e3:>12.3f}{median * 1e3:>12.3f}{sum(times):>10.2f}"
    if base is not None:
        mean_pct = (mean / statistics.fmean(base) - 1) * 100
        median_pct = (median / statistics.median(base) - 1) * 100
        line += f"{mean_pct:>+12.1f}%{median_pct:>+11.1f}%"
    return line


HEADER = f"{'loop':<22}{'mean ms':>12}{'median ms':>12}{'total s':>10}{'mean vs ref':>13}{'median vs ref':>14}"


# ---- part 1: overhead of the trainer, one source ------------------------------------------------


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d_out)
    )


def part_overhead(args: argparse.Namespace, tmp: Path) -> None:
    d_in, classes = 256, 10
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(args.batch_size, d_in, generator=g), torch.randint(classes, (args.batch_size,), generator=g))
        for _ in range(args.batches)
    ]
    bare_model, model = mlp(d_in, args.hidden, classes), mlp(d_in, args.hidden, classes)
    bare_opt = torch.optim.AdamW(bare_model.parameters(), lr=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    n_params = sum(p.numel() for p in model.parameters())

    def bare_step(batch):
        x, y = batch
        bare_opt.zero_grad(set_to_none=True)
        F.cross_entropy(bare_model(x), y).backward()
        bare_opt.step()

    data = Interleaved(batches, bare_step)
    config = TrainerConfig(
        epochs=args.epochs,
        device="cpu",
        seed=None,
        run_dir=str(tmp / "overhead"),
        telemetry=TelemetryConfig(log_every_steps=10),
    )
    trainer = Trainer(model, opt, data, lambda out, batch: F.cross_entropy(out, batch[1]), config)
    start = time.perf_counter()
    summary = trainer.fit()
    fit_s = time.perf_counter() - start
    steps = summary.steps
    print(
        f"== overhead: MLP {d_in}-{args.hidden}-{args.hidden}-{classes} ({n_params / 1e6:.2f} M params), AdamW, "
        f"batch {args.batch_size}, {args.epochs} epochs x {args.batches} steps, one loss, interleaved step by step"
    )
    print(HEADER)
    print(describe("bare loop (reference)", data.reference_times))
    print(describe("trainer step", data.trainer_times, data.reference_times))
    over = statistics.fmean(data.trainer_times) / statistics.fmean(data.reference_times) - 1
    epoch_end = fit_s - sum(data.reference_times) - sum(data.trainer_times)
    records = [json.loads(line) for line in (summary.run_dir / "telemetry.jsonl").read_text().splitlines()]
    n_ckpt = sum(r["kind"] == "state.checkpoint_committed" for r in records)
    print(
        f"trainer overhead per step: {over * 100:+.1f}% (mean, snapshots and telemetry included; target < 5%: "
        f"{'met' if over < 0.05 else 'NOT met'})"
    )
    print(
        f"outside the steps: {epoch_end:.2f} s for the whole run ({n_ckpt} durable checkpoints, first snapshot, "
        f"epoch summaries), {epoch_end / steps * 1e3:.2f} ms per step amortised over {steps} steps"
    )


# ---- part 2: PCGrad trainer vs the naive PCGrad recipe ------------------------------------------


def naive_pcgrad_step(model: nn.Module, opt: torch.optim.Optimizer, losses: dict[str, torch.Tensor]) -> None:
    """The usual PCGrad recipe (e.g. Pytorch-PCGrad): flatten per-task grads, project pairwise, unflatten."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    items = list(losses.values())
    for i, loss in enumerate(items):
        opt.zero_grad(set_to_none=True)
        loss.backward(retain_graph=i + 1 < len(items))
        grads.append(
            torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().clone() for p in params])
        )
    projected = [g.clone() for g in grads]
    for g_i in projected:
        order = list(range(len(grads)))
        random.shuffle(order)
        for j in order:
            g_j = grads[j]
            dot = torch.dot(g_i, g_j)
            if dot < 0:  # a host read per pair, as in the recipe
                g_i -= dot / (g_j.norm() ** 2) * g_j
    merged = torch.stack(projected).sum(dim=0)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = merged[offset : offset + n].view_as(p).clone()
        offset += n
    opt.step()


def part_pcgrad(args: argparse.Namespace, tmp: Path) -> None:
    cfg = DigitsTaskConfig()
    print(
        f"\n== PCGrad on the default task: {cfg.train_pairs} pairs, batch {cfg.batch_size}, hidden {cfg.hidden}, "
        f"AdamW lr {cfg.lr}, {args.epochs} epochs, seeds 0..{args.seeds - 1}, interleaved step by step"
    )
    acc: dict[str, dict[str, list[float]]] = {"trainer": {t: [] for t in TASKS}, "naive": {t: [] for t in TASKS}}
    times: dict[str, list[float]] = {"trainer": [], "naive": []}
    for seed in range(args.seeds):
        mine, ref = build_default_task(DigitsTaskConfig(seed=seed)), build_default_task(DigitsTaskConfig(seed=seed))
        random.seed(seed)

        def naive_step(batch, ref=ref):
            naive_pcgrad_step(ref.model, ref.optimizer, two_digit_loss(ref.model(batch[0]), batch))

        data = Interleaved(mine.data, naive_step)
        config = TrainerConfig(
            epochs=args.epochs, device="cpu", seed=seed, run_dir=str(tmp / f"pcgrad{seed}"), aggregator="pcgrad"
        )
        Trainer(mine.model, mine.optimizer, data, mine.loss_fn, config).fit()
        for name, task in (("trainer", mine), ("naive", ref)):
            for t, value in accuracy(task.model, *task.test).items():
                acc[name][t.split("/")[1]].append(value)
        times["trainer"].extend(data.trainer_times)
        times["naive"].extend(data.reference_times)
    print(f"{'method':<22}" + "".join(f"{'accuracy ' + t:>24}" for t in TASKS))
    for name in ("trainer", "naive"):
        cells = [
            f"{statistics.fmean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.4f}".rjust(24)
            for v in (acc[name][t] for t in TASKS)
        ]
        print(f"{name:<22}" + "".join(cells))
    gaps = [statistics.fmean(acc["trainer"][t]) - statistics.fmean(acc["naive"][t]) for t in TASKS]
    print("accuracy difference (trainer - naive): " + ", ".join(f"{t} {g:+.4f}" for t, g in zip(TASKS, gaps)))
    print(HEADER)
    print(describe("naive recipe (ref)", times["naive"]))
    print(describe("trainer step", times["trainer"], times["naive"]))
    speed = statistics.fmean(times["naive"]) / statistics.fmean(times["trainer"])
    print(
        f"trainer vs the naive recipe: {speed:.2f}x per step (mean; the trainer's step also carries its safety "
        f"checks, snapshots and telemetry)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("overhead", "pcgrad", "both"), default="both")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (both parts)")
    parser.add_argument("--batches", type=int, default=150, help="overhead: batches per epoch")
    parser.add_argument("--batch-size", type=int, default=256, help="overhead: examples per batch")
    parser.add_argument("--hidden", type=int, default=1024, help="overhead: MLP width")
    parser.add_argument("--seeds", type=int, default=3, help="pcgrad: seeds")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: steadier timings on a shared machine; 0 keeps torch's)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread(s), "
        f"{time.strftime('%Y-%m-%d %H:%M')}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("overhead", "both"):
            part_overhead(args, Path(tmp))
        if args.part in ("pcgrad", "both"):
            part_pcgrad(args, Path(tmp))


# ---- pytest-benchmark form ----------------------------------------------------------------------

_ROUNDS = 5
_medians: dict[tuple[str, str], float] = {}


class Fed:
    """The Trainer's data, fed one batch at a time: ``step(batch)`` hands a batch over and returns when
    the Trainer asks for the next one (its whole step). ``len`` is fixed, so the epoch ends after it."""

    def __init__(self, length: int):
        self.length = length
        self.handed: queue.Queue = queue.Queue()
        self.asked: queue.Queue = queue.Queue()

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Any]:
        for _ in range(self.length):
            self.asked.put(None)
            yield self.handed.get(timeout=600)
        self.asked.put(None)


class FedLoop:
    """A training loop (``run(data)``: the Trainer's ``fit()``, or the reference step over the batches) in a
    helper thread, driven one step at a time through :class:`Fed`."""

    def __init__(self, run: Callable[[Fed], object], steps: int):
        self.data = Fed(steps)
        self.run = run
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self._next()  # the loop's first request for a batch

    def _run(self) -> None:
        try:
            self.run(self.data)
        except BaseException as exc:  # raised again in the benchmark's thread
            self.error = exc
            self.data.asked.put(None)

    def _next(self) -> None:
        self.data.asked.get(timeout=600)
        if self.error is not None:
            raise RuntimeError("the loop failed") from self.error

    def step(self, batch: Any) -> None:
        self.data.handed.put(batch)
        self._next()

    def finish(self) -> None:
        self.thread.join(600)
        if self.error is not None:
            raise RuntimeError("the loop failed") from self.error


def _overhead_case(tmp: Path) -> tuple[Any, Callable[[Any], None], Callable[[Fed], Trainer]]:
    """Part 1 with main()'s defaults: a batch, the bare loop's step, and the Trainer's builder."""
    d_in, classes, hidden, batch_size = 256, 10, 1024, 256
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(batch_size, d_in, generator=g), torch.randint(classes, (batch_size,), generator=g))
    bare_model = mlp(d_in, hidden, classes)
    bare_opt = torch.optim.AdamW(bare_model.parameters(), lr=1e-3)

    def bare_step(batch):
        x, y = batch
        bare_opt.zero_grad(set_to_none=True)
        F.cross_entropy(bare_model(x), y).backward()
        bare_opt.step()

    def build(data: Fed) -> Trainer:
        model = mlp(d_in, hidden, classes)
        config = TrainerConfig(
            epochs=1,
            device="cpu",
            seed=None,
            run_dir=str(tmp / "overhead"),
            telemetry=TelemetryConfig(log_every_steps=10),
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return Trainer(model, opt, data, lambda out, batch: F.cross_entropy(out, batch[1]), config)

    return batch, bare_step, build


def _pcgrad_case(tmp: Path) -> tuple[Any, Callable[[Any], None], Callable[[Fed], Trainer]]:
    """Part 2, seed 0: a batch of the default task, the naive recipe's step, and the Trainer's builder."""
    ref = build_default_task(DigitsTaskConfig(seed=0))
    batch = next(iter(ref.data))
    random.seed(0)

    def naive_step(batch):
        naive_pcgrad_step(ref.model, ref.optimizer, two_digit_loss(ref.model(batch[0]), batch))

    def build(data: Fed) -> Trainer:
        mine = build_default_task(DigitsTaskConfig(seed=0))
        config = TrainerConfig(epochs=1, device="cpu", seed=0, run_dir=str(tmp / "pcgrad"), aggregator="pcgrad")
        return Trainer(mine.model, mine.optimizer, data, mine.loss_fn, config)

    return batch, naive_step, build


@pytest.mark.parametrize("loop", ["reference", "trainer"])  # the reference first: the ratio's base
@pytest.mark.parametrize("part", ["overhead", "pcgrad"])
def test_trainer_step(benchmark, tmp_path, part, loop):
    batch, reference_step, build = (_overhead_case if part == "overhead" else _pcgrad_case)(tmp_path)
    what = "MLP, one loss, vs the bare loop" if part == "overhead" else "default task, PCGrad, vs the naive recipe"
    benchmark.group = f"trainer step: {what} (cpu, {torch.get_num_threads()} threads)"
    if loop == "reference":

        def run(data: Fed) -> None:
            for b in data:
                reference_step(b)

    else:

        def run(data: Fed) -> None:
            trainer = build(data)
            try:
                trainer.fit()
            finally:
                trainer.close()

    fed = FedLoop(run, steps=_ROUNDS + 1)
    try:
        fed.step(batch)  # warm-up: the first step (first snapshot, lazy initialisation)
        benchmark.pedantic(fed.step, args=(batch,), rounds=_ROUNDS, iterations=1)
    finally:
        fed.finish()
    median = benchmark.stats.stats.median
    _medians[(part, loop)] = median
    if loop == "trainer" and (part, "reference") in _medians:
        benchmark.extra_info["x_reference"] = median / _medians[(part, "reference")]


if __name__ == "__main__":
    main()
