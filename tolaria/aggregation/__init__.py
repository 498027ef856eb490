"""Conflict-aware gradient aggregation in Gram space.

Every aggregator maps K gradients (a K x N tensor, a K x (any shape) tensor, or a sequence of K
tensors of one shape) to one tensor of the per-source shape, in the inputs' dtype and on their
device, with two passes over the gradients whatever K is.
"""

from .aggregator import Aggregator
from .buffer import GradientBuffer
from .engine import Weights
from .functional import (
    aggregate_mean,
    aggregate_sum,
    aggregate_weighted,
    combine_flat_grads,
    flat_to_grads,
    grads_to_flat,
    pcgrad,
)
from .pcgrad import PCGrad
from .stats import AggregationStats
from .weighted import Mean, Sum, Weighted

__all__ = [
    "Aggregator",
    "AggregationStats",
    "GradientBuffer",
    "Mean",
    "PCGrad",
    "Sum",
    "Weighted",
    "Weights",
    "aggregate_mean",
    "aggregate_sum",
    "aggregate_weighted",
    "combine_flat_grads",
    "flat_to_grads",
    "grads_to_flat",
    "pcgrad",
]
