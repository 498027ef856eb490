"""Aggregation throughput, side by side: Tolaria, the naive PCGrad loop, TorchJD, and the floor.

    python benchmarks/aggregation.py --quick          # K=8, N=4e6, fp32 (the headline figure)
    python benchmarks/aggregation.py                  # the full grid (K 2..16, N 1e5..1.6e7, fp32/bf16)
    python benchmarks/aggregation.py --device cuda    # on a GPU (Triton path, plus the copy bandwidth)
    python -m pytest benchmarks/aggregation.py --benchmark-only      # pytest-benchmark, every aggregator
    TOLARIA_BENCH_N=1e6 python -m pytest benchmarks/aggregation.py --benchmark-only -k "pcgrad or upgrad"

The script is ``tolaria bench`` (see ``tolaria/bench.py`` for what each column means). The
pytest-benchmark form times, for every aggregator at K = 8, N = 4e6, float32 (``TOLARIA_BENCH_K`` and
``TOLARIA_BENCH_N`` change them), the methods ``tolaria bench`` builds on one shared matrix: the floor
(``J.sum(0)``), Tolaria's compiled path, its plain-PyTorch path, the naive loop (PCGrad) and TorchJD's
version; each benchmark's ``extra_info`` holds its time over the floor and, for Tolaria, TorchJD's
time over Tolaria's. No assertion on timings.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from tolaria.aggregation import cpu_isa
from tolaria.bench import CONTENDERS, build_methods, main

K = int(os.environ.get("TOLARIA_BENCH_K", "8"))
N = int(float(os.environ.get("TOLARIA_BENCH_N", "4e6")))
METHODS = ("floor", "torchjd", "naive-loop", "tolaria-torch", "tolaria")  # bases first: the ratios need them
_medians: dict[tuple[str, str], float] = {}
_cases: dict[str, dict] = {}


def _methods(name: str) -> dict:
    if name not in _cases:  # one matrix and one set of methods per aggregator, shared by its benchmarks
        _cases.clear()
        _cases[name] = build_methods(CONTENDERS[name], "fp32", K, N, torch.device("cpu"))[1]
    return _cases[name]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", [n for n, c in CONTENDERS.items() if c.min_k <= K])
def test_aggregation(benchmark, name, method):
    methods = _methods(name)
    if method not in methods:
        pytest.skip(f"{method} does not exist for {name} here (TorchJD not installed, or no naive loop)")
    benchmark.group = f"{name} K={K} N={N:.3g} float32 cpu ({cpu_isa()}, {torch.get_num_threads()} threads)"
    methods[method]()  # warm-up
    benchmark.pedantic(methods[method], rounds=7, iterations=1)
    median = benchmark.stats.stats.median
    _medians[(name, method)] = median
    if (name, "floor") in _medians:
        benchmark.extra_info["x_floor"] = median / _medians[(name, "floor")]
    if method == "tolaria" and (name, "torchjd") in _medians:
        benchmark.extra_info["torchjd_over_tolaria"] = _medians[(name, "torchjd")] / median


if __name__ == "__main__":
    sys.exit(main())
