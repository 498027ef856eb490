"""The aggregation on column shards: every rank holds J_r, its K x n_r block of J's columns.

The Gram-space design needs one global quantity only, the K x K matrix G = sum_r J_r J_r^T:

1. ``gram``: the partial G_r on the local shard (the backend's own pass), in float64;
2. one ``reduce_sum`` of G over the ranks (K^2 numbers; an all-reduce, given by the caller so that
   this package does not depend on :mod:`tolaria.distributed`);
3. ``weighting``: the K weights from the global G, on every rank;
4. ``combine``: out_r = w^T J_r, this rank's shard of the aggregate.

Every rank runs the same weighting on the same G. G is bitwise the same on every rank because an
all-reduce hands one result to all of them (gloo's and NCCL's ring and tree algorithms copy the
reduced chunks out; the replicated mode relies on the same for the whole buffer), and a weighting is a
deterministic function of G and of state every rank updated alike (a generator seeded alike, moving
averages of G). The multi-rank tests check the weights and the parameters bit for bit across ranks.

Non-finite values: a NaN or inf on one rank's shard reaches its G_r's diagonal, and the reduce
carries it into every rank's G, so ``nonfinite="raise"`` raises on every rank and the stats (norms,
cosines: from the global G) show it on every rank.

The families:

- Gramian aggregators (every aggregator whose result is w^T J for weights from G): as above.
- Coordinate-wise ones: TrimmedMean maps each column on its own, so it runs unchanged on the shard.
  GradDrop draws its uniforms from a hash of the global column index, so each shard says where its
  columns sit in J (``columns``) and draws the single-process uniforms for them. It runs the torch
  arithmetic of :mod:`~tolaria.aggregation.backends.coordinatewise` (the same decisions bit for bit as
  the compiled and Triton kernels, which index columns from 0). G is reduced when stats are asked or
  ``nonfinite="raise"`` (one more pass over the shard: the check must agree on every rank).
- ExcessMTL: its K x N state is sharded with J (K x n_r per rank); its excess risks, sums over
  columns, take one more ``reduce_sum`` of K numbers.

Anything else that is not a function of G refuses, by name (:func:`check_shardable`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._coordinatewise import CoordinatewiseAggregator
from ._gramian import conflicting_pairs
from ._sources import Sources, check_out
from .aggregator import Aggregator
from .backends import Backend
from .backends.base import accumulation_dtype
from .backends.coordinatewise import graddrop_uniforms, trimmed_mean
from .engine import Weights, has_float64, raise_if_nonfinite, select_backend
from .excess_mtl import ExcessMTL
from .graddrop import GradDrop
from .stats import AggregationStats, stats_from_gram
from .trimmed_mean import TrimmedMean

__all__ = ["ReduceSum", "check_shardable", "column_ranges", "sharded_aggregate"]

# Sums a small tensor (the K x K Gram matrix, K excess risks) over the ranks, in place.
ReduceSum = Callable[[Tensor], None]

_GRADDROP_CHUNK = 1 << 16  # columns per step: the K x chunk temporaries stay a few MiB


def check_shardable(aggregator: object) -> None:
    """Raises ``ValueError`` (``TypeError`` for a foreign callable) naming ``aggregator`` if it cannot
    aggregate column shards: an aggregator that is not a function of G and not one of the coordinate-wise
    ones or ExcessMTL, GradDrop with a Python ``f`` (it sees P whole), or any foreign callable."""
    if not isinstance(aggregator, Aggregator):
        raise TypeError(
            f"a sharded aggregation needs a Tolaria aggregator, got {type(aggregator).__name__}: a foreign "
            "callable maps the whole K x N matrix, which no rank holds; use sharding='none' for it"
        )
    name = type(aggregator).__name__
    if isinstance(aggregator, GradDrop) and aggregator.f is not None:
        raise ValueError(
            f"GradDrop(f={aggregator.f!r}) cannot run on column shards: its f sees P over all N columns at once. "
            "Use f=None (the identity), or sharding='none'"
        )
    if isinstance(aggregator, (GradDrop, TrimmedMean, ExcessMTL)):
        return
    if isinstance(aggregator, CoordinatewiseAggregator) or type(aggregator)._aggregate is not Aggregator._aggregate:
        raise ValueError(
            f"{name} is not a function of the Gram matrix and has no sharded form: it cannot aggregate column "
            "shards; use sharding='none' for it"
        )


def column_ranges(columns: int | Sequence[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """``columns`` as ``(global_start, length)`` ranges covering the shard's ``n`` columns in order: an
    int is the global index of the shard's first column (one range)."""
    if isinstance(columns, bool):
        raise TypeError("columns must be an int offset or a sequence of (start, length) ranges, got a bool")
    if isinstance(columns, int):
        if columns < 0:
            raise ValueError(f"columns (the shard's first global column) must be >= 0, got {columns}")
        return [(columns, n)] if n else []
    ranges = [(int(start), int(length)) for start, length in columns]
    if any(start < 0 or length < 0 for start, length in ranges) or sum(length for _, length in ranges) != n:
        raise ValueError(f"columns {ranges} must be non-negative (start, length) ranges covering the shard's {n}")
    return ranges


