"""TrimmedMean (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
Rates", the coordinate-wise trimmed mean): per coordinate, the mean of the K values less the
``trim_number`` largest and ``trim_number`` smallest.

Not a function of the Gram matrix: one coordinate-wise pass over J (compiled CPU kernel, Triton
kernel, or plain PyTorch; see :mod:`tolaria.aggregation.backends.coordinatewise`), each column's K
values sorted by a sorting network (CPU) or ``tl.sort`` (GPU) in registers, the kept ones summed in
ascending order. Every backend returns the same bits.
"""

from __future__ import annotations

from torch import Tensor

from ._coordinatewise import CoordinatewiseAggregator
from ._sources import Sources
from .backends import Backend
from .backends.coordinatewise import trimmed_mean

__all__ = ["TrimmedMean"]


class TrimmedMean(CoordinatewiseAggregator):
    """The coordinate-wise mean of the sources without the ``trim_number`` largest and smallest values.

    Args:
        trim_number: how many values are dropped at each end of every coordinate (TorchJD's argument;
            2 * trim_number in all). Needs K > 2 * trim_number sources. 0 gives the plain mean.
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.

    NaN ranks above +inf (as in ``torch.sort``), and -0 below +0: with ``nonfinite="propagate"``,
    NaN and inf values are trimmed like any extreme value, and reach the result only when they are
    among the kept ones. ``nonfinite="raise"`` raises on any, kept or not. Stats: see
    :mod:`tolaria.aggregation._coordinatewise` (``weights`` are NaN: no fixed linear combination).
    """

    promises = frozenset({"permutation"})

    def __init__(self, trim_number: int = 1, *, backend: str = "auto", nonfinite: str = "raise"):
        super().__init__(backend=backend, nonfinite=nonfinite)
        if isinstance(trim_number, bool) or not isinstance(trim_number, int) or trim_number < 0:
            raise ValueError(f"TrimmedMean trim_number must be a non-negative integer, got {trim_number!r}")
        self.trim_number = trim_number

    def _check_k(self, k: int) -> None:
        if k <= 2 * self.trim_number:
            raise ValueError(
                f"TrimmedMean(trim_number={self.trim_number}) drops {2 * self.trim_number} values per coordinate "
                f"and needs at least {2 * self.trim_number + 1} gradient sources, got {k}"
            )

    def _run(self, impl: Backend, sources: Sources, out: Tensor | None, check: bool) -> tuple[Tensor, bool | None]:
        return trimmed_mean(impl, sources, self.trim_number, out=out, check=check)

    def __repr__(self) -> str:
        return f"TrimmedMean(trim_number={self.trim_number}, backend={self.backend!r}, nonfinite={self.nonfinite!r})"
