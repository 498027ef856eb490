"""Conflict-aware gradient aggregation in Gram space.

Every aggregator maps K gradients (a K x N tensor, a K x (any shape) tensor, or a sequence of K
tensors of one shape) to one tensor of the per-source shape, in the inputs' dtype and on their
device, with two passes over the gradients whatever K is.
"""

import importlib
from typing import Any

from tolaria.registry import AGGREGATORS, locate

from ._coordinatewise import CoordinatewiseAggregator
from ._eigh import jacobi_eig, symmetric_eig
from ._gradient_rounds import AGGREGATION_LEVELS, BUFFER_MODES, is_gramian
from ._sources import Sources, as_sources
from .aggregator import Aggregator
from .backends.cpu import CPU_ISA_ENV, cpu_isa, set_cpu_isa, supported_cpu_isas
from .buffer import GradientBuffer
from .engine import Weights
from .features import FeatureGradientBuffer
from .functional import (
    aggregate_mean,
    aggregate_sum,
    aggregate_weighted,
    combine_flat_grads,
    flat_to_grads,
    grads_to_flat,
    pcgrad,
)
from .low_memory import LowMemoryGradientBuffer, MemoryEstimate, estimate_memory, measure_activations
from .sharded_buffer import FSDPGradientBuffer, ZeroGradientBuffer
from .stats import AggregationStats

# The names the trainer's ``aggregator`` setting and ``tolaria train --aggregator`` accept: tolaria/registry.py,
# one line per aggregator ("module.Class"; a class object works too, for aggregators defined elsewhere).
_REGISTRY: dict[str, str | type[Aggregator]] = AGGREGATORS
AGGREGATOR_NAMES: tuple[str, ...] = tuple(_REGISTRY)
# Class name -> "module.Class": the registered classes, exported by this package and loaded on first use.
_LAZY_CLASSES: dict[str, str] = {locate(entry)[1]: entry for entry in AGGREGATORS.values()}


def _resolve(entry: str | type[Aggregator]) -> type[Aggregator]:
    if not isinstance(entry, str):
        return entry
    module, cls = locate(entry)
    return getattr(importlib.import_module(module), cls)


def __getattr__(name: str) -> Any:
    path = _LAZY_CLASSES.get(name)
    if path is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = _resolve(path)
    globals()[name] = cls  # later lookups skip this function
    return cls


def aggregator_class(name: str) -> type[Aggregator]:
    """The class of the aggregator called ``name`` (case-insensitive; see ``AGGREGATOR_NAMES``).

    Raises ``ValueError`` naming the valid names for an unknown one.
    """
    if not isinstance(name, str):
        raise TypeError(f"aggregator name must be a string, got {type(name).__name__}")
    entry = _REGISTRY.get(name.strip().lower())
    if entry is None:
        raise ValueError(f"unknown aggregator {name!r}; valid names are {', '.join(AGGREGATOR_NAMES)}")
    return _resolve(entry)


def registered_name(aggregator: Aggregator) -> str:
    """The registry name of ``aggregator``'s class (its class name if it is not registered)."""
    cls = type(aggregator)
    for name, entry in _REGISTRY.items():
        if entry is cls or (isinstance(entry, str) and locate(entry) == (cls.__module__, cls.__qualname__)):
            return name
    return type(aggregator).__name__


def build_aggregator(name: str, **kwargs) -> Aggregator:
    """The aggregator called ``name`` (case-insensitive; see ``AGGREGATOR_NAMES``), built with ``kwargs``.

    Raises ``ValueError`` naming the valid names for an unknown one; a bad keyword argument raises
    the class's own ``TypeError`` or ``ValueError``.
    """
    return aggregator_class(name)(**kwargs)


__all__ = [
    "AGGREGATOR_NAMES",
    "AGGREGATION_LEVELS",
    "BUFFER_MODES",
    "FeatureGradientBuffer",
    "LowMemoryGradientBuffer",
    "MemoryEstimate",
    "estimate_memory",
    "is_gramian",
    "measure_activations",
    "CPU_ISA_ENV",
    "cpu_isa",
    "set_cpu_isa",
    "supported_cpu_isas",
    "Aggregator",
    "CoordinatewiseAggregator",
    "aggregator_class",
    "build_aggregator",
    "registered_name",
    "AggregationStats",
    "GradientBuffer",
    "FSDPGradientBuffer",
    "ZeroGradientBuffer",
    "Weights",
    "aggregate_mean",
    "aggregate_sum",
    "aggregate_weighted",
    "combine_flat_grads",
    "flat_to_grads",
    "grads_to_flat",
    "pcgrad",
    "Sources",
    "as_sources",
    "jacobi_eig",
    "symmetric_eig",
]
__all__ += list(_LAZY_CLASSES)  # the registered aggregator classes
