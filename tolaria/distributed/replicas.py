"""Identical replicas: start them identical, keep their random draws identical, check that they are.

- :func:`broadcast_module_state` copies rank 0's parameters and buffers to every rank;
  :func:`synchronized_generator` seeds every rank's aggregation generator with rank 0's seed.
- :func:`verify_buffer_layout` and :func:`verify_replicas` raise :class:`ReplicaMismatchError` on every
  rank when the ranks' buffers or models differ (:func:`tensor_fingerprint` is the exact per-tensor
  check).
- :func:`ddp_wrap` is the single-source path, where ``DistributedDataParallel`` keeps the replicas
  identical instead of the gradient-buffer all-reduce.
"""

from __future__ import annotations

import hashlib
import json
import logging
import numbers
import secrets
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tolaria.aggregation import GradientBuffer
from tolaria.distributed.context import (
    DistributedContext,
    ReplicaMismatchError,
    _check_context,
    _control_device,
)
from tolaria.telemetry import TelemetryEmitter, emitter_or_default

# One logger name for the whole package, as before the split, so log filters keep matching.
log = logging.getLogger("tolaria.distributed")

MAX_SEED = 2**63 - 1


# ---- identical replicas ----------------------------------------------------------------------------


def synchronized_generator(
    seed: int | None,
    ctx: DistributedContext,
    *,
    device: torch.device | str | None = None,
    telemetry: TelemetryEmitter | None = None,
) -> torch.Generator:
    """A ``torch.Generator`` seeded with rank 0's ``seed`` on every rank (one broadcast of one int).

    Give it to the aggregator (``PCGrad(generator=...)``) so every rank draws the same shuffles and
    the replicas stay identical. Keep ``generator.get_state()`` in the checkpoint's ``extra`` and
    ``set_state`` it after a resume to continue the same sequence.

    Args:
        seed: an int in ``[0, 2**63 - 1]``; rank 0's value is used everywhere (a rank passing another
            value is warned about). None: rank 0 draws a random seed, reported in telemetry.
        device: the generator's device (default ``ctx.device``, where the aggregation runs).
    """
    _check_context(ctx)
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED
    ):
        raise ValueError(f"seed must be an int in [0, 2**63 - 1] or None, got {seed!r}")
    gen_device = ctx.device if device is None else torch.device(device)
    drawn = seed is None and ctx.is_main
    local = secrets.randbits(63) if drawn else seed
    chosen = local
    if ctx._live():
        t = torch.tensor([local if ctx.is_main else 0], dtype=torch.int64, device=_control_device(ctx))
        dist.broadcast(t, src=0)
        chosen = int(t.item())
    assert chosen is not None
    if seed is not None and chosen != seed:
        message = (
            f"rank {ctx.rank} asked for seed {seed} but rank 0's seed {chosen} is used, so every rank draws "
            "the same shuffles"
        )
        log.warning(message)
        emitter_or_default(telemetry).event(
            "distributed.seed_overridden", severity="warning", message=message, local_seed=seed, seed=chosen
        )
    if drawn:
        emitter_or_default(telemetry).event(
            "distributed.seed_drawn", message=f"drew the shared seed {chosen}", seed=chosen
        )
    generator = torch.Generator(device=gen_device)
    generator.manual_seed(chosen)
    return generator


def broadcast_module_state(model: nn.Module, ctx: DistributedContext) -> None:
    """Copies rank 0's parameters and buffers into every rank's model, in place.

    Call it once after building the model (before the optimizer's first step) so the replicas start
    identical whatever each rank's initialisation drew. Every rank's model must have the same
    structure (checked first, on every rank, naming the ranks that differ). Communication: the
    model's bytes once, rank 0 to all.
    """
    tensors = _checked_model_entries(model, ctx)
    if not ctx._live():
        return
    _broadcast_in_place([t for _, t in tensors], ctx)


def _checked_model_entries(model: nn.Module, ctx: DistributedContext) -> list[tuple[str, Tensor]]:
    """The model's tensor entries, after checking the arguments and that every rank's model has the
    same structure (on every rank, naming the ranks that differ)."""
    _check_context(ctx)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    entries = _tensor_entries(model)
    _check_same_layout(entries, ctx, "model structure")
    return entries


