"""Capturing, checking and applying model + optimizer state, shared by the fast and durable tiers.

Restoring is split in two so it is all-or-nothing: :func:`plan_restore` checks everything against
the live model and optimizer (keys, shapes, dtypes, optimizer class, parameter groups) and touches
nothing; :func:`apply_restore` then copies. The optimizer is applied first because it is the part
that can still refuse (``load_state_dict``), so a refusal leaves the model untouched too.

Copies go *into* the live tensors (``copy_``), so the source (a snapshot's buffers, a checkpoint's
memory map) is never aliased by the model or the optimizer, and the tensors keep their device: state
saved on a GPU restores onto a model that now lives on the CPU, and the other way round.

A sharded model (FSDP2's ``fully_shard``: parameters and optimizer state are DTensors) is captured
and restored through each DTensor's local shard: a rank's snapshot holds its own shard only, and
restoring copies into that shard in place (the same rank, the same sharding).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tolaria.state.copying import copy_tensors
from tolaria.state.errors import OptimizerStateError, StateError, StateMismatchError
from tolaria.state.trees import clone_tree, map_tensors

__all__ = [
    "qualified_name",
    "optimizer_layout",
    "capture",
    "RestorePlan",
    "plan_restore",
    "apply_restore",
    "restore",
]

_MAX_LISTED = 5


def _dtensor_type() -> type | None:
    # No DTensor exists before torch.distributed.tensor is imported, and importing it costs a second.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _local(t: Any) -> Any:
    """A DTensor's local shard (a view: writing to it writes the parameter); anything else as it is."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(t, dtensor):
        with torch.no_grad():
            return t.to_local()
    return t


def _localized(tree: Any) -> Any:
    return tree if _dtensor_type() is None else map_tensors(tree, _local)


