"""Gradient buffers whose rows hold this rank's column shard: K x N / W per rank instead of K x N.

Two ways to get there, both aggregated by :func:`~tolaria.aggregation.sharded.sharded_aggregate` (the
Gram pass on the shard, one all-reduce of the K x K Gram matrix, the combine into the shard):

- :class:`FSDPGradientBuffer`, for models wrapped by FSDP2's ``torch.distributed.fsdp.fully_shard``
  (``GradientBuffer(model, K)`` builds one when the parameters are DTensors). While source k's
  backward runs, each parameter's ``.grad`` is a DTensor whose local tensor is a view into row k, so
  FSDP2's reduce-scatter accumulates this rank's shard of the gradient straight into the row (the
  ``grad._local_tensor += ...`` of its post-backward): no unsharded copy of the gradient is kept. The
  aggregate is written into a flat shard whose DTensor views become the ``.grad``, and the optimizer
  steps the shards.
- :class:`ZeroGradientBuffer`, for plain replicated models (the "zero" sharding of data parallelism
  without FSDP): source k's backward lands in one staging row of N elements, which is then
  reduce-scattered by columns into row k of the K x N / W shard (``dist.reduce_scatter_tensor``, a
  mean over ranks); the aggregated shard is all-gathered into the ``.grad`` of every rank
  (``dist.all_gather_into_tensor``), so any optimizer steps the replicated parameters identically.

Both average over the ranks, as the replicated mode's all-reduce does (FSDP2 divides by the world
size itself), so for equal per-rank batches they hold the combined batch's per-source gradients.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .aggregator import Aggregator
from .buffer import GradientBuffer
from .sharded import check_shardable, sharded_aggregate
from .stats import AggregationStats

__all__ = ["FSDPGradientBuffer", "ZeroGradientBuffer"]

_ROW_ALIGN = 32  # elements: rows start on 64-byte boundaries, as GradientBuffer's
_LOW_PRECISION = (torch.float16, torch.bfloat16)  # divided before the reduce-scatter's sum (overflow)


def _local(t: Tensor) -> Tensor:
    """A DTensor's local tensor; a plain tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _reduce_scatter(output: Tensor, input: Tensor, group: dist.ProcessGroup | None) -> None:
    # reduce_scatter_single where torch has it (2.10+: the other name is deprecated), as FSDP2 calls it.
    single = getattr(dist, "reduce_scatter_single", None)
    (single or dist.reduce_scatter_tensor)(output, input, op=dist.ReduceOp.SUM, group=group)


def _all_gather(output: Tensor, input: Tensor, group: dist.ProcessGroup | None) -> None:
    single = getattr(dist, "all_gather_single", None)
    (single or dist.all_gather_into_tensor)(output, input, group=group)


