"""Tolaria: conflict-aware multi-source gradient aggregation and a training loop built to survive.

The names most programs need, in one place::

    from tolaria import UPGrad, GradientBuffer, Trainer, TrainerConfig

Everything else lives in the subpackages: ``tolaria.aggregation`` (the aggregators, ``GradientBuffer``,
the prototype's functions), ``tolaria.compat`` (other libraries' APIs), ``tolaria.trainer``,
``tolaria.state``, ``tolaria.distributed`` and the run-control modules. The names below are loaded
on first use, so ``import tolaria`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from tolaria.registry import AGGREGATORS, locate

__version__ = "0.1.0"

_AGGREGATION = (
    "Aggregator",
    "GradientBuffer",
    "AggregationStats",
    "AGGREGATOR_NAMES",
    "build_aggregator",
)
# Every registered aggregator class too (tolaria/registry.py: a dict, nothing imported).
_AGGREGATION += tuple(locate(entry)[1] for entry in AGGREGATORS.values())
_TRAINER = ("Trainer", "TrainerConfig", "RunSummary")
_HOME = {**{name: "tolaria.aggregation" for name in _AGGREGATION}, **{name: "tolaria.trainer" for name in _TRAINER}}

__all__ = ["__version__", *_AGGREGATION, *_TRAINER]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None and any(locate(entry)[1] == name for entry in AGGREGATORS.values()):
        home = "tolaria.aggregation"  # registered after this module was imported (a plugin's line)
    if home is None:
        raise AttributeError(f"module 'tolaria' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