def sharded_aggregate(
    aggregator: Aggregator,
    shard: Tensor,
    *,
    reduce_sum: ReduceSum,
    columns: int | Sequence[tuple[int, int]] = 0,
    out: Tensor | None = None,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, AggregationStats]:
    """This rank's shard of ``aggregator``'s result on J, given its columns ``shard`` (K x n_r).

    Every rank must call it at the same point with the same aggregator (same options, same state):
    the number of ``reduce_sum`` calls depends only on those and on ``return_stats``. ``columns`` places
    the shard in J (only GradDrop reads it). The stats are the global ones, the same on every rank.
    """
    check_shardable(aggregator)
    if not isinstance(shard, Tensor) or shard.dim() != 2 or shard.shape[0] == 0:
        raise ValueError(f"shard must be a K x n_r tensor with K >= 1, got {getattr(shard, 'shape', shard)!r}")
    aggregator.check_sources(shard.shape[0])
    sources = Sources(None, shard, torch.Size([shard.shape[1]]))
    if out is not None:
        check_out(out, sources)
    if isinstance(aggregator, ExcessMTL):
        flat, stats = _excess_mtl(aggregator, sources, reduce_sum, out, return_stats)
    elif isinstance(aggregator, CoordinatewiseAggregator):
        flat, stats = _coordinatewise(aggregator, sources, reduce_sum, columns, out, return_stats)
    else:
        flat, stats = _gramian(aggregator, aggregator.weighting, sources, reduce_sum, out, return_stats)
    result = flat if out is None else out
    return (result, stats) if return_stats else result


# ---- the pieces --------------------------------------------------------------------------------------


def _backend(aggregator: Aggregator, sources: Sources) -> Backend | None:
    """The backend for the shard; None for a shard without columns (a rank FSDP gave no rows)."""
    return select_backend(aggregator.backend, sources) if sources.n else None


def _global_gram(impl: Backend | None, sources: Sources, reduce_sum: ReduceSum) -> Tensor:
    """G = sum over ranks of J_r J_r^T, float64 (where the device has it), the same on every rank."""
    dtype = torch.float64 if has_float64(sources.device) else torch.float32
    if impl is None:
        gram = torch.zeros((sources.k, sources.k), dtype=dtype, device=sources.device)
    else:
        gram = impl.gram(sources).to(dtype).contiguous()
    reduce_sum(gram)
    return gram


def _empty(sources: Sources, out: Tensor | None) -> Tensor:
    return torch.empty(0, dtype=sources.dtype, device=sources.device) if out is None else out.view(-1)


def _gramian(
    aggregator: Aggregator,
    weighting: Callable[[Tensor], Weights],
    sources: Sources,
    reduce_sum: ReduceSum,
    out: Tensor | None,
    with_stats: bool,
) -> tuple[Tensor, AggregationStats | None]:
    impl = _backend(aggregator, sources)
    fixed = aggregator._fixed_weights
    if fixed is not None and not with_stats and aggregator.nonfinite == "propagate":
        # Weights that ignore G, no check, no stats: nothing global is needed, no collective.
        weights = fixed(sources.k, sources.device)
        return (impl.combine(sources, weights, out) if impl else _empty(sources, out)), None
    gram = _global_gram(impl, sources, reduce_sum)
    if aggregator.nonfinite == "raise":
        raise_if_nonfinite(gram)  # every rank holds the same G: every rank raises alike
    weights, conflicts = weighting(gram)
    flat = impl.combine(sources, weights, out, wide=aggregator.wide_combine) if impl else _empty(sources, out)
    return flat, stats_from_gram(gram, weights, conflicts) if with_stats else None


