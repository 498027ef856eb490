"""One multi-task training step: Pytorch-PCGrad's ``PCGrad(optimizer).pc_backward(losses)`` against
``tolaria.compat.pcgrad``'s, on the same model and batches, in the same process, on the CPU.

    python -m pytest benchmarks/e2e_pcgrad.py --benchmark-only       # pytest-benchmark, every case
    python benchmarks/e2e_pcgrad.py --steps 20                        # interleaved steps, prints ratios

The model: a shared MLP trunk (about 1.0M, 2.1M, 8.4M and 25M parameters), K = 2, 4, 8
linear heads of 10 classes, a batch of 64, float32, Adam. A step is the wrapper's ``zero_grad``,
forward, the K losses, ``pc_backward`` and ``step``. Pytorch-PCGrad is not on PyPI: its algorithm
runs as the plain reimplementation the tests check Tolaria against (tests/compat/reference_pcgrad.py).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from tolaria.compat.pcgrad import PCGrad

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tests' reference
from _e2e_models import CASES, Model, batches, compare_on_every_case, time_case  # noqa: E402
from compat.reference_pcgrad import ReferencePCGrad  # noqa: E402


def make_step(library: str, trunk: str, k: int) -> Callable[[], None]:
    model = Model(trunk, k)
    wrapper = (ReferencePCGrad if library == "pytorch-pcgrad" else PCGrad)(
        torch.optim.Adam(model.parameters(), lr=1e-4)
    )
    x, ys = batches(model, k)

    def step() -> None:
        wrapper._optim.zero_grad(set_to_none=True)
        features = model.trunk(x)
        wrapper.pc_backward([F.cross_entropy(head(features), y) for head, y in zip(model.heads, ys)])
        wrapper.step()

    return step


_medians: dict[tuple[str, int, str], float] = {}


@pytest.mark.parametrize("library", ["pytorch-pcgrad", "tolaria"])  # the original first: the ratios' base
@pytest.mark.parametrize("trunk,k", CASES, ids=[f"{t}-K{k}" for t, k in CASES])
def test_training_step(benchmark, trunk, k, library):
    random.seed(0)  # Pytorch-PCGrad shuffles with Python's generator
    time_case(benchmark, make_step, (trunk, k), library, "pytorch-pcgrad", "pcgrad step", _medians)


def main() -> None:
    libraries = {"pytorch-pcgrad": "Pytorch-PCGrad", "tolaria": "Tolaria"}
    compare_on_every_case(__doc__.splitlines()[0], "e2e PCGrad step", make_step, libraries)


if __name__ == "__main__":
    main()
