"""Rank telemetry: one JSONL file per rank, every record tagged with the rank and one shared run id.

:func:`rank_telemetry` builds the emitter; :func:`bind_rank`, :func:`shared_run_id` and
:func:`telemetry_file_name` are its parts, for callers that build their own emitter.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tolaria.distributed.collectives import broadcast_json
from tolaria.distributed.context import DistributedContext, _check_context
from tolaria.telemetry import JsonlSink, TelemetryEmitter, TelemetrySink


def telemetry_file_name(ctx: DistributedContext) -> str:
    """``telemetry-rank<r>.jsonl`` in a distributed run, ``telemetry.jsonl`` in a single process."""
    _check_context(ctx)
    return f"telemetry-rank{ctx.rank}.jsonl" if ctx.is_distributed else "telemetry.jsonl"


def bind_rank(telemetry: TelemetryEmitter, ctx: DistributedContext) -> TelemetryEmitter:
    """Stamps ``rank``, ``world_size`` and ``local_rank`` on every later record of ``telemetry``."""
    _check_context(ctx)
    if not isinstance(telemetry, TelemetryEmitter):
        raise TypeError(f"telemetry must be a TelemetryEmitter, got {type(telemetry).__name__}")
    telemetry.bind(rank=ctx.rank, world_size=ctx.world_size, local_rank=ctx.local_rank)
    return telemetry


def shared_run_id(run_id: str | None, ctx: DistributedContext) -> str:
    """Rank 0's run id on every rank (one small broadcast), so the per-rank files name one run.
    ``run_id`` None on rank 0: a fresh random id."""
    _check_context(ctx)
    if run_id is not None and (not isinstance(run_id, str) or not run_id):
        raise ValueError(f"run_id must be a non-empty str or None, got {run_id!r}")
    local = run_id if run_id is not None or not ctx.is_main else secrets.token_hex(6)
    if not ctx._live():
        assert local is not None
        return local
    return str(broadcast_json(local, ctx))


def rank_telemetry(
    ctx: DistributedContext,
    directory: str | os.PathLike[str],
    *,
    run_id: str | None = None,
    sinks: Iterable[TelemetrySink] = (),
    attributes: Mapping[str, Any] | None = None,
    **emitter_options: Any,
) -> TelemetryEmitter:
    """An emitter writing this rank's JSONL file in ``directory`` (see :func:`telemetry_file_name`),
    plus ``sinks``, with every record tagged with the rank and rank 0's run id (a collective: call it
    on every rank). ``emitter_options`` go to :class:`~tolaria.telemetry.TelemetryEmitter`."""
    _check_context(ctx)
    shared = shared_run_id(run_id, ctx)
    path = Path(directory) / telemetry_file_name(ctx)
    emitter = TelemetryEmitter(
        [JsonlSink(path), *sinks], attributes={**(attributes or {}), "run_id": shared}, **emitter_options
    )
    return bind_rank(emitter, ctx)


__all__ = [
    "bind_rank",
    "rank_telemetry",
    "shared_run_id",
    "telemetry_file_name",
]
