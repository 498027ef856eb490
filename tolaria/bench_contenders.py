"""What ``tolaria bench`` races: the table of contenders (each Tolaria aggregator with its
alternatives: the naive PyTorch loop, TorchJD's class of the same name) and the construction of
TorchJD's aggregators from that table. :mod:`tolaria.bench` re-exports every name here; it calls
``_torchjd`` through its own namespace, so patching ``tolaria.bench._torchjd`` takes effect."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tolaria.aggregation import (
    CRMOGM,
    IMTLG,
    MGDA,
    PCD,
    Aggregator,
    AlignedMTL,
    CAGrad,
    ConFIG,
    DualProj,
    ExcessMTL,
    FairGrad,
    GradDrop,
    GradVac,
    Krum,
    Mean,
    MoDo,
    NashMTL,
    PCGrad,
    Random,
    SDMGrad,
    Sum,
    TrimmedMean,
    UPGrad,
)

__all__ = ["CONTENDERS", "K_SOURCES", "Contender", "naive_pcgrad"]


def naive_pcgrad(grads: Tensor) -> Tensor:
    """The usual PyTorch PCGrad recipe: per source, project against each other one in a Python loop."""
    k = grads.shape[0]
    projected = [grads[i].clone() for i in range(k)]
    for i in range(k):
        order = [j for j in range(k) if j != i]
        random.shuffle(order)
        g_i = projected[i]
        for j in order:
            dot = torch.dot(g_i, grads[j])
            if dot < 0:  # a host sync per pair, as in the recipe
                g_i -= dot / torch.dot(grads[j], grads[j]) * grads[j]
    return torch.stack(projected).sum(0)


@dataclass(frozen=True)
class Contender:
    """One aggregator as the benchmark knows it: Tolaria's, and its alternatives where they exist."""

    name: str
    tolaria: Callable[[str], Aggregator]  # backend name -> aggregator
    naive: Callable[[Tensor], Tensor] | None = None
    torchjd_name: str | None = None
    torchjd_kwargs: tuple[tuple[str, object], ...] = ()  # constructor arguments of TorchJD's class
    min_k: int = 1  # fewer sources than this: the case is left out with a note (Krum needs f + 3)


_WEIGHTING = "weighting:"
# A TorchJD constructor argument that takes the case's number of sources (NashMTL's n_tasks).
K_SOURCES = "<K>"


CONTENDERS: dict[str, Contender] = {
    "pcgrad": Contender("pcgrad", lambda b: PCGrad(backend=b), naive_pcgrad, "PCGrad"),
    "mean": Contender("mean", lambda b: Mean(backend=b), None, "Mean"),
    "sum": Contender("sum", lambda b: Sum(backend=b), None, "Sum"),
    "mgda": Contender("mgda", lambda b: MGDA(backend=b), None, "MGDA"),
    "upgrad": Contender("upgrad", lambda b: UPGrad(backend=b), None, "UPGrad"),
    "cagrad": Contender("cagrad", lambda b: CAGrad(c=0.5, backend=b), None, "CAGrad", (("c", 0.5),)),
    "imtlg": Contender("imtlg", lambda b: IMTLG(backend=b), None, "IMTLG"),
    "aligned_mtl": Contender("aligned_mtl", lambda b: AlignedMTL(backend=b), None, "AlignedMTL"),
    "dualproj": Contender("dualproj", lambda b: DualProj(backend=b), None, "DualProj"),
    "config": Contender("config", lambda b: ConFIG(backend=b), None, "ConFIG"),
    "krum": Contender(
        "krum", lambda b: Krum(1, 2, backend=b), None, "Krum", (("n_byzantine", 1), ("n_selected", 2)), min_k=4
    ),
    "random": Contender("random", lambda b: Random(seed=0, backend=b), None, "Random"),
    "fairgrad": Contender("fairgrad", lambda b: FairGrad(1.0, backend=b), None, "FairGrad", (("alpha", 1.0),)),
    "gradvac": Contender("gradvac", lambda b: GradVac(seed=0, backend=b), None, "GradVac"),
    "pcd": Contender("pcd", lambda b: PCD(backend=b), None, "PCD"),
    # TorchJD ships these three as weightings only: timed as GramianWeightedAggregator(weighting).
    "cr_mogm": Contender(
        "cr_mogm",
        lambda b: CRMOGM(backend=b),
        None,
        "weighting:CRMOGMWeighting",
        (("weighting", "weighting:MGDAWeighting"),),
    ),
    "modo": Contender("modo", lambda b: MoDo(backend=b), None, "weighting:MoDoWeighting"),
    "sdmgrad": Contender("sdmgrad", lambda b: SDMGrad(backend=b), None, "weighting:SDMGradWeighting"),
    "nash_mtl": Contender("nash_mtl", lambda b: NashMTL(backend=b), None, "NashMTL", (("n_tasks", K_SOURCES),)),
    "excess_mtl": Contender("excess_mtl", lambda b: ExcessMTL(backend=b), None, "ExcessMTL"),
    # Not Gramian: one coordinate-wise pass (sorting or sign dropout per coordinate).
    "graddrop": Contender("graddrop", lambda b: GradDrop(seed=0, backend=b), None, "GradDrop"),
    "trimmed_mean": Contender(
        "trimmed_mean", lambda b: TrimmedMean(2, backend=b), None, "TrimmedMean", (("trim_number", 2),), min_k=5
    ),
}


def _torchjd_weighting(tjd: Any, name: str, kwargs: tuple[tuple[str, object], ...]) -> Any:
    """TorchJD's weighting ``name`` ("weighting:Class"); a string argument of the same form is
    built the same way (CR-MOGM wraps another weighting)."""
    built = {
        key: _torchjd_weighting(tjd, value, ()) if isinstance(value, str) and value.startswith(_WEIGHTING) else value
        for key, value in kwargs
    }
    return getattr(tjd, name[len(_WEIGHTING) :])(**built)


def _torchjd(
    name: str | None, kwargs: tuple[tuple[str, object], ...] = (), k: int | None = None
) -> Callable[[Tensor], Tensor] | None:
    if name is None:
        return None
    try:
        import torchjd.aggregation as tjd
    except ImportError:
        return None
    kwargs = tuple((key, k if value == K_SOURCES else value) for key, value in kwargs)
    try:
        if name.startswith(_WEIGHTING):  # a weighting alone: wrapped as TorchJD's own users do
            return tjd.GramianWeightedAggregator(_torchjd_weighting(tjd, name, kwargs))
        return getattr(tjd, name)(**dict(kwargs))
    except ImportError as exc:  # TorchJD's optional solver (quadprog, cvxpy) is not installed
        print(f"note: TorchJD's {name} left out: {exc}")
        return None
