"""The collectives: the bucketed gradient all-reduce, and rank 0's values broadcast to every rank.

- :func:`allreduce_gradient_buffer` averages the K x N gradient buffer over ranks (the hot path);
  :func:`allreduce_mean` and :func:`any_rank` reduce small tensors and flags.
- :func:`broadcast_json` carries a JSON-able value from rank 0, :func:`broadcast_tree` a state tree
  (a ``state_dict``): its structure as JSON (:func:`encode_tree` / :func:`decode_tree`), its tensors
  as raw bytes. Neither uses pickle, so no rank unpickles what another sent.

In a single-process context every collective here is a no-op.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from tolaria.aggregation import GradientBuffer
from tolaria.distributed.context import (
    DistributedContext,
    DistributedError,
    _allreduce_ints,
    _check_context,
    _check_int,
    _check_positive_real,
    _control_device,
)

DEFAULT_BUCKET_MB = 25.0
_LOW_PRECISION = (torch.float16, torch.bfloat16)  # divided before the all-reduce's sum, which could overflow


# ---- the gradient all-reduce -----------------------------------------------------------------------


def bucket_slices(numel: int, element_size: int, bucket_mb: float) -> list[tuple[int, int]]:
    """``(start, stop)`` element ranges of about ``bucket_mb`` MiB each covering ``numel`` elements."""
    numel = _check_int("numel", numel, minimum=0)
    element_size = _check_int("element_size", element_size, minimum=1)
    _check_positive_real("bucket_mb", bucket_mb, "MiB")
    per_bucket = max(1, int(bucket_mb * (1 << 20)) // element_size)
    return [(start, min(start + per_bucket, numel)) for start in range(0, numel, per_bucket)]


def flat_span(tensor: Tensor) -> Tensor:
    """A 1-D view of the storage ``tensor`` occupies: itself when contiguous; for a K x N view whose
    rows are padded apart (``GradientBuffer`` aligns its rows), the span from its first to its last
    element, padding included. The padding is never part of a gradient, so reducing it is harmless
    (a few elements per row)."""
    if tensor.is_contiguous():
        return tensor.view(-1)
    if tensor.dim() == 2 and tensor.stride(1) == 1 and tensor.stride(0) >= tensor.size(1):
        rows, cols = tensor.shape
        return tensor.as_strided(((rows - 1) * tensor.stride(0) + cols,), (1,))
    raise ValueError(
        f"the gradient buffer must be contiguous or a K x N view with unit column stride (padded rows), "
        f"got shape {tuple(tensor.shape)} with strides {tensor.stride()}; it is all-reduced in place"
    )


def allreduce_gradient_buffer(
    buffer: GradientBuffer | Tensor, ctx: DistributedContext, bucket_mb: float = DEFAULT_BUCKET_MB
) -> Tensor:
    """Averages the K x N gradient buffer over all ranks, in place; returns it.

    Call it after every source's backward and before ``buffer.aggregate(...)``: every rank then holds
    the same buffer (the combined batch's per-source gradients, for equal-sized shards) and runs the
    same aggregation. The buffer is all-reduced as contiguous buckets of about ``bucket_mb`` MiB of
    its flat storage, row padding included (the mean is elementwise, so any split gives the same
    result). All buckets are
    launched asynchronously, then waited on, so transfers pipeline with each other; each bucket is
    divided by the world size as soon as it arrives (float16/bfloat16 are divided before the sum
    instead, so the sum cannot overflow). On NCCL nothing here waits on the host.

    Every rank must call it with a buffer of the same shape and dtype (check once with
    :func:`verify_buffer_layout`). Communication: ``K * N * element_size`` bytes per rank, about twice
    that on the wire for a ring all-reduce. A single-process context returns the buffer untouched.
    """
    _check_context(ctx)
    tensor = buffer.buffer if isinstance(buffer, GradientBuffer) else buffer
    if not isinstance(tensor, Tensor):
        raise TypeError(f"buffer must be a GradientBuffer or a tensor, got {type(buffer).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"the gradient buffer must be floating point, got {tensor.dtype}")
    flat = flat_span(tensor)
    slices = bucket_slices(flat.numel(), tensor.element_size(), bucket_mb)
    if not ctx._live():
        return tensor
    if ctx.backend == "nccl" and tensor.device.type != "cuda":
        raise ValueError(f"backend nccl needs the gradient buffer on a CUDA device, but it is on {tensor.device}")
    world = ctx.world_size
    pre_divide = tensor.dtype in _LOW_PRECISION
    if pre_divide:
        flat.div_(world)
    works = [
        (flat[start:stop], dist.all_reduce(flat[start:stop], op=dist.ReduceOp.SUM, async_op=True))
        for start, stop in slices
    ]
    for chunk, work in works:
        work.wait()
        if not pre_divide:
            chunk.div_(world)
    return tensor


def allreduce_mean(tensor: Tensor, ctx: DistributedContext) -> Tensor:
    """Averages a small floating-point tensor (e.g. the K loss values of a step) over ranks, in place.

    One all-reduce; a single-process context returns it untouched.
    """
    _check_context(ctx)
    if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
        raise TypeError(
            f"allreduce_mean needs a floating-point tensor, got {getattr(tensor, 'dtype', type(tensor).__name__)}"
        )
    if not tensor.is_contiguous():
        raise ValueError("allreduce_mean reduces in place and needs a contiguous tensor")
    if ctx._live():
        if ctx.backend == "nccl" and tensor.device.type != "cuda":
            raise ValueError(f"backend nccl needs the tensor on a CUDA device, but it is on {tensor.device}")
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(ctx.world_size)
    return tensor


def allreduce_mean_grads(params: list[Tensor], world: int) -> None:
    """The ``.grad`` of parameters outside the K x N buffer (the heads) averaged over the ranks of the
    default process group, in place: one all-reduce per dtype and device. A parameter some rank has no
    gradient for counts as zero there, and keeps None only where no rank has one, so every rank ends
    with the same gradients (the trainer and the Lightning integration both call this)."""
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    for (dtype, device), group in groups.items():
        present = torch.tensor([p.grad is not None for p in group], dtype=dtype, device=device)
        flat = torch.cat(
            [*(p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in group), present]
        )
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, seen in zip(group, flat[-len(group) :].tolist()):
            mean = flat[offset : offset + p.numel()].view_as(p).div_(world)
            offset += p.numel()
            if seen > 0:
                if p.grad is None:
                    p.grad = mean.clone()
                else:
                    p.grad.copy_(mean)


def any_rank(flag: bool, ctx: DistributedContext) -> bool:
    """Whether ``flag`` is True on at least one rank (one all-reduce of one int).

    Use it for decisions that change parameters (skip this step, roll back): every rank must take the
    same one, or the replicas diverge.
    """
    _check_context(ctx)
    if not isinstance(flag, bool):
        raise TypeError(f"flag must be a bool, got {type(flag).__name__}")
    if not ctx._live():
        return flag
    return bool(_allreduce_ints([int(flag)], ctx, dist.ReduceOp.MAX)[0])


# ---- broadcasting a JSON value ---------------------------------------------------------------------

# Here rather than beside the checkpoints (where the single module had it): broadcast_tree, the
# checkpoints and the rank telemetry all build on _from_main, so it sits below all three.


def _share_bytes_from_main(data: bytes, ctx: DistributedContext) -> Any:
    """Rank 0's JSON text ``data`` (ignored elsewhere), decoded, on every rank. Its first collective is
    an all-reduce, so no rank leaves before rank 0 got here (a barrier)."""
    length = _allreduce_ints([len(data)], ctx, dist.ReduceOp.MAX)[0]
    wire = torch.zeros(length, dtype=torch.uint8, device=_control_device(ctx))
    if ctx.is_main:
        wire.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(wire, src=0)
    return json.loads(wire.cpu().numpy().tobytes().decode())


def _from_main(
    compute: Callable[[], Any], ctx: DistributedContext, what: str, error_type: type[Exception] = DistributedError
) -> Any:
    """Rank 0 computes a JSON-able value, every rank learns it, as JSON decodes it (rank 0 too; the
    others never call ``compute``); a live context only. If ``compute`` (or encoding its value) fails
    on rank 0, rank 0 re-raises its own error and every other rank raises ``error_type``
    ("rank 0 could not <what>: <the error>")."""
    data = b""
    error: Exception | None = None
    if ctx.is_main:
        try:
            data = json.dumps({"ok": True, "value": compute()}).encode()
        except Exception as exc:  # shared with every rank below, then re-raised here
            error = exc
            data = json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}).encode()
    outcome = _share_bytes_from_main(data, ctx)
    if error is not None:
        raise error
    if not outcome["ok"]:
        raise error_type(f"rank 0 could not {what}: {outcome['error']}")
    return outcome["value"]


def broadcast_json(value: Any, ctx: DistributedContext) -> Any:
    """Rank 0's ``value`` (anything ``json.dumps`` takes) on every rank; the others' ``value`` is ignored.

    For run-wide choices rank 0 makes (the run folder, a control command, evaluation metrics). No
    pickle. A barrier too: no rank returns before rank 0 arrived. If rank 0's value is not
    JSON-serialisable, every rank raises. A single-process context returns ``value``.
    """
    _check_context(ctx)
    if not ctx._live():
        return value
    return _from_main(lambda: value, ctx, "broadcast its value")


def all_gather_json(value: Any, ctx: DistributedContext) -> list[Any]:
    """Every rank's ``value`` (anything ``json.dumps`` takes), in rank order, on every rank.

    For per-rank state that one rank saves for all (each rank's RNG states in rank 0's checkpoint).
    No pickle: the JSON texts travel as bytes, padded with spaces to the longest (two collectives).
    Every rank must call it; if one rank's value is not JSON-able, every rank raises (that rank its
    own ``TypeError``/``ValueError``). A single-process context returns ``[value]``.
    """
    _check_context(ctx)
    data, error = b"", None
    try:
        data = json.dumps(value).encode()
    except (TypeError, ValueError) as exc:  # agreed on below, then re-raised on this rank
        error = exc
    if not ctx._live():
        if error is not None:
            raise error
        return [json.loads(data)]
    length, failed = _allreduce_ints([len(data), ctx.rank + 1 if error else 0], ctx, dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed:
        raise DistributedError(f"rank {failed - 1}'s value for all_gather_json is not JSON-able (see its log)")
    device = _control_device(ctx)
    wire = torch.full((length,), ord(" "), dtype=torch.uint8, device=device)
    wire[: len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    gathered = [torch.empty_like(wire) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, wire)
    return [json.loads(t.cpu().numpy().tobytes().decode()) for t in gathered]


# ---- broadcasting a state tree (no pickle) ----------------------------------------------------------


def encode_tree(tree: Any, tensors: list[Tensor], path: str) -> Any:
    """A JSON-able description of ``tree``; its tensors are appended to ``tensors``."""
    if isinstance(tree, Tensor):
        tensors.append(tree)
        return {"t": "tensor", "i": len(tensors) - 1}
    if tree is None or type(tree) in (bool, int, float, str):
        return tree
    if isinstance(tree, torch.Size):
        return {"t": "size", "v": list(tree)}
    if isinstance(tree, dict):
        if type(tree) not in (dict, OrderedDict):
            raise TypeError(f"{path}: cannot broadcast a {type(tree).__qualname__}; use a dict")
        return {
            "t": "dict",
            "o": isinstance(tree, OrderedDict),
            "v": [[encode_tree(k, tensors, path), encode_tree(v, tensors, f"{path}[{k!r}]")] for k, v in tree.items()],
        }
    if type(tree) is list:
        return [encode_tree(v, tensors, f"{path}[{i}]") for i, v in enumerate(tree)]
    if type(tree) is tuple:
        return {"t": "tuple", "v": [encode_tree(v, tensors, f"{path}[{i}]") for i, v in enumerate(tree)]}
    if type(tree) is bytes:
        return {"t": "bytes", "v": tree.hex()}
    if type(tree) is complex:
        return {"t": "complex", "v": [tree.real, tree.imag]}
    if isinstance(tree, torch.dtype):
        return {"t": "dtype", "v": str(tree).removeprefix("torch.")}
    if isinstance(tree, torch.device):
        return {"t": "device", "v": str(tree)}
    raise TypeError(
        f"{path}: cannot broadcast a {type(tree).__module__}.{type(tree).__qualname__}; state trees hold "
        "tensors, dicts, lists, tuples, numbers, strings, bytes, dtypes, devices or None"
    )


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise DistributedError(f"rank 0 sent an unknown dtype {name!r}")
    return dtype


def decode_tree(node: Any, tensors: Sequence[Tensor]) -> Any:
    if isinstance(node, list):
        return [decode_tree(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    kind, value = node["t"], node.get("v")
    if kind == "tensor":
        return tensors[node["i"]]
    if kind == "dict":
        out: dict[Any, Any] = OrderedDict() if node["o"] else {}
        for k, v in value:
            out[decode_tree(k, tensors)] = decode_tree(v, tensors)
        return out
    if kind == "tuple":
        return tuple(decode_tree(v, tensors) for v in value)
    if kind == "size":
        return torch.Size(value)
    if kind == "bytes":
        return bytes.fromhex(value)
    if kind == "complex":
        return complex(*value)
    if kind == "dtype":
        return _dtype(value)
    if kind == "device":
        return torch.device(value)
    raise DistributedError(f"rank 0 sent an unknown node kind {kind!r}")


def broadcast_tree(tree: Any, ctx: DistributedContext) -> Any:
    """Rank 0's state tree (a ``state_dict``, nested dicts/lists/tuples of tensors and plain values) on
    every rank; other ranks pass None. No pickle: the structure travels as JSON, the tensors as raw
    bytes (asynchronous broadcasts). Received tensors land on the CPU if they were there on rank 0,
    else on ``ctx.device``. Rank 0 gets its own ``tree`` back."""
    _check_context(ctx)
    if not ctx._live():
        return tree
    tensors: list[Tensor] = []

    def describe() -> dict[str, Any]:
        skeleton = encode_tree(tree, tensors, "state")
        return {
            "skeleton": skeleton,
            "tensors": [[str(t.dtype).removeprefix("torch."), list(t.shape), t.device.type] for t in tensors],
        }

    header = _from_main(describe, ctx, "broadcast its state")
    comm_device = _control_device(ctx)
    works: list[Any] = []
    received: list[tuple[Tensor, torch.dtype]] = []
    for i, (dtype_name, shape, _device_type) in enumerate(header["tensors"]):
        dtype = _dtype(dtype_name)
        if ctx.is_main:
            wire = tensors[i].detach().to(comm_device).contiguous().reshape(-1).view(torch.uint8)
        else:
            numel = math.prod(shape)
            wire = torch.empty(
                numel * torch.empty((), dtype=dtype).element_size(), dtype=torch.uint8, device=comm_device
            )
        if wire.numel():
            works.append(dist.broadcast(wire, src=0, async_op=True))
        received.append((wire, dtype))
    for work in works:
        work.wait()
    if ctx.is_main:
        return tree
    target_of = {"cpu": torch.device("cpu")}
    out = [
        wire.view(dtype).reshape(shape).to(target_of.get(device_type, ctx.device))
        for (wire, dtype), (_, shape, device_type) in zip(received, header["tensors"])
    ]
    return decode_tree(header["skeleton"], out)


__all__ = [
    "allreduce_mean_grads",
    "DEFAULT_BUCKET_MB",
    "all_gather_json",
    "allreduce_gradient_buffer",
    "allreduce_mean",
    "any_rank",
    "broadcast_json",
    "broadcast_tree",
    "bucket_slices",
    "decode_tree",
    "encode_tree",
    "flat_span",
]
