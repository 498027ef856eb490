"""State trees: nested dicts, lists and tuples of tensors and plain values (a ``state_dict``, say).

Three things are done to them here:

- :func:`check_loadable` walks a tree and refuses anything ``torch.load(weights_only=True)`` could
  not read back, naming the path of the first offender, so a checkpoint never commits a file that
  cannot be restored.
- :func:`map_tensors` rebuilds a tree with every tensor replaced (cloned, moved, ...), deep-copying
  the plain values so the result shares nothing mutable with its source.
- :func:`pack` copies a tree's tensors into a few flat per-dtype buffers (pinned when the source
  lives on a CUDA device, copied asynchronously; CPU copies spread over a few threads, see
  :mod:`tolaria.state.copying`), the fast tier's in-memory snapshot. Its byte count is exact and
  known before anything is allocated (:func:`plan_pack` walks the tree once and lays the buffers
  out; :func:`pack` takes that plan; :func:`packed_nbytes` counts without copying anything).
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tolaria.state.copying import copy_tensors
from tolaria.state.errors import StateError

__all__ = [
    "check_loadable",
    "map_tensors",
    "clone_tree",
    "tensors_of",
    "packed_nbytes",
    "PackPlan",
    "plan_pack",
    "PackedTree",
    "pack",
]

# Each tensor starts on a 64-byte boundary inside its flat buffer (a cache line; every itemsize divides it).
_ALIGN_BYTES = 64

_PLAIN_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
_KEY_TYPES = (str, int, float, bool, type(None))


def _path_join(path: str, key: Any) -> str:
    return f"{path}[{key!r}]"


def check_loadable(tree: Any, path: str = "state") -> None:
    """Raises ``TypeError`` naming the first value ``torch.load(weights_only=True)`` would refuse.

    Accepted: dicts (``str``/number/bool/None keys), lists, plain tuples, ``torch.Size``, strided
    non-quantized tensors, ``None``, bools, numbers, strings, bytes, ``torch.dtype``, ``torch.device``.
    """
    if isinstance(tree, Tensor):
        _check_tensor(tree, path)
    elif isinstance(tree, torch.Size) or type(tree) in _PLAIN_LEAVES:
        return
    elif isinstance(tree, dict):
        if type(tree) not in (dict, OrderedDict):
            raise TypeError(f"{path}: {type(tree).__qualname__} cannot be loaded with weights_only=True; use a dict")
        for key, value in tree.items():
            if type(key) not in _KEY_TYPES:
                raise TypeError(
                    f"{path}: key {key!r} of type {type(key).__qualname__} is not a str, number, bool or None"
                )
            check_loadable(value, _path_join(path, key))
    elif type(tree) in (list, tuple):
        for i, value in enumerate(tree):
            check_loadable(value, f"{path}[{i}]")
    else:
        raise TypeError(
            f"{path}: {type(tree).__module__}.{type(tree).__qualname__} cannot be loaded with weights_only=True; "
            "store tensors, dicts, lists, tuples, numbers, strings or None (convert numpy arrays with torch.from_numpy)"
        )


def _check_tensor(t: Tensor, path: str) -> None:
    if t.layout != torch.strided:
        raise TypeError(f"{path}: tensors with layout {t.layout} are not supported; store a dense tensor")
    if t.is_quantized:
        raise TypeError(f"{path}: quantized tensors are not supported")
    if t.is_meta:
        raise TypeError(f"{path}: a meta tensor has no data to save")
    if type(t) not in (Tensor, torch.nn.Parameter):
        raise TypeError(f"{path}: tensor subclass {type(t).__qualname__} is not supported; store a plain tensor")


def _rebuild(tree: Any, leaf: Callable[[Any, str], Any], path: str) -> Any:
    """Rebuilds the containers of ``tree``, calling ``leaf(value, path)`` on everything else."""
    if isinstance(tree, dict):
        out: dict[Any, Any] = OrderedDict() if isinstance(tree, OrderedDict) else {}
        for key, value in tree.items():
            out[key] = _rebuild(value, leaf, _path_join(path, key))
        metadata = getattr(tree, "_metadata", None)  # module versions kept by nn.Module.state_dict
        if metadata is not None:
            out._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
        return out
    if isinstance(tree, list):
        return [_rebuild(v, leaf, f"{path}[{i}]") for i, v in enumerate(tree)]
    if isinstance(tree, tuple) and not isinstance(tree, torch.Size):
        items = [_rebuild(v, leaf, f"{path}[{i}]") for i, v in enumerate(tree)]
        return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)
    return leaf(tree, path)


def map_tensors(tree: Any, fn: Callable[[Tensor], Tensor], path: str = "state") -> Any:
    """A new tree with ``fn`` applied to every tensor and every other value deep-copied."""

    def leaf(value: Any, _path: str) -> Any:
        return fn(value) if isinstance(value, Tensor) else copy.deepcopy(value)

    return _rebuild(tree, leaf, path)


def clone_tree(tree: Any) -> Any:
    """A deep copy whose tensors are fresh clones (same device), sharing no storage with ``tree``."""
    return map_tensors(tree, lambda t: t.detach().clone())


def tensors_of(tree: Any) -> list[Tensor]:
    """The tensors of ``tree``, in walk order."""
    found: list[Tensor] = []

    def leaf(value: Any, _path: str) -> Any:
        if isinstance(value, Tensor):
            found.append(value)
        return None

    _rebuild(tree, leaf, "state")
    return found


@dataclass(frozen=True)
class _Slot:
    """Where one tensor of a packed tree lives: a region of the flat buffer of its dtype."""

    dtype: torch.dtype
    offset: int  # in elements
    shape: torch.Size


def _layout(tensors: list[Tensor]) -> tuple[list[tuple[torch.dtype, int]], dict[torch.dtype, int]]:
    """Per tensor (dtype, element offset); per dtype the buffer length in elements."""
    offsets: list[tuple[torch.dtype, int]] = []
    lengths: dict[torch.dtype, int] = {}
    for t in tensors:
        align = max(1, _ALIGN_BYTES // t.element_size())
        start = -(-lengths.get(t.dtype, 0) // align) * align
        offsets.append((t.dtype, start))
        lengths[t.dtype] = start + t.numel()
    return offsets, lengths


def _nbytes(lengths: dict[torch.dtype, int]) -> int:
    return sum(n * dtype.itemsize for dtype, n in lengths.items())


def _collect(tree: Any, path: str) -> tuple[Any, list[Tensor]]:
    """The tree's structure with tensors replaced by their index, and the tensors in that order."""
    tensors: list[Tensor] = []

    def leaf(value: Any, leaf_path: str) -> Any:
        if isinstance(value, Tensor):
            _check_tensor(value, leaf_path)
            tensors.append(value.detach())
            return _TensorIndex(len(tensors) - 1)
        return copy.deepcopy(value)

    return _rebuild(tree, leaf, path), tensors