def _tensor_entries(model: nn.Module) -> list[tuple[str, Tensor]]:
    """The model's parameters and buffers by state-dict name (a module's non-tensor extra state is
    not replica state this module can compare or copy)."""
    return [(name, t) for name, t in model.state_dict(keep_vars=True).items() if isinstance(t, Tensor)]


def _broadcast_in_place(tensors: Sequence[Tensor], ctx: DistributedContext) -> None:
    """Rank 0's values of ``tensors`` into every rank's tensors (asynchronous broadcasts, then waits)."""
    comm_device = _control_device(ctx)
    pending: list[tuple[Tensor, Tensor | None, Any]] = []
    seen: set[int] = set()
    with torch.no_grad():
        for t in tensors:
            if t.numel() == 0 or id(t) in seen:  # tied tensors travel once
                continue
            seen.add(id(t))
            target = t.detach()
            if target.is_contiguous() and target.device == comm_device:
                staged, wire = None, target.reshape(-1).view(torch.uint8)  # straight into the live storage
            else:
                staged = target.to(comm_device, copy=True).contiguous()
                wire = staged.reshape(-1).view(torch.uint8)
            pending.append((target, staged, dist.broadcast(wire, src=0, async_op=True)))
        for target, staged, work in pending:
            work.wait()
            if staged is not None and not ctx.is_main:
                target.copy_(staged)


def _layout_digest(entries: Sequence[tuple[str, Any]]) -> int:
    text = json.dumps([[name, str(getattr(t, "dtype", "")), list(getattr(t, "shape", ()))] for name, t in entries])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


def _all_gather_ints(values: Sequence[int] | Tensor, ctx: DistributedContext) -> list[list[int]]:
    """Every rank's int64 vector (same length everywhere), as lists, rank order; one host read."""
    t = (
        values
        if isinstance(values, Tensor)
        else torch.tensor(list(values), dtype=torch.int64, device=_control_device(ctx))
    )
    gathered = [torch.empty_like(t) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, t)
    return torch.stack(gathered).tolist()


def _check_same_layout(entries: Sequence[tuple[str, Any]], ctx: DistributedContext, what: str) -> None:
    if not ctx._live():
        return
    digests = [row[0] for row in _all_gather_ints([_layout_digest(entries)], ctx)]
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    if differing:
        described = "; ".join(
            f"{name}: {getattr(t, 'dtype', '')} {tuple(getattr(t, 'shape', ()))}" for name, t in entries[:8]
        )
        raise ReplicaMismatchError(
            f"the {what} differs between ranks: rank(s) {differing} do not match rank 0 (this is rank {ctx.rank}, "
            f"with {len(entries)} entries: {described}{' ...' if len(entries) > 8 else ''})"
        )


def verify_buffer_layout(buffer: GradientBuffer | Tensor, ctx: DistributedContext) -> None:
    """Raises :class:`ReplicaMismatchError` on every rank unless all ranks' buffers have the same shape
    and dtype (one all-gather of one int). Call it once after building the gradient buffer (and after
    every rebuild), since :func:`allreduce_gradient_buffer` does not check on its hot path."""
    _check_context(ctx)
    tensor = buffer.buffer if isinstance(buffer, GradientBuffer) else buffer
    if not isinstance(tensor, Tensor):
        raise TypeError(f"buffer must be a GradientBuffer or a tensor, got {type(buffer).__name__}")
    _check_same_layout([("gradient buffer", tensor)], ctx, "gradient buffer layout (K x N, dtype)")


_FINGERPRINT_CHUNK = 1 << 24  # 16-bit words per slice: bounds the temporary int64 memory at 128 MiB
_FINGERPRINT_MOD = 1 << 62


