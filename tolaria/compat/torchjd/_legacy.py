"""The public ``backward`` and ``mtl_backward`` of ``tolaria.compat.torchjd``: TorchJD 0.18's call form
and the older ones (0.3 to 0.8: the aggregator in the call; 0.2: ``A=aggregator``), told apart by
their arguments and bound to the matching signature; ``inspect.signature`` shows 0.18's."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ._jacobian import _backward, _mtl_backward

__all__ = ["backward", "mtl_backward"]


def _backward_v018(tensors, /, *, jac_tensors=None, inputs=None, retain_graph=False, parallel_chunk_size=None):
    """TorchJD 0.18."""


def _backward_v03(tensors, aggregator, inputs=None, retain_graph=False, parallel_chunk_size=None):
    """TorchJD 0.3 to 0.8: the aggregator in the call."""


def _backward_v02(tensors, inputs, A, retain_graph=False, parallel_chunk_size=None):
    """TorchJD 0.2: inputs second, the aggregator as ``A``."""


def backward(*args: Any, **kwargs: Any) -> None:
    """Accumulates into each input's ``.jac`` the Jacobian of ``tensors`` with respect to it,
    left-multiplied by ``jac_tensors``; TorchJD 0.18's ``backward``:
    ``backward(tensors, /, *, jac_tensors=None, inputs=None, retain_graph=False, parallel_chunk_size=None)``.

    Args:
        tensors: the tensor or tensors to differentiate (non-empty, unique).
        jac_tensors: one tensor per tensor, of its shape after a first dimension K shared by all: row r
            backpropagates ``[J[r] for J in jac_tensors]``. Default: the identity, one row per element of
            ``tensors`` (K = the number of losses, for scalar losses).
        inputs: the tensors whose ``.jac`` receive their K x (shape) Jacobian (each must satisfy
            ``requires_grad and (is_leaf or retains_grad)``). Default: the leaf tensors ``tensors``
            depend on.
        retain_graph: keep the graph after the last pass.
        parallel_chunk_size: validated (``None`` or a positive int) and otherwise ignored: the rows are
            always computed one backward pass at a time (see the module docstring).

    The older form, ``backward(tensors, aggregator, inputs=None, retain_graph=False,
    parallel_chunk_size=None)`` (TorchJD 0.3 to 0.8; ``backward(tensors, inputs, A=aggregator)`` for 0.2),
    aggregates the Jacobian at once and accumulates the result into the inputs' ``.grad``; ``.jac`` is
    left alone.
    """
    if "A" in kwargs:
        b = inspect.signature(_backward_v02).bind(*args, **kwargs)
        b.apply_defaults()
        a = b.arguments
        return _backward(
            a["tensors"], None, a["inputs"], a["retain_graph"], a["parallel_chunk_size"], _required(a["A"])
        )
    if len(args) > 1 or "aggregator" in kwargs:
        b = inspect.signature(_backward_v03).bind(*args, **kwargs)
        b.apply_defaults()
        a = b.arguments
        return _backward(
            a["tensors"], None, a["inputs"], a["retain_graph"], a["parallel_chunk_size"], _required(a["aggregator"])
        )
    b = inspect.signature(_backward_v018).bind(*args, **kwargs)
    b.apply_defaults()
    a = b.arguments
    return _backward(a["tensors"], a["jac_tensors"], a["inputs"], a["retain_graph"], a["parallel_chunk_size"])


def _required(aggregator: Any) -> Any:
    if aggregator is None:
        raise TypeError("the aggregator of the older backward / mtl_backward form cannot be None")
    return aggregator


def _mtl_backward_v018(
    tensors,
    /,
    features,
    *,
    grad_tensors=None,
    tasks_params=None,
    shared_params=None,
    retain_graph=False,
    parallel_chunk_size=None,
):
    """TorchJD 0.18."""


def _mtl_backward_v03(
    losses, features, aggregator, tasks_params=None, shared_params=None, retain_graph=False, parallel_chunk_size=None
):
    """TorchJD 0.3 to 0.8: the aggregator in the call."""


def _mtl_backward_v02(losses, features, tasks_params, shared_params, A, retain_graph=False, parallel_chunk_size=None):
    """TorchJD 0.2: the parameters before the aggregator ``A``."""


def _mtl_backward_before_018(signature_of: Callable[..., Any], aggregator_key: str, args: tuple, kwargs: dict) -> None:
    """mtl_backward called as TorchJD 0.2 (``A=``) or 0.3 to 0.8 (``aggregator=``) spelled it."""
    bound = inspect.signature(signature_of).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    return _mtl_backward(
        a["losses"],
        a["features"],
        None,
        a["tasks_params"],
        a["shared_params"],
        a["retain_graph"],
        a["parallel_chunk_size"],
        _required(a[aggregator_key]),
    )


def mtl_backward(*args: Any, **kwargs: Any) -> None:
    """Multi-task backward; TorchJD 0.18's ``mtl_backward``: ``mtl_backward(tensors, /, features, *,
    grad_tensors=None, tasks_params=None, shared_params=None, retain_graph=False, parallel_chunk_size=None)``.

    The Jacobian of the K task tensors with respect to the shared parameters, through the
    ``features`` only (row k: task k's gradient at the features, backpropagated to the shared
    parameters), is accumulated into their ``.jac``; each task's plain gradient with respect to its
    own parameters is accumulated into their ``.grad`` (a parameter of several tasks gets the sum).

    Args:
        tensors: the K task tensors (losses, or non-scalar tensors with ``grad_tensors``).
        features: the last shared representation(s) (non-empty).
        grad_tensors: one gradient per tensor, of its shape (default: 1 for scalar tensors).
        tasks_params: the parameters of each task (default: the leaves of each tensor's graph that do
            not come through the features).
        shared_params: the shared parameters (default: the leaves of the features' graph); none in
            common with ``tasks_params``.
        retain_graph: keep the graph after the last pass.
        parallel_chunk_size: validated and otherwise ignored (one backward pass per task).

    The older form, ``mtl_backward(losses, features, aggregator, tasks_params=None, shared_params=None,
    retain_graph=False, parallel_chunk_size=None)`` (TorchJD 0.3 to 0.8; also with ``losses=`` and
    ``aggregator=`` by keyword, and 0.2's ``mtl_backward(losses, features, tasks_params, shared_params,
    A=aggregator)``), aggregates the shared parameters' Jacobian at once and accumulates it into their
    ``.grad``; ``.jac`` is left alone.
    """
    if "A" in kwargs:
        return _mtl_backward_before_018(_mtl_backward_v02, "A", args, kwargs)
    if len(args) > 2 or "aggregator" in kwargs or "losses" in kwargs:
        return _mtl_backward_before_018(_mtl_backward_v03, "aggregator", args, kwargs)
    b = inspect.signature(_mtl_backward_v018).bind(*args, **kwargs)
    b.apply_defaults()
    a = b.arguments
    return _mtl_backward(
        a["tensors"],
        a["features"],
        a["grad_tensors"],
        a["tasks_params"],
        a["shared_params"],
        a["retain_graph"],
        a["parallel_chunk_size"],
    )


backward.__signature__ = inspect.signature(_backward_v018)  # type: ignore[attr-defined]
mtl_backward.__signature__ = inspect.signature(_mtl_backward_v018)  # type: ignore[attr-defined]