def qualified_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def optimizer_layout(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What a saved optimizer state must match: its class and the parameter shapes of each group."""
    return {
        "optimizer_class": qualified_name(optimizer),
        "param_shapes": [[list(p.shape) for p in group["params"]] for group in optimizer.param_groups],
    }


def capture(model: nn.Module, optimizer: torch.optim.Optimizer, extra: Any = None) -> dict[str, Any]:
    """The live state (tensors not copied) in the layout snapshots and checkpoints share."""
    return {
        "model": _localized(model.state_dict()),
        "optimizer": _localized(optimizer.state_dict()),
        "extra": extra,
        "meta": optimizer_layout(optimizer),
    }


def _listed(keys: set[Any]) -> str:
    shown = sorted(map(str, keys))[:_MAX_LISTED]
    more = f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(shown) + more


def _check_model(model: nn.Module, saved: Any, source: str) -> tuple[bool, dict[str, Any]]:
    """Raises StateMismatchError unless ``saved`` fits ``model``.

    Returns whether every entry is a tensor, and the live entries checked (``state_dict(keep_vars=True)``).
    """
    if not isinstance(saved, dict):
        raise StateMismatchError(f"{source}: model state is a {type(saved).__qualname__}, expected a dict")
    live = _localized(model.state_dict(keep_vars=True))
    missing, unexpected = set(live) - set(saved), set(saved) - set(live)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_listed(unexpected)}")
        raise StateMismatchError(f"{source}: model state does not match {type(model).__qualname__}: {'; '.join(parts)}")
    all_tensors = True
    for key, value in live.items():
        other = saved[key]
        if isinstance(value, Tensor) != isinstance(other, Tensor):
            raise StateMismatchError(
                f"{source}: model entry {key!r} is a {type(other).__qualname__} in the saved state, "
                f"a {type(value).__qualname__} in the model"
            )
        if not isinstance(value, Tensor):
            all_tensors = False
            continue
        if value.shape != other.shape:
            raise StateMismatchError(
                f"{source}: model entry {key!r} has shape {tuple(other.shape)} saved, {tuple(value.shape)} in the model"
            )
        if value.dtype != other.dtype:
            raise StateMismatchError(
                f"{source}: model entry {key!r} has dtype {other.dtype} saved, {value.dtype} in the model"
            )
    return all_tensors, live


def _flat_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    # The same index order as Optimizer.state_dict(): group by group, parameter by parameter.
    return [p for group in optimizer.param_groups for p in group["params"]]


def _check_optimizer(
    optimizer: torch.optim.Optimizer, saved: Any, meta: Any, source: str
) -> tuple[bool, list[Tensor], list[Any]]:
    """Raises OptimizerStateError unless ``saved`` loads into ``optimizer``.

    Returns whether it can be copied in place, the live parameters in state-dict index order, and the
    saved indices in that same order.
    """
    well_formed = isinstance(saved, dict) and isinstance(saved.get("state"), dict)
    if not well_formed or not isinstance(saved.get("param_groups"), list):
        raise OptimizerStateError(
            f"{source}: optimizer state is malformed (expected a dict with 'state' and 'param_groups')"
        )
    if not isinstance(meta, dict) or "optimizer_class" not in meta or "param_shapes" not in meta:
        raise OptimizerStateError(f"{source}: optimizer layout record is missing, so the state cannot be checked")
    cls = qualified_name(optimizer)
    if meta["optimizer_class"] != cls:
        raise OptimizerStateError(
            f"{source}: optimizer state was saved from {meta['optimizer_class']}, the optimizer is {cls}"
        )
    groups, saved_groups, saved_shapes = optimizer.param_groups, saved["param_groups"], meta["param_shapes"]
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved_groups):
        raise OptimizerStateError(f"{source}: optimizer parameter groups are malformed (each needs a 'params' list)")
    if not len(groups) == len(saved_groups) == len(saved_shapes):
        raise OptimizerStateError(
            f"{source}: optimizer has {len(groups)} parameter groups, the saved state has {len(saved_groups)}"
        )
    for gi, (group, saved_group, shapes) in enumerate(zip(groups, saved_groups, saved_shapes)):
        n_saved = len(saved_group["params"])
        if len(group["params"]) != n_saved or n_saved != len(shapes):
            raise OptimizerStateError(
                f"{source}: optimizer group {gi} has {len(group['params'])} parameters, the saved state has {n_saved}"
            )
        for pi, (p, shape) in enumerate(zip(group["params"], shapes)):
            if list(p.shape) != list(shape):
                raise OptimizerStateError(
                    f"{source}: optimizer group {gi} parameter {pi} has shape {tuple(p.shape)}, "
                    f"the saved state was for shape {tuple(shape)}"
                )
    params = _flat_params(optimizer)
    saved_index = [i for g in saved_groups for i in g["params"]]
    try:
        known: set[Any] | list[Any] = set(saved_index)
    except TypeError:  # an unhashable index (a malformed state): look it up in the list, as it is
        known = saved_index
    for idx in saved["state"]:
        if idx not in known:
            raise OptimizerStateError(
                f"{source}: optimizer state has an entry for parameter {idx!r}, which no group lists"
            )
    return _fits_in_place(optimizer, saved, params, saved_index), params, saved_index


def _fits_in_place(
    optimizer: torch.optim.Optimizer, saved: dict[str, Any], params: list[Tensor], saved_index: list[Any]
) -> bool:
    """In place needs the live state to have exactly the saved structure: same entries, same tensor shapes."""
    for p, idx in zip(params, saved_index):
        saved_entry = saved["state"].get(idx)
        live_entry = optimizer.state.get(p, {})
        if not saved_entry and not live_entry:
            continue
        if not saved_entry or not live_entry or set(saved_entry) != set(live_entry):
            return False
        for key, value in saved_entry.items():
            live_value = _local(live_entry[key])
            if isinstance(value, Tensor) != isinstance(live_value, Tensor):
                return False
            if isinstance(value, Tensor) and (value.shape != live_value.shape or value.dtype != live_value.dtype):
                return False
    return True


@dataclass
class RestorePlan:
    """A checked restore, ready for :func:`apply_restore`."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    state: dict[str, Any]
    source: str
    model_all_tensors: bool
    optimizer_in_place: bool
    # What the checks read from the live objects, reused when applying: apply the plan to the same,
    # unchanged model and optimizer it was checked against.
    live_model: dict[str, Any]  # model.state_dict(keep_vars=True)
    params: list[Tensor]  # the optimizer's parameters, in state-dict index order
    saved_index: list[Any]  # the saved state's parameter indices, in that same order


def plan_restore(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], source: str) -> RestorePlan:
    """Checks ``state`` (``model``/``optimizer``/``meta`` entries) against the live objects; mutates nothing.

    Raises :class:`StateMismatchError` (model) or :class:`OptimizerStateError` (optimizer) naming what
    differs and where ``source`` came from.
    """
    model_all_tensors, live_model = _check_model(model, state.get("model"), source)
    in_place, params, saved_index = _check_optimizer(optimizer, state.get("optimizer"), state.get("meta"), source)
    return RestorePlan(model, optimizer, state, source, model_all_tensors, in_place, live_model, params, saved_index)


