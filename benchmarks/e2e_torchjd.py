"""One multi-task training step: TorchJD's own ``mtl_backward`` + ``jac_to_grad(UPGrad())`` against
``tolaria.compat.torchjd``'s with Tolaria's UPGrad, in the same process, on the CPU.

    python -m pytest benchmarks/e2e_torchjd.py --benchmark-only     # pytest-benchmark, both groups
    python benchmarks/e2e_torchjd.py --steps 30                      # interleaved steps, prints the ratio

The model: a shared trunk of about 2.1M parameters (512 -> 1024 -> 1024 -> 512, ReLU), K = 4 linear
heads, a batch of 64, float32. A step is ``zero_grad``, forward, the K losses, the backward of the
library under test, the aggregation into ``.grad``, and ``SGD.step``. Tolaria's UPGrad runs with
TorchJD's regularisation (``reg_eps=norm_eps=1e-4``) so that both compute the same update.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F

K = 4
BATCH = 64


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                                   nn.Linear(1024, 512), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(512, 10) for _ in range(K))


def make_step(library: str):
    """A closure running one training step with ``library`` ("torchjd" or "tolaria")."""
    if library == "torchjd":
        from torchjd.aggregation import UPGrad
        from torchjd.autojac import jac_to_grad, mtl_backward

        aggregator = UPGrad()
    else:
        from tolaria.aggregation import UPGrad
        from tolaria.compat.torchjd import jac_to_grad, mtl_backward

        aggregator = UPGrad(reg_eps=1e-4, norm_eps=1e-4)
    model = Model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 512, generator=g)
    ys = [torch.randint(0, 10, (BATCH,), generator=g) for _ in range(K)]
    shared = list(model.trunk.parameters())

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        features = model.trunk(x)
        losses = [F.cross_entropy(head(features), y) for head, y in zip(model.heads, ys)]
        mtl_backward(losses, features)
        jac_to_grad(shared, aggregator)
        optimizer.step()

    return step


@pytest.mark.parametrize("library", ["torchjd", "tolaria"])
def test_training_step(benchmark, library):
    if library == "torchjd":
        pytest.importorskip("torchjd")
    benchmark.group = f"mtl step, trunk 2.1M params, K={K}, CPU"
    step = make_step(library)
    step()  # warm-up: allocations, the compiled kernels' first call
    benchmark(step)


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return "unknown"
    return "avx512f" if " avx512f" in flags else "avx2" if " avx2" in flags else "neither avx512f nor avx2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = {name: make_step(name) for name in ("torchjd", "tolaria")}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(args.steps):  # interleaved, so that load from elsewhere falls on both alike
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    from tolaria.aggregation import cpu_isa

    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU flags: "
          f"{cpu_flags()}, Tolaria kernels: {cpu_isa()}, torch {torch.__version__}")
    for name, ts in times.items():
        print(f"{name:8s} median {statistics.median(ts) * 1e3:8.2f} ms   min {min(ts) * 1e3:8.2f} ms")
    ratio = statistics.median(times["torchjd"]) / statistics.median(times["tolaria"])
    print(f"TorchJD / Tolaria (median step time): {ratio:.2f}x")


if __name__ == "__main__":
    main()