def _coordinatewise(
    aggregator: CoordinatewiseAggregator,
    sources: Sources,
    reduce_sum: ReduceSum,
    columns: int | Sequence[tuple[int, int]],
    out: Tensor | None,
    with_stats: bool,
) -> tuple[Tensor, AggregationStats | None]:
    impl = _backend(aggregator, sources)
    if isinstance(aggregator, GradDrop):
        ranges = column_ranges(columns, sources.n)
        keys = aggregator.draw_keys()  # every rank draws: the generators stay in step
        flat = _graddrop_shard(sources, keys, aggregator.leak, ranges, out)
    elif impl is None:
        flat = _empty(sources, out)
    else:
        assert isinstance(aggregator, TrimmedMean)
        flat, _ = trimmed_mean(impl, sources, aggregator.trim_number, out=out, check=False)
    check = aggregator.nonfinite == "raise"
    if not (check or with_stats):
        return flat, None
    gram = _global_gram(impl, sources, reduce_sum)  # a local finiteness flag would differ between ranks
    if check:
        raise_if_nonfinite(gram)
    if not with_stats:
        return flat, None
    weights = torch.full((sources.k,), float("nan"), dtype=gram.dtype, device=gram.device)
    return flat, stats_from_gram(gram, weights, torch.zeros((), dtype=torch.int64, device=gram.device))


def _graddrop_shard(
    sources: Sources, keys: tuple[int, int], leak: Tensor | None, ranges: list[tuple[int, int]], out: Tensor | None
) -> Tensor:
    """GradDrop's arithmetic (backends/coordinatewise.py, the torch reference) on the shard, with the
    uniforms of the global columns ``ranges``: the single-process decisions for these columns."""
    j = sources.matrix
    acc_dtype = accumulation_dtype(sources.dtype)
    flat = torch.empty(sources.n, dtype=sources.dtype, device=sources.device) if out is None else out.view(-1)
    lk = None if leak is None else leak.to(device=j.device, dtype=acc_dtype)
    local = 0
    for start, length in ranges:
        for offset in range(0, length, _GRADDROP_CHUNK):
            width = min(_GRADDROP_CHUNK, length - offset)
            x = j[:, local + offset : local + offset + width].to(acc_dtype)
            s = torch.zeros(width, dtype=acc_dtype, device=j.device)
            a = torch.zeros_like(s)
            for row in x:  # row order, as the kernels
                s = s + row
                a = a + row.abs()
            u = graddrop_uniforms(keys, start + offset, start + offset + width, device=j.device, dtype=acc_dtype)
            thr = (u * 2 - 1) * a
            up, down = s > thr, s < thr
            acc = torch.zeros_like(s)
            for i, row in enumerate(x):
                keep = ((row > 0) & up) | ((row < 0) & down)
                coef = keep.to(acc_dtype) if lk is None else torch.where(keep, 1.0, lk[i]).to(acc_dtype)
                acc = acc + coef * row
            flat[local + offset : local + offset + width] = acc
        local += length
    return flat


def _excess_mtl(
    aggregator: ExcessMTL, sources: Sources, reduce_sum: ReduceSum, out: Tensor | None, with_stats: bool
) -> tuple[Tensor, AggregationStats | None]:
    """ExcessMTL's ``_aggregate`` on a shard: its state S is this rank's K x n_r block, and the
    excess risks (sums over all N columns) take one ``reduce_sum``."""
    if with_stats or aggregator.nonfinite == "raise":

        def weighting(gram: Tensor) -> Weights:
            if aggregator.nonfinite == "propagate" and not bool(torch.isfinite(gram).all()):
                return Weights(torch.full_like(gram.diagonal(), torch.nan), conflicting_pairs(gram))
            return Weights(aggregator._step(sources, gram.dtype, reduce_sum=reduce_sum), conflicting_pairs(gram))

        return _gramian(aggregator, weighting, sources, reduce_sum, out, with_stats)
    dtype = torch.float64 if has_float64(sources.device) else torch.float32
    weights = aggregator._step(sources, dtype, reduce_sum=reduce_sum)
    impl = _backend(aggregator, sources)
    return (impl.combine(sources, weights, out) if impl else _empty(sources, out)), None
