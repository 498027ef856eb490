"""Every aggregator of the family against PCGrad, interleaved in one process (the issue's target:
each Gramian aggregator within 1.5x of PCGrad's time), and against TorchJD's version where it has one.

    python benchmarks/family.py                     # K = 8, N = 4e6, float32, CPU
    python benchmarks/family.py --k 4 --n 1e6 --rounds 15
    python -m pytest benchmarks/family.py --benchmark-only          # pytest-benchmark, K = 8, N = 4e6
    TOLARIA_BENCH_N=1e6 python -m pytest benchmarks/family.py --benchmark-only -k "pcgrad or upgrad"

Each round calls PCGrad, the floor (``J.sum(0)``, one read of J) and every aggregator once, in an
order that rotates every round, so that load from elsewhere on a shared machine falls on all alike.
The figures are medians over the rounds, as ratios: time / PCGrad's, and TorchJD's time / Tolaria's.
Stateful aggregators keep their state across rounds, as in training.

The pytest-benchmark form times the same methods on one shared K x N float32 matrix (K = 8, N = 4e6;
``TOLARIA_BENCH_K`` and ``TOLARIA_BENCH_N`` change them): the floor, then for every aggregator
Tolaria's (``CONTENDERS[name].tolaria("auto")``) and TorchJD's where it has one, each benchmark its
own rounds (not interleaved). ``extra_info`` holds ``x_pcgrad`` (time / Tolaria's PCGrad's),
``x_floor`` and, for Tolaria, ``torchjd_over_tolaria``. No assertion on timings.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import pytest
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


# ---- pytest-benchmark form ----------------------------------------------------------------------

K = int(os.environ.get("TOLARIA_BENCH_K", "8"))
N = int(float(os.environ.get("TOLARIA_BENCH_N", "4e6")))
# PCGrad first (after the floor): every other aggregator's ratio needs its time.
_NAMES = ["pcgrad"] + [n for n in AGGREGATOR_NAMES if n != "pcgrad" and n in CONTENDERS and CONTENDERS[n].min_k <= K]
_CASES = [("floor", "floor")] + [(name, impl) for name in _NAMES for impl in ("tolaria", "torchjd")]
_medians: dict[tuple[str, str], float] = {}
_methods: dict[tuple[str, str], Callable[[], object] | None] = {}


@pytest.fixture(scope="module")
def family_j() -> torch.Tensor:
    return torch.randn(K, N, generator=torch.Generator().manual_seed(0))


def _method(j: torch.Tensor, name: str, impl: str) -> Callable[[], object] | None:
    """The method main() times for (name, impl); built once, so stateful aggregators keep their state."""
    if (name, impl) not in _methods:
        if name == "floor":
            _methods[(name, impl)] = lambda: j.sum(0)
        else:
            contender = CONTENDERS[name]
            agg = (
                contender.tolaria("auto")
                if impl == "tolaria"
                else _torchjd(contender.torchjd_name, contender.torchjd_kwargs, K)
            )
            _methods[(name, impl)] = None if agg is None else (lambda agg=agg: agg(j))
    return _methods[(name, impl)]


@pytest.mark.parametrize("name,impl", _CASES, ids=[f"{n}-{i}" if n != i else n for n, i in _CASES])
def test_family(benchmark, family_j, name, impl):
    fn = _method(family_j, name, impl)
    if fn is None:
        pytest.skip(f"TorchJD has no {name} here (not installed, or no such aggregator)")
    benchmark.group = f"family K={K} N={N:.3g} float32 cpu ({cpu_isa()}, {torch.get_num_threads()} threads)"
    fn()  # warm-up
    benchmark.pedantic(fn, rounds=5, iterations=1)
    median = benchmark.stats.stats.median
    _medians[(name, impl)] = median
    if ("pcgrad", "tolaria") in _medians:
        benchmark.extra_info["x_pcgrad"] = median / _medians[("pcgrad", "tolaria")]
    if ("floor", "floor") in _medians:
        benchmark.extra_info["x_floor"] = median / _medians[("floor", "floor")]
    if impl == "torchjd" and (name, "tolaria") in _medians:
        benchmark.extra_info["torchjd_over_tolaria"] = median / _medians[(name, "tolaria")]


if __name__ == "__main__":
    main()
