"""The aggregators Tolaria knows by name: one line each, name -> ``"module.Class"`` in
``tolaria.aggregation``, or ``"package.module:Class"`` for a class that lives elsewhere.

This is the one place a new aggregator is registered (docs/ARCHITECTURE.md, "Adding an aggregator"):
the name is then accepted by :func:`tolaria.aggregation.build_aggregator`, the trainer's
``aggregator`` setting, ``tolaria train --aggregator`` and ``tolaria compare``; the class is exported
by ``tolaria.aggregation`` and ``tolaria`` (loaded on first use: this module imports nothing, so
``import tolaria`` reads it cheaply); and the property suite holds it to the properties its class
declares in ``promises``.
"""

from __future__ import annotations

__all__ = ["AGGREGATORS", "SINKS", "locate"]

AGGREGATORS: dict[str, str] = {
    "pcgrad": "pcgrad.PCGrad",
    "mean": "weighted.Mean",
    "sum": "weighted.Sum",
    "weighted": "weighted.Weighted",
    "mgda": "mgda.MGDA",
    "upgrad": "upgrad.UPGrad",
    "cagrad": "cagrad.CAGrad",
    "imtlg": "imtlg.IMTLG",
    "aligned_mtl": "aligned_mtl.AlignedMTL",
    "dualproj": "dualproj.DualProj",
    "config": "conflict_free.ConFIG",
    "constant": "weighted.Constant",
    "krum": "krum.Krum",
    "fairgrad": "fairgrad.FairGrad",
    "random": "random_weighting.Random",
    "gradvac": "gradvac.GradVac",
    "pcd": "pcd.PCD",
    "cr_mogm": "cr_mogm.CRMOGM",
    "modo": "modo.MoDo",
    "sdmgrad": "sdmgrad.SDMGrad",
    "nash_mtl": "nash_mtl.NashMTL",
    "excess_mtl": "excess_mtl.ExcessMTL",
    "graddrop": "graddrop.GradDrop",
    "trimmed_mean": "trimmed_mean.TrimmedMean",
}

# Telemetry sinks a run's ``[telemetry] sinks`` names (beyond the built-in jsonl, logging and
# tensorboard switches): name -> "package.module:Class", a class with ``for_run(run_dir, rank)``
# (rank None in one process) returning an object with ``write(records)`` and ``close()``.
SINKS: dict[str, str] = {
    "csv": "tolaria.csv_sink:CsvMetricsSink",
}


def locate(entry: str) -> tuple[str, str]:
    """(module, class name) of a registry entry: ``"pcgrad.PCGrad"`` -> ("tolaria.aggregation.pcgrad",
    "PCGrad"); ``"my_project.weighting:Halfway"`` -> ("my_project.weighting", "Halfway")."""
    module, colon, cls = entry.partition(":")
    if colon:
        return module, cls
    module, _, cls = entry.rpartition(".")
    return f"tolaria.aggregation.{module}", cls
