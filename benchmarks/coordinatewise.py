"""GradDrop and TrimmedMean against TorchJD's, in one process (pytest-benchmark).

    python -m pytest benchmarks/coordinatewise.py -s          # K=8, N=4e6, float32, CPU
    TOLARIA_BENCH_N=1e6 python -m pytest benchmarks/coordinatewise.py -s

For one K x N float32 matrix on the CPU it times Tolaria's compiled path (``cpu``), its plain-PyTorch
path (``torch``) and TorchJD 0.18's class, each with pytest-benchmark (median of the rounds), and
prints each method's time over TorchJD's (< 1: faster than TorchJD); the ratios are also stored in
each benchmark's ``extra_info["x_torchjd"]``. No assertion on timings.
"""

from __future__ import annotations

import os

import pytest
import torch

from tolaria.aggregation import cpu_isa
from tolaria.aggregation.graddrop import GradDrop
from tolaria.aggregation.trimmed_mean import TrimmedMean

K = int(os.environ.get("TOLARIA_BENCH_K", "8"))
N = int(float(os.environ.get("TOLARIA_BENCH_N", "4e6")))
TRIM = 2

tjd = pytest.importorskip("torchjd.aggregation")

_medians: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module")
def grads() -> torch.Tensor:
    return torch.randn((K, N), generator=torch.Generator().manual_seed(0), dtype=torch.float32)


def _contenders(name: str):
    if name == "graddrop":
        return {
            "torchjd": tjd.GradDrop(),
            "cpu": GradDrop(seed=0, backend="cpu", nonfinite="propagate"),
            "cpu-checked": GradDrop(seed=0, backend="cpu"),
            "torch": GradDrop(seed=0, backend="torch", nonfinite="propagate"),
        }
    return {
        "torchjd": tjd.TrimmedMean(TRIM),
        "cpu": TrimmedMean(TRIM, backend="cpu", nonfinite="propagate"),
        "cpu-checked": TrimmedMean(TRIM, backend="cpu"),
        "torch": TrimmedMean(TRIM, backend="torch", nonfinite="propagate"),
    }


@pytest.mark.parametrize("method", ["torchjd", "cpu", "cpu-checked", "torch"])  # TorchJD first: the ratios' base
@pytest.mark.parametrize("name", ["graddrop", "trimmed_mean"])
def test_coordinatewise(benchmark, grads, name, method):
    aggregate = _contenders(name)[method]
    benchmark.group = f"{name} K={K} N={N:.3g} float32 cpu ({cpu_isa()}, {torch.get_num_threads()} threads)"
    benchmark.pedantic(aggregate, args=(grads,), rounds=5, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    _medians[(name, method)] = median
    base = _medians.get((name, "torchjd"))
    if base is not None:
        benchmark.extra_info["x_torchjd"] = median / base


def teardown_module(module):
    header = (
        f"\ncoordinate-wise aggregators, K={K}, N={N:.3g}, float32, CPU ISA {cpu_isa()}, "
        f"{torch.get_num_threads()} threads: median ms and time / TorchJD's"
    )
    lines = [header]
    for (name, method), median in _medians.items():
        base = _medians.get((name, "torchjd"))
        ratio = f"{median / base:6.3f}" if base else "   n/a"
        lines.append(f"  {name:13s} {method:12s} {median * 1e3:9.2f} ms   x{ratio}")
    print("\n".join(lines))
