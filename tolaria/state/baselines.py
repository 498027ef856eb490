"""The earlier prototype's rollback cache, kept only as the benchmark's point of comparison.

It snapshotted by pickling the state dicts into bytes (``torch.save`` to a ``BytesIO``) and
restored by unpickling them and calling ``load_state_dict``. ``benchmarks/rollback.py`` times it
beside the fast tier; nothing in Tolaria uses it. It lives here because only ``tolaria.state`` calls
``torch.save``/``torch.load`` (and the load uses ``weights_only=True``, unlike the prototype's).
"""

from __future__ import annotations

import io

import torch
from torch import nn

__all__ = ["pickled_snapshot", "pickled_restore"]


def pickled_snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> io.BytesIO:
    """The prototype's snapshot: the state dicts serialised into an in-memory buffer."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    return buffer


def pickled_restore(buffer: io.BytesIO, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The prototype's restore: deserialise the buffer, then ``load_state_dict`` both."""
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
