"""The aggregation engine: Gram matrix, weighting, one weighted sum.

Every aggregator is "weights from the Gram matrix, then one weighted sum" (docs/ARCHITECTURE.md):

1. ``gram``: G = J J^T, one pass over the K x N matrix J;
2. ``weighting``: a function of the K x K matrix G alone, returning the K weights w;
3. ``combine``: out = w^T J, a second pass, written in J's dtype.

This module is the only place that chooses a backend. Nothing in it reads a device value on the host
unless ``nonfinite="raise"`` asks for the finiteness check, which reads the K diagonal entries of G.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ._sources import Sources, check_out
from .backends import Backend, CompiledCpuBackend, TorchBackend
from .stats import AggregationStats, stats_from_gram

__all__ = [
    "BACKENDS",
    "NONFINITE_MODES",
    "Weights",
    "Weighting",
    "has_float64",
    "compiled_backend_fallbacks",
    "check_backend_name",
    "check_nonfinite_mode",
    "uses_triton",
    "select_backend",
    "raise_if_nonfinite",
    "aggregate",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cpu", "torch", "triton")
NONFINITE_MODES = ("raise", "propagate")


class Weights(NamedTuple):
    """What a weighting returns: the K combination weights and the number of conflicts it resolved."""

    weights: Tensor
    conflicts: Tensor


Weighting = Callable[[Tensor], Weights]


def has_float64(device: torch.device) -> bool:
    """Whether the K x K work runs in float64 on ``device``: everywhere but MPS, which lacks it."""
    return device.type != "mps"


_torch_backend = TorchBackend()
_cpu_backend = CompiledCpuBackend()


def _triton_backend() -> Backend:
    from .backends.triton import TritonBackend  # imported on first use: triton is heavy to load

    return TritonBackend.instance()


_compiled_missing = {"warned": False, "fallbacks": 0}


def _warn_compiled_missing(reason: str) -> None:
    _compiled_missing["fallbacks"] += 1
    if not _compiled_missing["warned"]:
        _compiled_missing["warned"] = True
        message = (
            f"{reason}; backend='auto' runs CPU tensors on the plain-PyTorch path, several times slower. "
            "Reinstall tolaria (pip install -e . builds the extension; it needs a C++17 compiler) "
            "or pass backend='torch' to choose that path knowingly"
        )
        log.error(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def compiled_backend_fallbacks() -> int:
    """How many calls under ``backend="auto"`` ran CPU tensors on the plain-PyTorch path because the
    compiled extension did not load (0 on a working install); the trainer reports it in telemetry."""
    return _compiled_missing["fallbacks"]


def check_backend_name(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends are {', '.join(BACKENDS)}")
    return backend


def check_nonfinite_mode(mode: str) -> str:
    if mode not in NONFINITE_MODES:
        raise ValueError(f"unknown nonfinite mode {mode!r}; valid modes are {', '.join(NONFINITE_MODES)}")
    return mode


def uses_triton(name: str, device: torch.device) -> bool:
    """Whether :func:`select_backend` runs ``name`` on ``device`` with the Triton backend; weightings
    then run their K x K work in its device kernels too (e.g. PCGrad's projection loop)."""
    return name == "triton" or (name == "auto" and device.type == "cuda")


def select_backend(name: str, sources: Sources) -> Backend:
    """The backend that will run ``sources``: forced by name, or chosen by device under "auto"."""
    if name == "auto":
        if uses_triton(name, sources.device):
            backend = _triton_backend()
            reason = backend.supports(sources)
            if reason is not None:
                raise ValueError(
                    f"backend 'auto' picks the Triton backend for {sources.device} tensors, which cannot "
                    f"run them: {reason}; pass backend='torch' to use plain PyTorch"
                )
            return backend
        reason = _cpu_backend.supports(sources)
        if reason is None:
            return _cpu_backend
        if sources.device.type == "cpu" and not _cpu_backend.available:
            _warn_compiled_missing(reason)  # a broken install: loud, once, and counted
        return _torch_backend
    backend = {"cpu": lambda: _cpu_backend, "torch": lambda: _torch_backend, "triton": _triton_backend}[
        check_backend_name(name)
    ]()
    reason = backend.supports(sources)
    if reason is not None:
        raise ValueError(f"backend {name!r} cannot run these gradients: {reason}")
    return backend


def raise_if_nonfinite(gram: Tensor) -> None:
    """Raises naming every source whose gradient holds NaN or inf (they show on G's diagonal)."""
    bad = (~torch.isfinite(gram.diagonal())).nonzero().flatten().tolist()
    if bad:
        which = ", ".join(str(i) for i in bad)
        raise ValueError(
            f"non-finite values (NaN or inf) in gradient source(s) {which}; "
            'pass nonfinite="propagate" to skip this check'
        )


def aggregate(
    sources: Sources,
    weighting: Weighting,
    *,
    backend: str = "auto",
    nonfinite: str = "raise",
    out: Tensor | None = None,
    with_stats: bool = True,
    fixed_weights: Callable[[int, torch.device], Tensor] | None = None,
    wide_combine: bool = False,
) -> tuple[Tensor, AggregationStats | None]:
    """Runs the three steps on ``sources``; returns the flat N-tensor result and its stats
    (``None`` unless ``with_stats``: they cost a few small ops per call).

    ``fixed_weights(k, device)``, for weightings that ignore G (sums, means, fixed weights), lets a
    call without stats skip the Gram pass: J is read once. ``wide_combine`` accumulates the combine in
    float64 (see ``Aggregator.wide_combine``)."""
    impl = select_backend(backend, sources)
    if out is not None:
        check_out(out, sources)
    if fixed_weights is not None and not with_stats:
        # Weights that do not depend on G: one pass over J, the combine, which also reports whether
        # every sum was finite; G is computed only to name the sources when one was not.
        weights = fixed_weights(sources.k, sources.device)
        if nonfinite != "raise":
            return impl.combine(sources, weights, out), None
        flat, finite = impl.combine_checked(sources, weights, out)
        if not finite:
            raise_if_nonfinite(impl.gram(sources))  # a finite diagonal: finite inputs that overflowed
        return flat, None
    gram = impl.gram(sources)
    if nonfinite == "raise":
        raise_if_nonfinite(gram)
    # The K x K work is tiny: do it in float64 wherever the device offers it, for exact weights
    # (the Triton backend's Gram pass already returns float64: no extra kernel, no sync).
    gram = gram.to(torch.float64) if has_float64(gram.device) else gram
    weights, conflicts = weighting(gram)
    flat = impl.combine(sources, weights, out, wide=wide_combine)
    return flat, stats_from_gram(gram, weights, conflicts) if with_stats else None
