"""Turns whatever the caller passed as gradients into one validated view: K sources of N elements.

Every aggregator accepts a K x N tensor, a K x (any shape) tensor, or a sequence of K tensors of one
shape. Validation looks at metadata only (shapes, dtypes, devices), so it never reads a value from
the device. Errors name the offending source index.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch
from torch import Tensor

__all__ = ["SUPPORTED_DTYPES", "Sources", "as_sources", "check_out"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Sources:
    """K gradient sources of N elements each, all of one dtype, on one device.

    ``matrix`` is the K x N view when the caller passed one tensor (rows may be strided); ``rows``
    are the K flat rows, built lazily and never stacked.
    """

    def __init__(self, rows: Sequence[Tensor] | None, matrix: Tensor | None, shape: torch.Size):
        self._rows = None if rows is None else tuple(rows)
        self.matrix = matrix
        self.shape = shape
        first = matrix if matrix is not None else self._rows[0]
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        self.k: int = matrix.shape[0] if matrix is not None else len(self._rows)
        self.n: int = shape.numel()

    @cached_property
    def rows(self) -> tuple[Tensor, ...]:
        if self._rows is not None:
            return self._rows
        return tuple(self.matrix.unbind(0))

    def stacked(self) -> Tensor:
        """The K x N matrix, stacking the rows only when the caller did not pass one tensor."""
        if self.matrix is not None:
            return self.matrix
        return torch.stack(self._rows)


def _check_dtype(dtype: torch.dtype, where: str) -> None:
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise TypeError(f"{where} has dtype {dtype}; gradients must be one of {names}")


def as_sources(grads: Tensor | Sequence[Tensor]) -> Sources:
    """Validates ``grads`` and returns them as :class:`Sources` (views, no copies where possible)."""
    if isinstance(grads, Tensor):
        if grads.dim() == 0:
            raise ValueError("a 0-d tensor holds no gradient sources; pass a K x N tensor")
        if grads.shape[0] == 0:
            raise ValueError("no gradient sources: the input tensor has K = 0 rows")
        _check_dtype(grads.dtype, "the input tensor")
        shape = grads.shape[1:]
        if shape.numel() == 0:
            raise ValueError(f"gradient sources are empty: each has shape {tuple(shape)}")
        return Sources(None, grads.reshape(grads.shape[0], -1), shape)

    if isinstance(grads, (str, bytes)) or not isinstance(grads, Sequence):
        raise TypeError(f"expected a tensor or a sequence of tensors, got {type(grads).__name__}")
    if len(grads) == 0:
        raise ValueError("no gradient sources: the input sequence is empty (K = 0)")
    for i, g in enumerate(grads):
        if not isinstance(g, Tensor):
            raise TypeError(f"gradient source {i} is a {type(g).__name__}, not a torch.Tensor")
    first = grads[0]
    _check_dtype(first.dtype, "gradient source 0")
    if first.numel() == 0:
        raise ValueError(f"gradient sources are empty: source 0 has shape {tuple(first.shape)}")
    for i, g in enumerate(grads[1:], start=1):
        if g.shape != first.shape:
            raise ValueError(
                f"gradient source {i} has shape {tuple(g.shape)}, but source 0 has shape {tuple(first.shape)}"
            )
        if g.dtype != first.dtype:
            raise ValueError(f"gradient source {i} has dtype {g.dtype}, but source 0 has dtype {first.dtype}")
        if g.device != first.device:
            raise ValueError(f"gradient source {i} is on {g.device}, but source 0 is on {first.device}")
    return Sources([g.reshape(-1) for g in grads], None, first.shape)


def check_out(out: Tensor, sources: Sources) -> None:
    """Checks that ``out`` can receive the aggregate of ``sources`` in place."""
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.numel() != sources.n:
        raise ValueError(f"out has {out.numel()} elements; the sources have {sources.n} each")
    if out.dtype != sources.dtype or out.device != sources.device:
        raise ValueError(f"out is {out.dtype} on {out.device}; the sources are {sources.dtype} on {sources.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