def _fingerprint(t: Tensor) -> Tensor:
    """:func:`tensor_fingerprint` as an int64 pair on ``t``'s device (no host read)."""
    data = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if data.numel() % 2:
        data = torch.cat([data, data.new_zeros(1)])
    elif data.storage_offset() % 2:  # int16 words must be aligned
        data = data.clone()
    words = data.view(torch.int16)
    acc = torch.zeros(2, dtype=torch.int64, device=t.device)
    for start in range(0, words.numel(), _FINGERPRINT_CHUNK):
        part = words[start : start + _FINGERPRINT_CHUNK].to(torch.int64) & 0xFFFF
        position = torch.arange(start, start + part.numel(), device=part.device, dtype=torch.int64) % 65521 + 1
        # Each product is < 2**32 and a slice has 2**24 of them, so the sums are exact in int64;
        # folding every slice modulo 2**62 keeps the running total exact too.
        acc = (acc + torch.stack([part.sum(), (part * position).sum()])) % _FINGERPRINT_MOD
    return acc


def tensor_fingerprint(t: Tensor) -> tuple[int, int]:
    """Two exact integers from ``t``'s bytes: any change of one element changes the first, a swap of
    elements the second (unless their positions agree modulo 65521). Computed on ``t``'s device."""
    if not isinstance(t, Tensor):
        raise TypeError(f"tensor_fingerprint needs a tensor, got {type(t).__name__}")
    plain, weighted = _fingerprint(t).tolist()
    return plain, weighted


def verify_replicas(model: nn.Module, ctx: DistributedContext) -> None:
    """Raises :class:`ReplicaMismatchError` on every rank unless every rank's parameters and buffers
    are bitwise identical to rank 0's, naming the first entries that differ.

    Costs one pass over the model on its device, a host read of two ints per tensor and one
    all-gather of them: a periodic check (every epoch, after a resume), not a per-step one.
    """
    entries = _checked_model_entries(model, ctx)
    if not ctx._live():
        return
    control = _control_device(ctx)
    prints = (
        torch.cat([_fingerprint(t).to(control) for _, t in entries])
        if entries
        else torch.zeros(0, dtype=torch.int64, device=control)
    )
    gathered = _all_gather_ints(prints, ctx)  # one host read for the whole model
    bad: dict[str, list[int]] = {}
    for r, row in enumerate(gathered):
        for i, (name, _) in enumerate(entries):
            if row[2 * i : 2 * i + 2] != gathered[0][2 * i : 2 * i + 2]:
                bad.setdefault(name, []).append(r)
    if bad:
        listed = "; ".join(f"{name} on rank(s) {ranks}" for name, ranks in list(bad.items())[:8])
        raise ReplicaMismatchError(
            f"the model replicas differ from rank 0 in {len(bad)} of {len(entries)} entries: {listed}"
            f"{' ...' if len(bad) > 8 else ''} (this is rank {ctx.rank})"
        )


# ---- the single-source path ------------------------------------------------------------------------


def ddp_wrap(model: nn.Module, ctx: DistributedContext, **ddp_options: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` for the single-source path; the model itself in a single process.

    DDP averages ``.grad`` over ranks during ``backward`` (bucketed, overlapped with the backward
    pass) and broadcasts rank 0's parameters and buffers when it wraps, so replicas start and stay
    identical. Never combine it with a ``GradientBuffer`` + :func:`allreduce_gradient_buffer` (the
    gradients would be averaged twice, K times over): the multi-source path uses the buffer
    all-reduce, the single-source path DDP. ``ddp_options`` go to ``DistributedDataParallel``.
    """
    _check_context(ctx)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("the model is already wrapped in DistributedDataParallel")
    refused = sorted({"device_ids", "output_device", "process_group"} & set(ddp_options))
    if refused:
        raise ValueError(f"ddp_wrap sets {refused} from the context; remove them from the options")
    for name, p in model.named_parameters():
        if p.device != ctx.device:
            raise ValueError(
                f"parameter {name!r} is on {p.device}, but this rank's device is {ctx.device}; move the "
                "model to ctx.device before wrapping it"
            )
    if not ctx._live():
        return model
    if ctx.device.type == "cuda":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index], output_device=ctx.device.index, **ddp_options
        )
    return nn.parallel.DistributedDataParallel(model, **ddp_options)


__all__ = [
    "MAX_SEED",
    "broadcast_module_state",
    "ddp_wrap",
    "synchronized_generator",
    "tensor_fingerprint",
    "verify_buffer_layout",
    "verify_replicas",
]