def _aligned(n: int) -> int:
    return max(_ROW_ALIGN, -(-n // _ROW_ALIGN) * _ROW_ALIGN)


class _ShardedBuffer(GradientBuffer):
    """What both sharded buffers share: the K x n_r rows, binding ``.grad`` while a source is active,
    the round's carry, and the aggregate through :func:`sharded_aggregate`."""

    def _init_common(self, params: Any, num_sources: int, shared: Any, options: Mapping[str, Any]) -> list[Tensor]:
        # GradientBuffer's defaults are what a sharded buffer is; anything else it does not do.
        options = {k: v for k, v in options.items() if (k, v) not in (("mode", "buffer"), ("level", "params"))}
        if options:
            raise TypeError(f"{type(self).__name__} does not take {sorted(options)}")
        self._bind_parameters(params, num_sources, shared, accumulate=True)
        self._carry: Tensor | None = None
        self._round_open = False
        self._filled: set[int] = set()
        return self.params

    def _rows(self, width: int) -> None:
        """The K x ``width`` shard rows (``shard``, padded apart) and the flat ``output_shard``."""
        self._storage = torch.zeros((self.num_sources, _aligned(width)), dtype=self.dtype, device=self.device)
        self.shard = self._storage[:, :width]
        self.buffer = self.shard  # the rows this rank holds (GradientBuffer's name for them)

    # ---- the round ------------------------------------------------------------------------------

    def _begin_round(self) -> None:
        if self._round_open:
            return
        self._round_open = True
        self._storage.zero_()
        self._filled.clear()
        self._carry = None

    def backward(self, losses: Sequence[Tensor] | Mapping[str, Tensor], *, retain_graph: bool = False) -> None:
        if isinstance(losses, Mapping):
            losses = list(losses.values())
        elif isinstance(losses, Tensor) or not isinstance(losses, Sequence):
            raise TypeError(f"losses must be a sequence or a mapping of {self.num_sources} scalar tensors")
        if len(losses) != self.num_sources:
            raise ValueError(f"got {len(losses)} losses for {self.num_sources} gradient sources")
        for k, loss in enumerate(losses):
            if not isinstance(loss, Tensor):
                raise TypeError(f"loss {k} is a {type(loss).__name__}, not a tensor")
            with self.source(k):
                loss.backward(retain_graph=retain_graph or k + 1 < len(losses))

    def _check_index(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.num_sources:
            raise IndexError(f"source index {k!r} out of range for {self.num_sources} sources")

    def _check_bound(self, k: int, bound: Sequence[Tensor]) -> None:
        # Autograd (and FSDP2) accumulate into an existing .grad in place; a replaced one missed the row.
        for i, (p, g) in enumerate(zip(self.params, bound)):
            if p.grad is not None and _local(p.grad).data_ptr() != _local(g).data_ptr():
                raise RuntimeError(
                    f"parameter {i}'s .grad was replaced while source {k} was active; "
                    "its gradient did not land in the buffer (was zero_grad called inside the block?)"
                )

    # ---- the aggregate --------------------------------------------------------------------------

    def _reduce_sum(self, t: Tensor) -> None:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)

    def _aggregate_shard(self, aggregator: Aggregator, return_stats: bool) -> AggregationStats | None:
        if not isinstance(aggregator, Aggregator):
            check_shardable(aggregator)  # raises, naming the foreign callable
        self._check_parameters()
        result = sharded_aggregate(
            aggregator,
            self.shard,
            reduce_sum=self._reduce_sum,
            columns=self.columns,
            out=self.output_shard,
            return_stats=return_stats,
        )
        self._round_open = False
        return result[1] if return_stats else None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_sources={self.num_sources}, params={len(self.params)}, numel={self.numel}, "
            f"shard_columns={self.shard.shape[1]}, world_size={self.world_size})"
        )


class ZeroGradientBuffer(_ShardedBuffer):
    """K sources of a replicated model, reduce-scattered by columns: row k holds this rank's
    N / W columns of the ranks' mean of source k's gradient (see the module docstring).

    Args:
        params, num_sources, shared: as for :class:`GradientBuffer`.
        process_group: the ranks to shard over (default: the default group; every rank of it must
            build the buffer on the same parameters).

    Memory per rank: one staging row and the all-gathered output (2 N), the K x N / W shard and the
    aggregated shard (N / W): 2 N + (K + 1) N / W elements, against (K + 1) N for the replicated buffer.
    Bytes sent per rank and step: K reduce-scatters and one all-gather of N elements ((W - 1) / W of
    them each on a ring) and the K x K float64 Gram all-reduce: (K + 1) / 2K of the replicated mode's
    all-reduce of K N (0.56 at K = 8). A gradient already in a shared parameter's ``.grad`` when a
    source begins is carried into the aggregate on this rank only, as the replicated buffer does.
    """

    def __init__(
        self,
        params: Any,
        num_sources: int,
        *,
        shared: nn.Module | Sequence[Tensor] | None = None,
        process_group: dist.ProcessGroup | None = None,
        **options: Any,
    ):
        self._init_common(params, num_sources, shared, options)
        self.group = process_group
        self.world_size = dist.get_world_size(process_group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(process_group) if dist.is_initialized() else 0
        self.numel = sum(p.numel() for p in self.params)
        self._offsets: list[tuple[int, int]] = []
        offset = 0
        for p in self.params:
            self._offsets.append((offset, p.numel()))
            offset += p.numel()
        self.chunk = -(-self.numel // self.world_size)  # columns per rank; the last ranks' tail is padding
        self.columns = self.rank * self.chunk  # the global index of this rank's first column
        width = max(0, min(self.numel, self.columns + self.chunk) - self.columns)
        self._rows(width)
        self._staging = torch.zeros(self.world_size * self.chunk, dtype=self.dtype, device=self.device)
        self._staging_views = self._views(self._staging)
        self._gathered = torch.zeros(self.world_size * self.chunk, dtype=self.dtype, device=self.device)
        self.output = self._gathered[: self.numel]
        self._output_views = self._views(self.output)
        self._shard_out = torch.zeros(_aligned(self.chunk), dtype=self.dtype, device=self.device)
        self.output_shard = self._shard_out[:width]
        self._received = torch.empty(self.chunk, dtype=self.dtype, device=self.device)

    @contextmanager
    def source(self, k: int) -> Iterator[Tensor]:
        """Within this block, backward passes accumulate into the staging row; at its end the row is
        reduce-scattered into row ``k`` of the shard. Yields the staging row."""
        self._check_index(k)
        self._check_parameters()
        self._begin_round()
        self._absorb_external_grads()
        self._staging.zero_()
        for p, v in zip(self.params, self._staging_views):
            p.grad = v
        try:
            yield self._staging
        finally:
            self._check_bound(k, self._staging_views)
            for p in self.params:
                p.grad = None
        self._scatter(k)

    def _scatter(self, k: int) -> None:
        """Row k of the shard receives (adds, if the row was filled this round) the ranks' mean of
        the staging row's chunk ``rank``."""
        target = self._storage[k, : self.chunk]
        into = self._received if k in self._filled else target
        pre_divide = self.dtype in _LOW_PRECISION
        if pre_divide:
            self._staging.div_(self.world_size)
        if self.world_size > 1:
            _reduce_scatter(into, self._staging, self.group)
        else:
            into.copy_(self._staging)
        if not pre_divide and self.world_size > 1:
            into.div_(self.world_size)
        if into is not target:
            target.add_(into)
        self._filled.add(k)

    def aggregate(
        self, aggregator: Aggregator, *, return_stats: bool = False
    ) -> Tensor | tuple[Tensor, AggregationStats]:
        """Aggregates the shard (:func:`sharded_aggregate`), all-gathers the result into ``output``
        (whose views are the shared parameters' ``.grad``, the same bits on every rank) and adds any
        carried gradient. Returns ``output`` (and the global stats)."""
        self._absorb_external_grads()
        stats = self._aggregate_shard(aggregator, return_stats)
        if self.world_size > 1:
            _all_gather(self._gathered, self._shard_out[: self.chunk], self.group)
        else:
            self._gathered.copy_(self._shard_out[: self.chunk])
        if self._carry is not None:
            self.output.add_(self._carry)
            self._carry = None
        for p, v in zip(self.params, self._output_views):
            p.grad = v
        return (self.output, stats) if return_stats else self.output


class FSDPGradientBuffer(_ShardedBuffer):
    """K sources of a model wrapped by FSDP2's ``fully_shard``: row k holds this rank's shard of
    source k's gradient (FSDP2's reduce-scatter writes it there; see the module docstring).
    ``GradientBuffer(model, K, shared=...)`` returns one when the parameters are DTensors.

    Args:
        params: the wrapped model (an ``nn.Module``: its FSDP modules are needed to keep their
            parameters unsharded across the K backward passes), or its parameters.
        num_sources, shared: as for :class:`GradientBuffer`.

    Parameters all-gathered once per step, not once per source: :meth:`backward` sets FSDP2's
    ``reshard_after_backward`` to False for the K passes, so each module's unsharded parameters,
    all-gathered by the first pass (or kept from the forward), serve all K, and reshards them all
    after the last, setting ``reshard_after_backward`` back to True (FSDP2's default); the optimizer
    then steps the shards and the next forward all-gathers them.
    Memory cost: the whole model's unsharded parameters (N elements) stay allocated from the first
    backward to the last, where FSDP2 alone holds about one module's at a time; the buffer itself
    is K x N / W. With :meth:`source` instead, or a buffer built on a list of parameters (no
    modules to reach), the caller manages resharding (else each source's backward all-gathers anew).

    Aggregation: :func:`sharded_aggregate` over the mesh's process group (one all-reduce of the
    K x K Gram matrix); the result's shard is written into ``output_shard``, whose DTensor views
    become the ``.grad``. Every parameter must be sharded on dim 0 over one 1-D mesh (FSDP2's
    default); GradDrop reads each shard's global position from it.
    """

    def __init__(
        self,
        params: Any,
        num_sources: int,
        *,
        shared: nn.Module | Sequence[Tensor] | None = None,
        **options: Any,
    ):
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor, Shard

        self._init_common(params, num_sources, shared, options)
        self._fsdp_modules = (
            [m for m in params.modules() if isinstance(m, FSDPModule)] if isinstance(params, nn.Module) else []
        )
        mesh = None
        for i, p in enumerate(self.params):
            if not isinstance(p, DTensor) or len(p.placements) != 1 or p.placements[0] != Shard(0):
                what = type(p).__name__ if not isinstance(p, DTensor) else f"a DTensor placed {p.placements}"
                raise ValueError(
                    f"shared parameter {i} is {what}; FSDPGradientBuffer needs every shared parameter sharded "
                    "on dim 0 over one 1-D mesh, as fully_shard does by default (wrap the whole trunk)"
                )
            if mesh is None:
                mesh = p.device_mesh
            elif p.device_mesh != mesh:
                raise ValueError(f"shared parameter {i} lives on another device mesh than parameter 0")
        assert mesh is not None
        self.mesh = mesh
        self.group = mesh.get_group()
        self.world_size, self.rank = mesh.size(), mesh.get_local_rank()
        self.numel = sum(p.numel() for p in self.params)  # N, the global size
        locals_ = [p.to_local() for p in self.params]
        self.columns, offsets, global_offset = [], [], 0
        local_offset = 0
        for p, loc in zip(self.params, locals_):
            rows = p.shape[0] if p.dim() else 1
            per_row = p.numel() // rows if rows else 0
            chunk = -(-rows // self.world_size)
            first_row = min(rows, self.rank * chunk)
            expected = max(0, min(rows, first_row + chunk) - first_row) * per_row
            if loc.numel() != expected:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} has {loc.numel()} local elements on rank {self.rank}; "
                    f"FSDP2's dim-0 chunking gives {expected}: is it sharded another way?"
                )
            self.columns.append((global_offset + first_row * per_row, loc.numel()))
            offsets.append((local_offset, loc.numel()))
            global_offset += p.numel()
            local_offset += loc.numel()
        width = local_offset
        self._rows(width)
        self._shard_out = torch.zeros(_aligned(width), dtype=self.dtype, device=self.device)
        self.output_shard = self._shard_out[:width]

        def dtensors(flat: Tensor) -> list[Tensor]:
            return [
                DTensor.from_local(
                    flat[o : o + n].view_as(loc), mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                )
                for (o, n), loc, p in zip(offsets, locals_, self.params)
            ]

        self._offsets = offsets
        self._row_grads = [dtensors(self.shard[k]) for k in range(num_sources)]
        self._output_grads = dtensors(self.output_shard)
        self.output = self.output_shard  # this rank's part of the aggregate

    def _absorb_external_grads(self) -> None:
        """Adds the local shard of whatever sits in a shared parameter's ``.grad`` to the carry."""
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue
            if self._carry is None:
                self._carry = torch.zeros_like(self.output_shard)
            offset, n = self._offsets[i]
            self._carry[offset : offset + n].add_(grad.to_local().reshape(-1))
            p.grad = None

    @contextmanager
    def source(self, k: int) -> Iterator[Tensor]:
        """Within this block, FSDP2's reduce-scatters accumulate this rank's shard into row ``k``."""
        self._check_index(k)
        self._check_parameters()
        self._begin_round()
        self._absorb_external_grads()
        for p, g in zip(self.params, self._row_grads[k]):
            p.grad = g
        try:
            yield self.shard[k]
        finally:
            self._check_bound(k, self._row_grads[k])
            for p in self.params:
                p.grad = None

    def backward(self, losses: Sequence[Tensor] | Mapping[str, Tensor], *, retain_graph: bool = False) -> None:
        """Every source's backward into its row, the FSDP parameters unsharded once for all K (see the
        class docstring), resharded after the last."""
        for m in self._fsdp_modules:
            m.set_reshard_after_backward(False, recurse=False)
        try:
            super().backward(losses, retain_graph=retain_graph)
        finally:
            for m in self._fsdp_modules:
                m.set_reshard_after_backward(True, recurse=False)  # FSDP2's default, for the caller's backwards
                m.reshard()

    def aggregate(
        self, aggregator: Aggregator, *, return_stats: bool = False
    ) -> Tensor | tuple[Tensor, AggregationStats]:
        """Aggregates the shard into ``output_shard`` (:func:`sharded_aggregate`), adds any carried
        gradient, and makes its DTensor views the shared parameters' ``.grad``. Returns
        ``output_shard`` (and the global stats)."""
        self._absorb_external_grads()
        stats = self._aggregate_shard(aggregator, return_stats)
        if self._carry is not None:
            self.output_shard.add_(self._carry)
            self._carry = None
        for p, g in zip(self.params, self._output_grads):
            p.grad = g
        return (self.output_shard, stats) if return_stats else self.output_shard
