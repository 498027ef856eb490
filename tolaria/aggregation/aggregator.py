"""The base class of every aggregator: validate the input, run the engine, shape the output."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._sources import Sources, as_sources
from .engine import Weights, aggregate, check_backend_name, check_nonfinite_mode
from .stats import AggregationStats

__all__ = ["Aggregator"]


class Aggregator(ABC):
    """Maps K gradients to one: ``aggregator(grads) -> Tensor`` of the per-source shape.

    ``grads`` is a K x N tensor, a K x (any shape) tensor, or a sequence of K tensors of one shape.
    The result has the inputs' dtype and device. ``return_stats=True`` returns ``(result, stats)``
    with :class:`AggregationStats` read off the Gram matrix; ``out=`` receives the result in place
    (a contiguous tensor of N elements, e.g. the flat buffer behind the parameters' ``.grad``).

    Args:
        backend: ``"auto"`` (Triton on CUDA, the compiled CPU path on CPU), ``"cpu"``, ``"torch"``
            or ``"triton"``.
        nonfinite: ``"raise"`` (default) raises ``ValueError`` naming the sources that hold NaN or
            inf, which reads K values on the host; ``"propagate"`` skips the check so that nothing
            synchronises the device, and non-finite values flow into the result.
    """

    def __init__(self, *, backend: str = "auto", nonfinite: str = "raise"):
        self.backend = check_backend_name(backend)
        self.nonfinite = check_nonfinite_mode(nonfinite)

    @abstractmethod
    def weighting(self, gram: Tensor) -> Weights:
        """The K combination weights (and the conflicts resolved) from the K x K Gram matrix."""

    def __call__(
        self,
        grads: Tensor | Sequence[Tensor],
        *,
        return_stats: bool = False,
        out: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, AggregationStats]:
        sources = as_sources(grads)
        self._check_k(sources.k)
        flat, stats = self._aggregate(sources, out, return_stats)
        result = flat.view(sources.shape) if out is None else out
        return (result, stats) if return_stats else result

    def _aggregate(
        self, sources: Sources, out: Tensor | None, with_stats: bool
    ) -> tuple[Tensor, AggregationStats | None]:
        """The flat result (and its stats): the engine's three steps. Aggregators that are not
        "weights from G, then one weighted sum" (coordinate-wise ones, ExcessMTL) override this."""
        return aggregate(
            sources,
            self.weighting,
            backend=self.backend,
            nonfinite=self.nonfinite,
            out=out,
            with_stats=with_stats,
            fixed_weights=self._fixed_weights,
            wide_combine=self.wide_combine,
        )

    def check_sources(self, k: int) -> None:
        """Raises ``ValueError`` saying why, if this aggregator cannot combine ``k`` sources (Krum
        needs n_byzantine + 3, TrimmedMean 2 trim_number + 1, per-source weights exactly K)."""
        self._check_k(k)

    def _check_k(self, k: int) -> None:  # noqa: B027 - a hook: most aggregators take any K
        """Hook for aggregators whose configuration fixes K (e.g. per-source weights)."""

    # Aggregators that promise a result conflicting with no source set this: their weights can cancel
    # (a result far shorter than sum_i |w_i| |g_i|, e.g. near a Pareto-stationary point), where a
    # float32 accumulation's rounding, amplified by that ratio, would break the promise. Their combine
    # accumulates in float64 and rounds once to the sources' dtype.
    wide_combine: bool = False

    # Whether the result is w^T J for the weights in the stats. Coordinate-wise aggregators (GradDrop,
    # TrimmedMean) are not: their stats hold NaN weights, and the trainer reads the result's norm.
    weighted: bool = True

    # Aggregators whose weights do not depend on the Gram matrix set this to a function
    # (k, device) -> K float64 weights; calls without stats then read J only once.
    _fixed_weights: Callable[[int, torch.device], Tensor] | None = None

    # Aggregators whose result depends on earlier calls (moving averages, warm starts, their own
    # random generator) set ``stateful`` and override the three methods below. The trainer saves
    # ``state_dict()`` in its checkpoints and rollback snapshots, so a resumed run repeats the same
    # weights bit for bit. A state dict holds only what ``torch.load(weights_only=True)`` accepts:
    # CPU tensors, numbers, strings, None, and lists/dicts of them.
    stateful: bool = False

    # The properties this class promises, as TorchJD documents its aggregators'; the property suite
    # (tests/aggregation/test_property_suite.py) holds every registered class to its own set over
    # every input family: "non_conflicting" (no source has a negative inner product with the result),
    # "permutation" (invariant under reordering the sources), "linear" (scaling J scales the result),
    # "zero_if_stationary" (0 where 0 is in the sources' convex hull, the strongly stationary case),
    # "strongly_stationary" (nonzero unless strongly stationary); "solvable:<property>" holds only
    # where the weighting's equation has a solution. Stateful ones: of one call from a fresh state.
    promises: frozenset[str] = frozenset()

    def gramian_weighting(self, gramian: Tensor) -> Tensor:
        """TorchJD's call shape: the K weights from the K x K Gramian, as one tensor in the
        Gramian's dtype and on its device (:meth:`weighting` returns them in float64, with the
        number of conflicts resolved). For a stateful aggregator this is a step, as a call is."""
        if not isinstance(gramian, Tensor) or gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1]:
            raise ValueError(f"gramian_weighting needs a K x K matrix, got {getattr(gramian, 'shape', gramian)!r}")
        work = gramian.to(torch.float64) if gramian.device.type != "mps" else gramian
        return self.weighting(work).weights.to(dtype=gramian.dtype)

    @classmethod
    def takes_generator(cls) -> bool:
        """Whether the aggregator draws random numbers from a ``generator`` its constructor accepts
        (the trainer then gives it one seeded alike on every rank, and checkpoints its state)."""
        return "generator" in inspect.signature(cls.__init__).parameters

    def state_dict(self) -> dict[str, Any]:
        """What the next call's weights depend on besides its input (empty for a stateless aggregator)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned, so that the next calls repeat the saved run's."""
        if not isinstance(state, dict):
            raise TypeError(f"{type(self).__name__}.load_state_dict needs a dict, got {type(state).__name__}")
        if state:
            raise ValueError(
                f"{type(self).__name__} keeps no state across calls, but was given a state with keys "
                f"{sorted(state)}: was it saved by another aggregator?"
            )

    def reset(self) -> None:  # noqa: B027 - stateless aggregators have nothing to forget
        """Forgets the state of earlier calls; the next call starts as the first did. A stateless
        aggregator has nothing to forget."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r}, nonfinite={self.nonfinite!r})"
