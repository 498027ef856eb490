"""The sharding modes of the multi-source step, and the FSDP2 wrapping the "fsdp" mode needs.

- ``"none"``: every rank holds the K x N buffer and all-reduces all of it (:func:`allreduce_gradient_buffer`).
- ``"zero"``: a plain replicated model; the buffer is reduce-scattered by columns, each rank aggregates
  its K x N / W shard, the result is all-gathered into ``.grad``
  (:class:`~tolaria.aggregation.sharded_buffer.ZeroGradientBuffer`).
- ``"fsdp"``: the model is wrapped by FSDP2's ``fully_shard`` (:func:`fsdp_wrap`); FSDP2's reduce-scatter
  writes each source's local gradient shard into its row, the aggregate goes into the sharded ``.grad``
  (:class:`~tolaria.aggregation.sharded_buffer.FSDPGradientBuffer`).

Both sharded modes aggregate through :func:`tolaria.aggregation.sharded.sharded_aggregate`: one
all-reduce of the K x K float64 Gram matrix, the weights from it on every rank.
"""

from __future__ import annotations

from torch import nn

from tolaria.distributed.context import DistributedContext, _check_context

SHARDING_MODES = ("none", "zero", "fsdp")


def check_sharding(mode: str) -> str:
    """``mode`` if it is one of :data:`SHARDING_MODES`; else ``ValueError`` naming them."""
    if mode not in SHARDING_MODES:
        raise ValueError(f"unknown sharding {mode!r}; valid modes are {', '.join(SHARDING_MODES)}")
    return mode


def fsdp_wrap(model: nn.Module, ctx: DistributedContext) -> nn.Module:
    """Wraps ``model`` in place with FSDP2's ``fully_shard`` over every rank of ``ctx``: each module
    that directly holds parameters is its own FSDP unit (its all-gather and reduce-scatter), then the
    root. Build the optimizer afterwards, on the model's (now DTensor) parameters. Returns ``model``.

    The parameters are sharded as they are: build the model identically on every rank first (the same
    seed, or :func:`broadcast_module_state` before wrapping). When done, drop the model, then call
    :func:`~tolaria.distributed.release_process_groups`: the parameters' DTensors hold the group.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    _check_context(ctx)
    if not isinstance(model, nn.Module):
        raise TypeError(f"fsdp_wrap needs an nn.Module, got {type(model).__name__}")
    if not ctx.is_distributed:
        raise ValueError("fsdp_wrap needs a process group (a torchrun launch); a single process has nothing to shard")
    if isinstance(model, FSDPModule):
        raise ValueError("the model is already wrapped by fully_shard")
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    units = [m for m in model.modules() if m is not model and any(True for _ in m.parameters(recurse=False))]
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


__all__ = ["SHARDING_MODES", "check_sharding", "fsdp_wrap"]