def _optimizer_in_place(plan: RestorePlan) -> list[tuple[Tensor, Tensor]]:
    """Sets the plain values (hyperparameters, counters) and returns the tensor copies still to do."""
    optimizer, saved = plan.optimizer, plan.state["optimizer"]
    pairs: list[tuple[Tensor, Tensor]] = []
    for p, idx in zip(plan.params, plan.saved_index):
        live = optimizer.state.get(p, {})
        for key, value in saved["state"].get(idx, {}).items():
            if isinstance(value, Tensor):
                pairs.append((_local(live[key]), value))
            else:
                live[key] = copy.deepcopy(value)
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        for key, value in saved_group.items():
            if key == "params":
                continue
            current = group.get(key)
            if isinstance(value, Tensor) and isinstance(current, Tensor) and current.shape == value.shape:
                pairs.append((current, value))  # keep the tensor's identity (compiled steps hold it)
            else:
                group[key] = value.clone() if isinstance(value, Tensor) else copy.deepcopy(value)
    return pairs


def _load_optimizer(plan: RestorePlan) -> None:
    # A different structure (e.g. a fresh optimizer with no state yet): load a private copy, since
    # load_state_dict keeps tensors that are already on the right device instead of copying them.
    dtensor = _dtensor_type()
    if dtensor is not None and any(isinstance(p, dtensor) for p in plan.params) and plan.state["optimizer"]["state"]:
        raise OptimizerStateError(
            f"{plan.source}: the optimizer of a sharded (DTensor) model has state of another structure than the "
            "saved shards; sharded optimizer state is restored in place only, so nothing was changed"
        )
    try:
        plan.optimizer.load_state_dict(clone_tree(plan.state["optimizer"]))
    except Exception as exc:
        raise OptimizerStateError(
            f"{plan.source}: optimizer state did not load ({type(exc).__name__}: {exc}); the model was not touched"
        ) from exc


def apply_restore(plan: RestorePlan) -> None:
    """Copies a checked state into the live optimizer and model.

    The optimizer's ``load_state_dict`` (when the state cannot be copied in place) runs first: it is
    the one step that can still refuse, and then nothing else has been touched.
    """
    pairs: list[tuple[Tensor, Tensor]] = []
    if plan.optimizer_in_place:
        pairs += _optimizer_in_place(plan)
    else:
        _load_optimizer(plan)
    try:
        if plan.model_all_tensors:
            live = plan.live_model
            pairs += [(live[key], plan.state["model"][key]) for key in live]
            copy_tensors(pairs)
        else:  # entries such as a module's extra state go through the module's own loader
            copy_tensors(pairs)
            plan.model.load_state_dict(plan.state["model"], strict=True)
    except Exception as exc:
        raise StateError(
            f"{plan.source}: the optimizer state was restored but copying the model state failed "
            f"({type(exc).__name__}: {exc}); model and optimizer are now inconsistent"
        ) from exc


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], source: str) -> None:
    """Checks, then applies (see :func:`plan_restore`, :func:`apply_restore`)."""
    apply_restore(plan_restore(model, optimizer, state, source))
