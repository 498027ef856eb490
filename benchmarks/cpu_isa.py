"""The compiled CPU engine at every ISA level this CPU runs, interleaved in one process.

    python benchmarks/cpu_isa.py            # N = 4e6: K = 2, 4, 8, 16 fp32 and K = 8 bf16, every level
    python benchmarks/cpu_isa.py --rounds 15
    python -m pytest benchmarks/cpu_isa.py --benchmark-only       # pytest-benchmark: K = 8, N = 4e6, fp32
    TOLARIA_BENCH_N=1e6 python -m pytest benchmarks/cpu_isa.py --benchmark-only

For each case it times, in turns (one call of each method per round, so drift on a shared machine
hits all alike): the floor (one read of J, ``J.sum(0)`` in J's dtype), Tolaria's PCGrad at each ISA
level (forced with ``set_cpu_isa``, as ``TOLARIA_CPU_ISA`` does), and at K = 8 fp32 TorchJD's PCGrad
(when installed) and the naive pairwise loop. It then times PCGrad right after a torch op against
the same call after a 50 ms pause (torch's OpenMP workers spin for a while after each op; a pass that
fights them for the cores pays for it). Ratios, not times, are the figures to compare.

The pytest-benchmark form times, on one K x N float32 matrix (K = 8, N = 4e6; ``TOLARIA_BENCH_K`` and
``TOLARIA_BENCH_N`` change them), the floor and Tolaria's PCGrad at each ISA level this CPU runs (each
benchmark its own rounds, not interleaved); ``extra_info`` holds ``x_floor`` and ``x_widest`` (time
over the widest level's). The widest level is set again afterwards. No assertion on timings.
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

from tolaria.aggregation import PCGrad, cpu_isa, set_cpu_isa, supported_cpu_isas
from tolaria.bench import naive_pcgrad

try:
    from torchjd.aggregation import PCGrad as TorchJDPCGrad
except ImportError:  # TorchJD is the `bench` extra
    TorchJDPCGrad = None

N = 4_000_000
CASES = [("fp32", 2), ("fp32", 4), ("fp32", 8), ("fp32", 16), ("bf16", 8)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _at_level(level: str, fn: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        set_cpu_isa(level)
        return fn()

    return call


def _interleaved(methods: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median ms per method; the order of the methods rotates every round, so that whatever the
    method before costs the next one (torch's workers after the floor, the allocator's state) is
    shared by all alike."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():
        fn()  # warm-up: allocator, caches, lazy initialisation
    names = list(methods)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = methods[name]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def _after_op(level: str, j: torch.Tensor, rounds: int) -> tuple[float, float]:
    """PCGrad right after a torch op, as a multiple of the same call after a 50 ms pause and of
    the same call right after another PCGrad call."""
    set_cpu_isa(level)
    pcgrad = PCGrad(shuffle=False)
    after_op, after_idle, after_self = [], [], []
    for _ in range(rounds):
        j.sum(0)  # torch's workers are still spinning when the next call starts
        start = time.perf_counter()
        pcgrad(j)
        after_op.append(time.perf_counter() - start)
        time.sleep(0.05)
        start = time.perf_counter()
        pcgrad(j)
        after_idle.append(time.perf_counter() - start)
        start = time.perf_counter()
        pcgrad(j)
        after_self.append(time.perf_counter() - start)
    op = statistics.median(after_op)
    return op / statistics.median(after_idle), op / statistics.median(after_self)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=11, help="timed rounds per case (median reported)")
    p.add_argument("--n", type=float, default=N, help="elements per source")
    args = p.parse_args(argv)
    n = int(args.n)
    levels = supported_cpu_isas()
    default = cpu_isa()
    print(
        f"cpu_isa benchmark: torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
        f"levels {', '.join(levels)} (default {default}), N = {n:.3g}, median of {args.rounds} interleaved rounds"
    )
    gen = torch.Generator().manual_seed(0)
    for dtype_name, k in CASES:
        j = torch.randn(k, n, generator=gen).to(DTYPES[dtype_name])
        pcgrad = PCGrad(shuffle=False)
        methods: dict[str, Callable[[], object]] = {"floor": lambda j=j: j.sum(0)}
        for level in levels:
            methods[f"tolaria[{level}]"] = _at_level(level, lambda j=j: pcgrad(j))
        if dtype_name == "fp32" and k == 8:
            if TorchJDPCGrad is not None:
                torchjd = TorchJDPCGrad()
                methods["torchjd"] = lambda j=j: torchjd(j)
            methods["naive-loop"] = lambda j=j: naive_pcgrad(j)
        ms = _interleaved(methods, args.rounds if "naive-loop" not in methods else max(3, args.rounds // 3))
        print(f"\nPCGrad {dtype_name} K={k} N={n:.3g}")
        print(f"{'method':<18} {'ms':>9} {'x floor':>8}  {'vs torchjd':>10} {'vs naive':>9}")
        for name, t in ms.items():
            extra = ""
            if name.startswith("tolaria") and "torchjd" in ms:
                extra = f"  {ms['torchjd'] / t:>9.2f}x {ms['naive-loop'] / t:>8.1f}x"
            print(f"{name:<18} {t:>9.3f} {t / ms['floor']:>8.2f}{extra}")
        del j
    j = torch.randn(8, n, generator=gen)
    print("\nPCGrad fp32 K=8 right after a torch op, as a multiple of the same call after a 50 ms pause,")
    print("and after another PCGrad call")
    for level in levels:
        idle, steady = _after_op(level, j, args.rounds)
        print(f"tolaria[{level}]    {idle:.3f}x    {steady:.3f}x")
    set_cpu_isa(default)
    return 0


# ---- pytest-benchmark form ----------------------------------------------------------------------

BENCH_K = int(os.environ.get("TOLARIA_BENCH_K", "8"))
BENCH_N = int(float(os.environ.get("TOLARIA_BENCH_N", str(N))))
_LEVELS = list(supported_cpu_isas())  # widest first
_medians: dict[str, float] = {}


@pytest.fixture(scope="module")
def isa_case():
    """One fp32 matrix and one PCGrad shared by every level; the widest level is set again afterwards."""
    j = torch.randn(BENCH_K, BENCH_N, generator=torch.Generator().manual_seed(0))
    try:
        yield j, PCGrad(shuffle=False)
    finally:
        set_cpu_isa(_LEVELS[0])


@pytest.mark.parametrize("level", ["floor", *_LEVELS])  # the floor and the widest level first: the ratios' bases
def test_cpu_isa(benchmark, isa_case, level):
    j, pcgrad = isa_case
    fn = (lambda: j.sum(0)) if level == "floor" else _at_level(level, lambda: pcgrad(j))
    benchmark.group = (
        f"PCGrad K={BENCH_K} N={BENCH_N:.3g} float32 cpu by ISA level "
        f"(widest {_LEVELS[0]}, {torch.get_num_threads()} threads)"
    )
    try:
        fn()  # warm-up
        benchmark.pedantic(fn, rounds=7, iterations=1)
    finally:
        set_cpu_isa(_LEVELS[0])
    median = benchmark.stats.stats.median
    _medians[level] = median
    if "floor" in _medians:
        benchmark.extra_info["x_floor"] = median / _medians["floor"]
    if _LEVELS[0] in _medians:
        benchmark.extra_info["x_widest"] = median / _medians[_LEVELS[0]]


if __name__ == "__main__":
    raise SystemExit(main())
