"""The base of the aggregators that are not functions of the Gram matrix: one pass over J.

GradDrop and TrimmedMean map every column of the K x N matrix J on its own, with a rule no K x K
matrix can express, so they skip the engine's gram -> weighting -> combine steps: their ``_aggregate``
picks the backend with :func:`tolaria.aggregation.engine.select_backend` as every aggregator does, and
runs one coordinate-wise pass there (:mod:`tolaria.aggregation.backends.coordinatewise`). Everything
else behaves as for the others: inputs, dtype and device, ``out=``, ``backend=``, ``nonfinite=``.

- ``nonfinite="raise"``: the pass itself reports whether some input value was NaN or inf (no extra
  read of J; one flag read on the host); only then is G computed, to name the sources (its diagonal).
- ``return_stats=True``: G is computed through the backend (one more pass over J, paid only when
  stats are asked), so ``norms``, ``cosine`` and ``gram`` are the usual ones. ``weights`` is K NaNs:
  the result is not a fixed linear combination of the sources (each coordinate keeps its own subset),
  so there are no honest weights to report. ``conflicts`` is 0: no projection is applied.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._sources import Sources, check_out
from .aggregator import Aggregator
from .backends import Backend
from .engine import Weights, has_float64, raise_if_nonfinite, select_backend
from .stats import AggregationStats, stats_from_gram

__all__ = ["CoordinatewiseAggregator"]


class CoordinatewiseAggregator(Aggregator):
    """An aggregator computed column by column in one pass over J (see the module docstring)."""

    weighted = False  # no K weights: the stats' weights are NaN

    def weighting(self, gram: Tensor) -> Weights:
        raise TypeError(
            f"{type(self).__name__} is not a function of the Gram matrix: it has no weighting; call it on the gradients"
        )

    def _run(self, impl: Backend, sources: Sources, out: Tensor | None, check: bool) -> tuple[Tensor, bool | None]:
        """The pass: the flat result and, with ``check``, whether every input value was finite."""
        raise NotImplementedError

    def _aggregate(
        self, sources: Sources, out: Tensor | None, with_stats: bool
    ) -> tuple[Tensor, AggregationStats | None]:
        impl = select_backend(self.backend, sources)
        if out is not None:
            check_out(out, sources)
        check = self.nonfinite == "raise"
        flat, finite = self._run(impl, sources, out, check)
        gram = None
        if check and not finite:
            gram = impl.gram(sources)
            raise_if_nonfinite(gram)  # names the sources whose squared norms are not finite
        if not with_stats:
            return flat, None
        gram = impl.gram(sources) if gram is None else gram
        gram = gram.to(torch.float64) if has_float64(gram.device) else gram
        weights = torch.full((sources.k,), float("nan"), dtype=gram.dtype, device=gram.device)
        conflicts = torch.zeros((), dtype=torch.int64, device=gram.device)
        return flat, stats_from_gram(gram, weights, conflicts)