@dataclass(frozen=True)
class _TensorIndex:
    index: int


def packed_nbytes(tree: Any) -> int:
    """Bytes :func:`pack` will hold for ``tree`` (exact, padding included), without copying anything."""
    _, lengths = _layout(tensors_of(tree))
    return _nbytes(lengths)


@dataclass(frozen=True, eq=False)
class PackPlan:
    """One walk of a tree, ready for :func:`pack`: its structure, its tensors and their buffer layout.

    ``nbytes`` is exactly what the packed tree will hold (padding included), known before anything
    is allocated.
    """

    structure: Any  # the tree, tensors replaced by their index into ``tensors``, plain values copied
    tensors: list[Tensor]  # detached, in walk order
    offsets: list[tuple[torch.dtype, int]]  # per tensor: its buffer's dtype and its offset there, in elements
    lengths: dict[torch.dtype, int]  # per dtype: the buffer's length, in elements
    nbytes: int
    path: str  # names the tree in errors


def plan_pack(tree: Any, path: str = "state") -> PackPlan:
    """Walks ``tree`` once (refusing tensors :func:`pack` cannot hold) and lays out its buffers."""
    structure, tensors = _collect(tree, path)
    offsets, lengths = _layout(tensors)
    return PackPlan(structure, tensors, offsets, lengths, _nbytes(lengths), path)


class PackedTree:
    """A state tree whose tensors were copied into one flat buffer per dtype.

    ``nbytes`` is exactly the memory the buffers hold. For tensors from a CUDA device the buffers are
    pinned and the copies asynchronous on the current stream; :meth:`wait` blocks (or polls, up to a
    deadline) until they have landed.
    """

    def __init__(self, structure: Any, slots: list[_Slot], buffers: dict[torch.dtype, Tensor], events: list[Any]):
        self._structure = structure
        self._slots = slots
        self._buffers = buffers
        self._events = events
        self.nbytes = sum(b.numel() * b.element_size() for b in buffers.values())
        self.pinned = any(b.is_pinned() for b in buffers.values()) if events else False

    def wait(self, deadline: float | None = None) -> bool:
        """True once every asynchronous copy has finished; False if ``deadline`` (monotonic s) came first."""
        while self._events:
            event = self._events[0]
            if deadline is None:
                event.synchronize()
            elif not event.query():
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.0002)
                continue
            self._events.pop(0)
        return True

    def unpack(self) -> Any:
        """The tree, its tensors as views of the buffers (no copy): read them, never keep or mutate them."""

        def leaf(value: Any, _path: str) -> Any:
            if isinstance(value, _TensorIndex):
                slot = self._slots[value.index]
                flat = self._buffers[slot.dtype]
                return flat[slot.offset : slot.offset + slot.shape.numel()].view(slot.shape)
            return copy.deepcopy(value)

        return _rebuild(self._structure, leaf, "state")


def pack(tree: Any, path: str = "state") -> PackedTree:
    """Copies ``tree`` into flat per-dtype buffers (pinned and asynchronous for CUDA sources).

    ``tree`` may be a :class:`PackPlan` from :func:`plan_pack` (then its own ``path`` names it in
    errors), so a caller that needed the byte count first walks the tree only once.
    """
    plan = tree if isinstance(tree, PackPlan) else plan_pack(tree, path)
    tensors = plan.tensors
    on_cuda = {t.dtype for t in tensors if t.is_cuda}
    buffers: dict[torch.dtype, Tensor] = {}
    for dtype, n in plan.lengths.items():
        try:
            buffers[dtype] = torch.empty(n, dtype=dtype, pin_memory=dtype in on_cuda)
        except RuntimeError as exc:
            raise StateError(
                f"{plan.path}: could not allocate {n * dtype.itemsize} bytes of host memory for {dtype} tensors: {exc}"
            ) from exc
    slots: list[_Slot] = []
    pairs: list[tuple[Tensor, Tensor]] = []
    for t, (dtype, offset) in zip(tensors, plan.offsets):
        slot = _Slot(dtype, offset, t.shape)
        slots.append(slot)
        pairs.append((buffers[dtype][offset : offset + t.numel()].view(t.shape), t))
    copy_tensors(pairs)  # CUDA sources: asynchronous on the current stream, recorded below
    events = []
    for device in sorted({t.device.index or 0 for t in tensors if t.is_cuda}):
        with torch.cuda.device(device):
            event = torch.cuda.Event()
            event.record()
            events.append(event)
    return PackedTree(plan.structure, slots, buffers, events)
