"""Batches and devices: what the model gets from a batch, moving batches, the run's device and its
autocast.

A batch is a tensor, a tuple/list whose first item is the model's input, or a mapping with an
``"inputs"`` entry; the loop sends the input to the model's device and the whole batch (targets
included) to the device of the model's outputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import ConfigError

__all__ = ["autocast", "data_length", "default_run_dir", "first_tensor", "move_to", "resolve_device", "split_inputs"]


def split_inputs(batch: Any) -> Any:
    """The model's input of a batch: the batch itself (a tensor), its first item (a tuple or list),
    or its ``"inputs"`` entry (a mapping)."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("got an empty batch")
        return batch[0]
    if isinstance(batch, Mapping):
        if "inputs" not in batch:
            raise KeyError(f"a mapping batch needs an 'inputs' entry for the model; it has {sorted(map(str, batch))}")
        return batch["inputs"]
    raise TypeError(f"batches must be a tensor, a tuple/list or a mapping, got {type(batch).__name__}")


def move_to(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside (tuples, lists, mappings) moved to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        moved = [move_to(o, device) for o in obj]
        # A named tuple is rebuilt as its own type, so loss functions can keep reading its fields.
        return type(obj)(*moved) if hasattr(obj, "_fields") else tuple(moved)
    if isinstance(obj, list):
        return [move_to(o, device) for o in obj]
    if isinstance(obj, Mapping):
        return {k: move_to(v, device) for k, v in obj.items()}
    return obj


def first_tensor(obj: Any) -> Tensor | None:
    """The first tensor in ``obj`` (depth first), or None."""
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        items: Iterable[Any] = obj
    elif isinstance(obj, Mapping):
        items = obj.values()
    else:
        return None
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def resolve_device(name: str) -> torch.device:
    """The device a config names (``"auto"``: CUDA when available, else CPU); unavailable CUDA raises."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available; use device='auto' or 'cpu'")
    return device


def default_run_dir() -> Path:
    """``runs/<timestamp>``: the run folder when the config names none."""
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def data_length(data: Any) -> int | None:
    """``len(data)``, or None for data without a length (an iterable stream)."""
    try:
        return len(data)
    except TypeError:
        return None


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of the config's ``amp`` (``"auto"``: bf16 on CUDA only) on ``device``."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
