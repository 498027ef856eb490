"""Each Triton kernel of the aggregation engine against the GPU's copy bandwidth (CUDA only).

    python benchmarks/triton_kernels.py                       # bf16 and fp32, K 2, 8, 32, N 1e8
    python benchmarks/triton_kernels.py --dtypes bf16 --k 8 --n 1e8,1e9
    python -m pytest benchmarks/triton_kernels.py --benchmark-only      # pytest-benchmark, bf16 K=8 N=1e8

For one K x N matrix J it times, with CUDA events (median of the repeats):

- ``copy``: ``J.clone()``, the physical reference (reads and writes J: 2 |J| bytes);
- ``gram``: G = J J^T, deterministic two-stage reduction, and ``gram-atomic`` (reads |J|);
- ``gram-rows``: the same from K separate tensors through the row table (reads |J|);
- ``combine``: w^T J into a given buffer (reads |J|, writes |J| / K);
- ``pcgrad-K*K``: the PCGrad weighting kernel alone (no bandwidth: its time is what it costs);
- ``step``: a whole PCGrad aggregation (nonfinite="propagate"), called from Python (2 reads of J);
- ``step-graph``: the same step replayed from a CUDA graph, without Python's launch overhead.

``GB/s`` is the bytes each moves over its time; ``x copy`` is that bandwidth over the copy's (for
the step, the target is >= 0.70 at K = 8, N = 1e8, bf16).

The pytest-benchmark form times each kernel above on one bf16 K x N matrix (K = 8, N = 1e8;
``TOLARIA_BENCH_K`` and ``TOLARIA_BENCH_N`` change them), wall clock around the call and a
``torch.cuda.synchronize()``; ``extra_info`` holds ``gb_s`` and ``x_copy``. Without a CUDA device
every case is skipped. No assertion on timings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable

import pytest
import torch

from tolaria.aggregation import PCGrad
from tolaria.kernels.combine import combine
from tolaria.kernels.gram import gram
from tolaria.kernels.pcgrad import pcgrad_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def time_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``fn`` between CUDA events, after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_of(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` recorded into a CUDA graph (after a warm-up on a side stream); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench_case(dtype_name: str, k: int, n: int, repeats: int) -> list[tuple[str, float, float | None]]:
    """(name, ms, bytes moved or None) for every kernel on one K x N matrix."""
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device="cuda").manual_seed(k * 7919 + n)
    j = torch.randn((k, n), generator=gen, device="cuda", dtype=dtype)
    size = j.numel() * j.element_size()
    out = torch.empty(n, dtype=dtype, device="cuda")
    weights = torch.randn(k, dtype=torch.float64, device="cuda")
    g = gram(j)
    agg = PCGrad(nonfinite="propagate")
    results = [
        ("copy", time_ms(lambda: j.clone(), repeats), 2 * size),
        ("gram", time_ms(lambda: gram(j), repeats), size),
        ("gram-atomic", time_ms(lambda: gram(j, deterministic=False), repeats), size),
    ]
    rows = [r.clone() for r in j]  # separate allocations: addressed through the row table
    results.append(("gram-rows", time_ms(lambda: gram(rows), repeats), size))
    del rows
    results.append(("combine", time_ms(lambda: combine(j, weights, out=out), repeats), size + size // k))
    results.append((f"pcgrad-{k}x{k}", time_ms(lambda: pcgrad_weights(g), repeats), None))
    results.append(("step", time_ms(lambda: agg(j, out=out), repeats), 2 * size))
    replay = graph_of(lambda: agg(j, out=out))
    results.append(("step-graph", time_ms(replay, repeats), 2 * size))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--k", default="2,8,32")
    p.add_argument("--n", default="1e8")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("triton_kernels.py needs a CUDA device", file=sys.stderr)
        return 2
    print(f"Triton kernels: torch {torch.__version__}, {torch.cuda.get_device_name()}")
    for dt in args.dtypes.split(","):
        for k in (int(x) for x in args.k.split(",")):
            for n in (int(float(x)) for x in args.n.split(",")):
                need = 3 * k * n * DTYPES[dt].itemsize
                if need > torch.cuda.mem_get_info()[0]:
                    print(f"\nskip {dt} K={k} N={n:.3g}: needs ~{need / 2**30:.1f} GiB")
                    continue
                results = bench_case(dt, k, n, args.repeats)
                copy_rate = results[0][2] / results[0][1]
                print(f"\n{dt}  K={k}  N={n:.3g}")
                print(f"{'kernel':<14} {'ms':>9} {'GB/s':>8} {'x copy':>7}")
                for name, ms, moved in results:
                    if moved is None:
                        print(f"{name:<14} {ms:>9.4f} {'':>8} {'':>7}")
                    else:
                        print(f"{name:<14} {ms:>9.4f} {moved / ms / 1e6:>8.0f} {moved / ms / copy_rate:>7.2f}")
                torch.cuda.empty_cache()
    return 0


# ---- pytest-benchmark form ----------------------------------------------------------------------

BENCH_K = int(os.environ.get("TOLARIA_BENCH_K", "8"))
BENCH_N = int(float(os.environ.get("TOLARIA_BENCH_N", "1e8")))
KERNELS = ["copy", "gram", "gram-atomic", "gram-rows", "combine", "pcgrad", "step", "step-graph"]
_rates: dict[str, float] = {}


@pytest.fixture(scope="module")
def kernel_case():
    if not torch.cuda.is_available():
        pytest.skip("triton_kernels.py needs a CUDA device")
    dtype = DTYPES["bf16"]
    gen = torch.Generator(device="cuda").manual_seed(BENCH_K * 7919 + BENCH_N)
    j = torch.randn((BENCH_K, BENCH_N), generator=gen, device="cuda", dtype=dtype)
    case = {
        "j": j,
        "out": torch.empty(BENCH_N, dtype=dtype, device="cuda"),
        "weights": torch.randn(BENCH_K, dtype=torch.float64, device="cuda"),
        "g": gram(j),
        "agg": PCGrad(nonfinite="propagate"),
    }
    yield case
    case.clear()
    torch.cuda.empty_cache()


def _kernel(case: dict, name: str) -> tuple[Callable[[], object], float | None]:
    """The call bench_case() times for ``name``, and the bytes it moves (None: not bandwidth-bound)."""
    j, out, weights, g, agg = case["j"], case["out"], case["weights"], case["g"], case["agg"]
    size = j.numel() * j.element_size()
    if name == "copy":
        return (lambda: j.clone()), 2 * size
    if name == "gram":
        return (lambda: gram(j)), size
    if name == "gram-atomic":
        return (lambda: gram(j, deterministic=False)), size
    if name == "gram-rows":
        rows = [r.clone() for r in j]  # separate allocations: addressed through the row table
        return (lambda: gram(rows)), size
    if name == "combine":
        return (lambda: combine(j, weights, out=out)), size + size // BENCH_K
    if name == "pcgrad":
        return (lambda: pcgrad_weights(g)), None
    if name == "step":
        return (lambda: agg(j, out=out)), 2 * size
    return graph_of(lambda: agg(j, out=out)), 2 * size


@pytest.mark.parametrize("name", KERNELS)  # the copy first: the ratios' base
def test_triton_kernel(benchmark, kernel_case, name):
    fn, moved = _kernel(kernel_case, name)

    def call() -> None:
        fn()
        torch.cuda.synchronize()

    benchmark.group = f"triton kernels bf16 K={BENCH_K} N={BENCH_N:.3g} ({torch.cuda.get_device_name()})"
    call()  # warm-up (compilation, autotuning)
    benchmark.pedantic(call, rounds=7, iterations=1)
    median = benchmark.stats.stats.median
    if moved is not None:
        _rates[name] = moved / median
        benchmark.extra_info["gb_s"] = _rates[name] / 1e9
        if "copy" in _rates:
            benchmark.extra_info["x_copy"] = _rates[name] / _rates["copy"]


if __name__ == "__main__":
    sys.exit(main())
