"""Every aggregator of the family against PCGrad, interleaved in one process (the issue's target:
each Gramian aggregator within 1.5x of PCGrad's time), and against TorchJD's version where it has one.

    python benchmarks/family.py                     # K = 8, N = 4e6, float32, CPU
    python benchmarks/family.py --k 4 --n 1e6 --rounds 15

Each round calls PCGrad, the floor (``J.sum(0)``, one read of J) and every aggregator once, in an
order that rotates every round, so that load from elsewhere on a shared machine falls on all alike.
The figures are medians over the rounds, as ratios: time / PCGrad's, and TorchJD's time / Tolaria's.
Stateful aggregators keep their state across rounds, as in training.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from tolaria.aggregation import AGGREGATOR_NAMES, cpu_isa
from tolaria.bench import CONTENDERS, _torchjd


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--n", type=float, default=4e6)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--no-torchjd", action="store_true", help="time Tolaria only")
    args = parser.parse_args()
    k, n = args.k, int(args.n)
    j = torch.randn(k, n, generator=torch.Generator().manual_seed(0))
    methods: dict[str, Callable[[], object]] = {"floor": lambda: j.sum(0)}
    for name in AGGREGATOR_NAMES:
        contender = CONTENDERS.get(name)
        if contender is None or k < contender.min_k:
            continue
        methods[name] = (lambda agg: lambda: agg(j))(contender.tolaria("auto"))
        reference = None if args.no_torchjd else _torchjd(contender.torchjd_name, contender.torchjd_kwargs, k)
        if reference is not None:
            methods[f"{name}/torchjd"] = (lambda agg: lambda: agg(j))(reference)
    for fn in methods.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times[name].append(_time(methods[name]))
    median = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    print(
        f"family benchmark: K={k}, N={n:.3g}, float32, torch {torch.__version__}, {platform.machine()}, "
        f"CPU ISA {cpu_isa()}, {torch.get_num_threads()} threads, median of {args.rounds} rotated rounds"
    )
    print(f"floor (J.sum(0)): {median['floor']:.2f} ms; PCGrad: {median['pcgrad']:.2f} ms")
    print(f"{'aggregator':14s} {'ms':>8s} {'/ PCGrad':>9s} {'TorchJD ms':>11s} {'TorchJD / Tolaria':>18s}")
    for name in names:
        if name == "floor" or name.endswith("/torchjd"):
            continue
        ref = median.get(f"{name}/torchjd")
        ref_text = f"{ref:11.1f} {ref / median[name]:17.1f}x" if ref is not None else f"{'-':>11s} {'-':>18s}"
        print(f"{name:14s} {median[name]:8.2f} {median[name] / median['pcgrad']:9.2f} {ref_text}")


if __name__ == "__main__":
    main()
