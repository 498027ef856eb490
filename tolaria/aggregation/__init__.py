"""Conflict-aware gradient aggregation in Gram space.

Every aggregator maps K gradients (a K x N tensor, a K x (any shape) tensor, or a sequence of K
tensors of one shape) to one tensor of the per-source shape, in the inputs' dtype and on their
device, with two passes over the gradients whatever K is.
"""

from ._coordinatewise import CoordinatewiseAggregator
from ._eigh import jacobi_eig, symmetric_eig
from ._gradient_rounds import AGGREGATION_LEVELS, BUFFER_MODES, is_gramian
from ._sources import Sources, as_sources
from .aggregator import Aggregator
from .aligned_mtl import AlignedMTL
from .backends.cpu import CPU_ISA_ENV, cpu_isa, set_cpu_isa, supported_cpu_isas
from .buffer import GradientBuffer
from .cagrad import CAGrad
from .conflict_free import ConFIG
from .cr_mogm import CRMOGM
from .dualproj import DualProj
from .engine import Weights
from .excess_mtl import ExcessMTL
from .fairgrad import FairGrad
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
from .graddrop import GradDrop
from .gradvac import GradVac
from .imtlg import IMTLG
from .krum import Krum
from .low_memory import LowMemoryGradientBuffer, MemoryEstimate, estimate_memory, measure_activations
from .mgda import MGDA
from .modo import MoDo
from .nash_mtl import NashMTL
from .pcd import PCD
from .pcgrad import PCGrad
from .random_weighting import Random
from .sdmgrad import SDMGrad
from .sharded_buffer import FSDPGradientBuffer, ZeroGradientBuffer
from .stats import AggregationStats
from .trimmed_mean import TrimmedMean
from .upgrad import UPGrad
from .weighted import Constant, Mean, Sum, Weighted

# The names the trainer's ``aggregator`` setting and ``tolaria train --aggregator`` accept.
_REGISTRY: dict[str, type[Aggregator]] = {
    "pcgrad": PCGrad,
    "mean": Mean,
    "sum": Sum,
    "weighted": Weighted,
    "mgda": MGDA,
    "upgrad": UPGrad,
    "cagrad": CAGrad,
    "imtlg": IMTLG,
    "aligned_mtl": AlignedMTL,
    "dualproj": DualProj,
    "config": ConFIG,
    "constant": Constant,
    "krum": Krum,
    "fairgrad": FairGrad,
    "random": Random,
    "gradvac": GradVac,
    "pcd": PCD,
    "cr_mogm": CRMOGM,
    "modo": MoDo,
    "sdmgrad": SDMGrad,
    "nash_mtl": NashMTL,
    "excess_mtl": ExcessMTL,
    "graddrop": GradDrop,
    "trimmed_mean": TrimmedMean,
}
AGGREGATOR_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def aggregator_class(name: str) -> type[Aggregator]:
    """The class of the aggregator called ``name`` (case-insensitive; see ``AGGREGATOR_NAMES``).

    Raises ``ValueError`` naming the valid names for an unknown one.
    """
    if not isinstance(name, str):
        raise TypeError(f"aggregator name must be a string, got {type(name).__name__}")
    cls = _REGISTRY.get(name.strip().lower())
    if cls is None:
        raise ValueError(f"unknown aggregator {name!r}; valid names are {', '.join(AGGREGATOR_NAMES)}")
    return cls


def registered_name(aggregator: Aggregator) -> str:
    """The registry name of ``aggregator``'s class (its class name if it is not registered)."""
    for name, cls in _REGISTRY.items():
        if type(aggregator) is cls:
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
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "CRMOGM",
    "Constant",
    "FairGrad",
    "GradDrop",
    "GradVac",
    "Krum",
    "MoDo",
    "NashMTL",
    "PCD",
    "SDMGrad",
    "TrimmedMean",
    "Random",
    "DualProj",
    "ExcessMTL",
    "IMTLG",
    "MGDA",
    "UPGrad",
    "aggregator_class",
    "build_aggregator",
    "registered_name",
    "AggregationStats",
    "GradientBuffer",
    "FSDPGradientBuffer",
    "ZeroGradientBuffer",
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
    "Sources",
    "as_sources",
    "jacobi_eig",
    "symmetric_eig",
]
