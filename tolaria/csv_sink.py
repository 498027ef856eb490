"""``CsvMetricsSink``: the run's scalar metrics as one CSV table (``metrics.csv`` in the run folder),
for spreadsheets and pandas without parsing the JSONL. Registered as ``"csv"`` in
:mod:`tolaria.registry`, so ``[telemetry] sinks = ["csv"]`` adds it to a training run.

One row per scalar metric record: time, step, epoch, rank (empty in one process), name (``kind`` and
``/source`` where the record names one), value. Events and non-scalar values (a cosine matrix) stay
in ``telemetry.jsonl``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["CsvMetricsSink"]

COLUMNS = ["time", "step", "epoch", "rank", "name", "value"]


class CsvMetricsSink:
    """Appends scalar metric records to a CSV file (header written once, when the file is new)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = self.path.open("a", encoding="utf-8", newline="")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(COLUMNS)
            self._file.flush()

    @classmethod
    def for_run(cls, run_dir: Path, rank: int | None) -> CsvMetricsSink:
        """The trainer's instance: ``metrics.csv`` in one process, ``metrics-rank<r>.csv`` per rank."""
        return cls(Path(run_dir) / ("metrics.csv" if rank is None else f"metrics-rank{rank}.csv"))

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        for r in records:
            value = r.get("value")
            if r.get("type") != "metric" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = str(r["kind"]) + (f"/{r['source']}" if "source" in r else "")
            shown = value if math.isfinite(value) else str(value)
            self._writer.writerow(
                [r.get("time"), r.get("step", ""), r.get("epoch", ""), r.get("rank", ""), name, shown]
            )
        self._file.flush()

    def close(self) -> None:
        self._file.close()
