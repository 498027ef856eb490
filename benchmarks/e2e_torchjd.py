"""One multi-task training step: TorchJD's own ``mtl_backward`` + ``jac_to_grad(UPGrad())`` against
``tolaria.compat.torchjd``'s with Tolaria's UPGrad, on the same model and batches, in the same
process, on the CPU.

    python -m pytest benchmarks/e2e_torchjd.py --benchmark-only     # pytest-benchmark, every case
    python benchmarks/e2e_torchjd.py --steps 15                      # interleaved steps, prints ratios

The model: a shared MLP trunk (about 1.0M, 2.1M, 8.4M and 25M parameters), K = 2, 4, 8 linear heads,
a batch of 64, float32, SGD (see _e2e_models.py). A step is ``zero_grad``, forward, the K losses,
the library's ``mtl_backward``, its ``jac_to_grad`` into ``.grad``, and ``step``. Tolaria's UPGrad
runs with TorchJD's regularisation (``reg_eps=norm_eps=1e-4``), so that both compute the same update.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _e2e_models import CASES, Model, batches, compare_on_every_case, time_case  # noqa: E402

LIBRARIES = ("torchjd", "tolaria")


def make_step(library: str, trunk: str, k: int) -> Callable[[], None]:
    """A closure running one training step with ``library`` ("torchjd" or "tolaria")."""
    if library == "torchjd":
        from torchjd.aggregation import UPGrad
        from torchjd.autojac import jac_to_grad, mtl_backward

        aggregator = UPGrad()
    else:
        from tolaria.aggregation import UPGrad
        from tolaria.compat.torchjd import jac_to_grad, mtl_backward

        aggregator = UPGrad(reg_eps=1e-4, norm_eps=1e-4)
    model = Model(trunk, k)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, ys = batches(model, k)
    shared = list(model.trunk.parameters())

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        features = model.trunk(x)
        losses = [F.cross_entropy(head(features), y) for head, y in zip(model.heads, ys)]
        mtl_backward(losses, features)
        jac_to_grad(shared, aggregator)
        optimizer.step()

    return step


_medians: dict[tuple[str, int, str], float] = {}


@pytest.mark.parametrize("library", LIBRARIES)  # TorchJD first: the ratios' base
@pytest.mark.parametrize("trunk,k", CASES, ids=[f"{t}-K{k}" for t, k in CASES])
def test_training_step(benchmark, trunk, k, library):
    if library == "torchjd":
        pytest.importorskip("torchjd")
    time_case(benchmark, make_step, (trunk, k), library, "torchjd", "mtl step", _medians)


def main() -> None:
    libraries = {"torchjd": "TorchJD", "tolaria": "Tolaria"}
    compare_on_every_case(__doc__.splitlines()[0], "e2e mtl step", make_step, libraries)


if __name__ == "__main__":
    main()
