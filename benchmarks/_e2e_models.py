"""The end-to-end benchmarks' model and batches: a shared MLP trunk and K linear heads (CPU)."""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "BATCH",
    "CASES",
    "TRUNKS",
    "Model",
    "batches",
    "compare_on_every_case",
    "interleaved_medians_ms",
    "time_case",
    "time_step",
]

BATCH = 64
# Trunk (input width, hidden width, layers) -> about 1.0M, 2.1M, 8.4M and 25M parameters.
TRUNKS = {"1M": (256, 896, 2), "2.1M": (1024, 1024, 2), "8.4M": (2048, 2048, 2), "25M": (2048, 3072, 3)}
CASES = [("1M", 4), ("2.1M", 2), ("2.1M", 4), ("2.1M", 8), ("8.4M", 4), ("25M", 4)]


class Model(nn.Module):
    def __init__(self, trunk: str, k: int):
        super().__init__()
        d_in, hidden, layers = TRUNKS[trunk]
        torch.manual_seed(0)
        blocks: list[nn.Module] = [nn.Linear(d_in, hidden), nn.ReLU()]
        for _ in range(layers - 1):
            blocks += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.trunk = nn.Sequential(*blocks)
        self.heads = nn.ModuleList(nn.Linear(hidden, 10) for _ in range(k))
        self.d_in = d_in

    def trunk_parameters(self) -> int:
        return sum(p.numel() for p in self.trunk.parameters())


def batches(model: Model, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, model.d_in, generator=g), [torch.randint(0, 10, (BATCH,), generator=g) for _ in range(k)]


def interleaved_medians_ms(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median ms per step function after one warm-up call each; the steps run in turns, the order
    alternating every round, so that load from elsewhere falls on all of them alike."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for step in steps.values():
        step()
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def time_step(benchmark, step: Callable[[], None], medians: dict, key: tuple, base_key: tuple, ratio_name: str) -> None:
    """One pytest-benchmark measurement of ``step`` (after a warm-up call: allocations, the compiled
    kernels' first call), its median kept in ``medians[key]``, and, once the base contender's median is
    there, the base's median over this one as ``extra_info[ratio_name]``."""
    step()
    benchmark.pedantic(step, rounds=5, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: the step ran once, as a test, and nothing was timed
        return
    medians[key] = benchmark.stats.stats.median
    if key != base_key and base_key in medians:
        benchmark.extra_info[ratio_name] = medians[base_key] / medians[key]


def time_case(
    benchmark,
    make_step: Callable[[str, str, int], Callable[[], None]],
    case: tuple[str, int],
    library: str,
    base: str,
    what: str,
    medians: dict,
) -> None:
    """The scripts' pytest-benchmark case: ``library``'s step on ``case`` (trunk, K) in the group of
    ``what`` on that case, with the ratio to the ``base`` library's median (``speedup_vs_<base>``)."""
    from tolaria.aggregation import cpu_isa

    trunk, k = case
    benchmark.group = f"{what}, trunk {trunk} params, K={k}, CPU ({cpu_isa()})"
    ratio_name = f"speedup_vs_{base.replace('-', '_')}"
    time_step(benchmark, make_step(library, trunk, k), medians, (trunk, k, library), (trunk, k, base), ratio_name)


def compare_on_every_case(
    description: str, title: str, make_step: Callable[[str, str, int], Callable[[], None]], libraries: dict[str, str]
) -> None:
    """The scripts' ``main``: ``--steps`` interleaved steps of each library (``libraries``: the name
    ``make_step`` takes -> the name printed; the reference first, Tolaria second) on every case, and
    the reference's time over Tolaria's."""
    from tolaria.aggregation import cpu_isa

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    print(
        f"{title}: torch {torch.__version__}, {platform.machine()}, CPU ISA {cpu_isa()}, "
        f"{torch.get_num_threads()} threads, batch {BATCH}, float32; median of {args.steps} interleaved steps"
    )
    for trunk, k in CASES:
        steps = {library: make_step(library, trunk, k) for library in libraries}
        random.seed(0)  # Python's generator: Pytorch-PCGrad's shuffles
        medians = interleaved_medians_ms(steps, args.steps)
        (ref_name, ref), (ours_name, ours) = ((libraries[lib], medians[lib]) for lib in libraries)
        params = Model(trunk, k).trunk_parameters()
        print(
            f"  trunk {params / 1e6:5.2f}M K={k}: {ref_name} {ref:8.1f} ms  {ours_name} {ours:8.1f} ms  "
            f"speedup x{ref / ours:.2f}"
        )
