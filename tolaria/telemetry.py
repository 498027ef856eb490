"""The telemetry emitter: the one place that builds events and metrics.

Every component of Tolaria reports through a :class:`TelemetryEmitter` (``telemetry=`` argument;
when none is given a component makes one that writes to Python logging). The emitter stamps every
record with shared attributes (run id, epoch, step, rank, ...), queues it, and hands batches to its
sinks. Rules it keeps:

- Nothing is lost silently. A sink that raises keeps its queue; the batch is retried at the next
  flush and ``sink_retries`` / ``sink_errors`` count it. Records are dropped only by an explicit
  policy (a full queue, a rate limit on a chatty kind), and every drop is counted in ``dropped``.
- Emergency records (severity ``critical``, or a kind starting with ``emergency``) are never rate
  limited or dropped, however full the queue.
- Rate limits are per kind (records per second); records over the limit are folded into a
  ``rate_limited`` summary record carrying how many were suppressed, so the count survives.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "SEVERITIES",
    "TelemetrySink",
    "LoggingSink",
    "JsonlSink",
    "TensorBoardSink",
    "MemorySink",
    "is_emergency",
    "TelemetryEmitter",
    "emitter_or_default",
]

log = logging.getLogger("tolaria.telemetry")

SEVERITIES = ("debug", "info", "warning", "error", "critical")
_LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class TelemetrySink(Protocol):
    """Receives batches of records (plain dicts, JSON-serialisable). May raise: the emitter retries."""

    def write(self, records: Sequence[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


class LoggingSink:
    """Writes each record as one log line (``tolaria.telemetry`` logger, level from its severity)."""

    def __init__(self, logger: logging.Logger | None = None, *, min_severity: str = "info"):
        self.logger = logger or log
        self.min_level = _LOG_LEVELS[_check_severity(min_severity)]

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        for r in records:
            level = _LOG_LEVELS.get(r.get("severity", "info"), logging.INFO)
            if level >= self.min_level:
                self.logger.log(level, "%s %s", r["kind"], json.dumps(r, default=str, sort_keys=True))

    def close(self) -> None:
        return None


class JsonlSink:
    """Appends one JSON object per line to ``path`` (created with its parent folders)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        self._file.write("".join(json.dumps(r, default=str) + "\n" for r in records))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    """Writes metrics as TensorBoard scalars and events as text (the optional ``tensorboard`` extra).

    A record's tag is its kind, followed by ``/<source>`` when it has a ``source`` field. Numeric
    metrics become scalars at the record's ``step``; list-valued metrics (e.g. a cosine matrix) become
    one scalar per element (``tag/i`` or ``tag/i_j``); events become text ``[severity] message``.
    """

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(
                "the TensorBoard sink needs the 'tensorboard' package, which is not installed; "
                "install it with: pip install 'tolaria[tensorboard]'"
            ) from exc
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        for r in records:
            tag = str(r["kind"]) + (f"/{r['source']}" if "source" in r else "")
            step = r.get("step")
            walltime = r.get("time")
            if r.get("type") == "metric":
                for suffix, value in _scalars(r.get("value")):
                    if value is None:
                        self.writer.add_text(tag + suffix, json.dumps(r.get("value"), default=str), step, walltime)
                    else:
                        self.writer.add_scalar(tag + suffix, value, step, walltime)
            else:
                self.writer.add_text(tag, f"[{r.get('severity', 'info')}] {r.get('message', '')}", step, walltime)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _scalars(value: Any, suffix: str = "") -> list[tuple[str, float | None]]:
    """(tag suffix, number) pairs of a metric value; ``None`` marks a value that is not numeric."""
    if isinstance(value, bool) or not isinstance(value, (int, float, list, tuple)):
        return [(suffix, None)]
    if isinstance(value, (int, float)):
        return [(suffix, float(value))]
    out: list[tuple[str, float | None]] = []
    for i, item in enumerate(value):
        out.extend(_scalars(item, f"{suffix}/{i}" if not suffix else f"{suffix}_{i}"))
    if any(v is None for _, v in out):
        return [(suffix, None)]
    return out


class MemorySink:
    """Keeps records in a list; for tests and for in-process consumers."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        self.records.extend(records)

    def close(self) -> None:
        return None

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == kind]


def _check_severity(severity: str) -> str:
    if severity not in SEVERITIES:
        raise ValueError(f"unknown severity {severity!r}; valid severities are {', '.join(SEVERITIES)}")
    return severity


def is_emergency(record: Mapping[str, Any]) -> bool:
    return record.get("severity") == "critical" or str(record.get("kind", "")).startswith("emergency")


class _SinkQueue:
    """One sink with the records it has not yet accepted."""

    def __init__(self, sink: TelemetrySink):
        self.sink = sink
        self.pending: deque[dict[str, Any]] = deque()


class TelemetryEmitter:
    """Builds, batches and delivers telemetry records to its sinks.

    Args:
        sinks: where records go; default one :class:`LoggingSink`.
        attributes: shared attributes stamped on every record (``run_id`` is added if missing).
        batch_size: records queued before a flush happens by itself.
        max_queue: per-sink queue bound; beyond it the oldest non-emergency records are dropped
            (and counted). Emergency records are always kept.
        rate_limits: ``{kind: records_per_second}`` for chatty kinds.
    """

    def __init__(
        self,
        sinks: Iterable[TelemetrySink] | None = None,
        *,
        attributes: Mapping[str, Any] | None = None,
        batch_size: int = 64,
        max_queue: int = 100_000,
        rate_limits: Mapping[str, float] | None = None,
    ):
        if batch_size < 1 or max_queue < batch_size:
            raise ValueError(f"need 1 <= batch_size <= max_queue, got {batch_size} and {max_queue}")
        for kind, rate in (rate_limits or {}).items():
            if not rate > 0:
                raise ValueError(f"rate limit for {kind!r} must be positive, got {rate}")
        self._queues = [_SinkQueue(s) for s in (sinks if sinks is not None else [LoggingSink()])]
        self.attributes: dict[str, Any] = {"run_id": uuid.uuid4().hex[:12], **(attributes or {})}
        self.batch_size = batch_size
        self.max_queue = max_queue
        self.rate_limits = dict(rate_limits or {})
        self.counters: dict[str, float] = {}
        self.dropped: dict[str, int] = {}
        self._window: dict[str, tuple[float, int, int]] = {}  # kind -> (window start, sent, suppressed)
        self._since_flush = 0
        self._lock = threading.RLock()
        self._closed = False
        self._closing = False

    # ---- building records ------------------------------------------------------------------

    def bind(self, **attributes: Any) -> None:
        """Updates the shared attributes (e.g. ``epoch=3, step=120``) stamped on later records."""
        with self._lock:
            self.attributes.update(attributes)

    def event(self, kind: str, *, severity: str = "info", message: str = "", **fields: Any) -> dict[str, Any]:
        """Records a discrete event; returns the record as queued."""
        record = {
            "type": "event",
            "kind": kind,
            "severity": _check_severity(severity),
            "message": message,
            "time": time.time(),
            **self.attributes,
            **fields,
        }
        self._submit(record)
        return record

    def metric(self, name: str, value: Any, **fields: Any) -> None:
        """Records one measured value (a number, or a list such as a cosine matrix)."""
        self._submit(
            {
                "type": "metric",
                "kind": name,
                "severity": "info",
                "value": value,
                "time": time.time(),
                **self.attributes,
                **fields,
            }
        )

    def count(self, name: str, n: float = 1) -> float:
        """Adds ``n`` to a counter; counters are read from ``counters`` and emitted by ``flush_counters``."""
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + n
            return self.counters[name]

    def flush_counters(self) -> None:
        """Emits every counter's current value, and every count of records dropped by policy, as metrics."""
        with self._lock:
            snapshot = dict(self.counters)
            dropped = dict(self.dropped)
        for name, value in sorted(snapshot.items()):
            self.metric(f"counter.{name}", value)
        for reason, value in sorted(dropped.items()):
            self.metric(f"dropped.{reason}", value)

    # ---- delivery -----------------------------------------------------------------------------

    def _rate_limited(self, record: dict[str, Any]) -> bool:
        kind = record["kind"]
        rate = self.rate_limits.get(kind)
        if rate is None or is_emergency(record):
            return False
        now = time.monotonic()
        start, sent, suppressed = self._window.get(kind, (now, 0, 0))
        if now - start >= 1.0:
            self._summarise_suppressed(kind, suppressed)
            start, sent, suppressed = now, 0, 0
        if sent < rate:
            self._window[kind] = (start, sent + 1, suppressed)
            return False
        self._window[kind] = (start, sent, suppressed + 1)
        self.dropped[f"rate_limit:{kind}"] = self.dropped.get(f"rate_limit:{kind}", 0) + 1
        return True

    def _summarise_suppressed(self, kind: str, suppressed: int) -> None:
        if suppressed:
            self._enqueue(
                {
                    "type": "event",
                    "kind": "rate_limited",
                    "severity": "warning",
                    "time": time.time(),
                    "message": f"{suppressed} {kind!r} records suppressed by its rate limit",
                    "suppressed_kind": kind,
                    "suppressed": suppressed,
                    **self.attributes,
                }
            )

    def _release_windows(self, *, force: bool) -> None:
        """Folds suppressed counts of finished rate windows (all of them if ``force``) into summaries,
        so a count is reported even when no later record of that kind arrives."""
        now = time.monotonic()
        for kind, (start, sent, suppressed) in list(self._window.items()):
            if suppressed and (force or now - start >= 1.0):
                self._summarise_suppressed(kind, suppressed)
                self._window[kind] = (start, sent, 0)

    def _enqueue(self, record: dict[str, Any]) -> None:
        for q in self._queues:
            q.pending.append(record)
            while len(q.pending) > self.max_queue:
                # Drop the oldest record that is not an emergency; emergencies always stay.
                victim = next((r for r in q.pending if not is_emergency(r)), None)
                if victim is None:
                    break
                q.pending.remove(victim)
                self.dropped["queue_full"] = self.dropped.get("queue_full", 0) + 1
        self._since_flush += 1

    def _submit(self, record: dict[str, Any]) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"telemetry emitter is closed; cannot record {record['kind']!r}")
            if self._rate_limited(record):
                return
            self._enqueue(record)
            due = self._since_flush >= self.batch_size or is_emergency(record)
        if due:
            self.flush()

    def flush(self) -> bool:
        """Delivers every queued record; returns False if some sink failed (its queue is kept)."""
        ok = True
        with self._lock:
            self._release_windows(force=self._closing)
            self._since_flush = 0
            for q in self._queues:
                while q.pending:
                    batch = list(q.pending)[: self.batch_size]
                    try:
                        q.sink.write(batch)
                    except Exception as exc:  # kept and retried; made visible, never swallowed
                        ok = False
                        self.counters["sink_errors"] = self.counters.get("sink_errors", 0) + 1
                        self.counters["sink_retries"] = self.counters.get("sink_retries", 0) + 1
                        log.error(
                            "telemetry sink %s failed (%s: %s); %d records kept for retry",
                            type(q.sink).__name__,
                            type(exc).__name__,
                            exc,
                            len(q.pending),
                        )
                        break
                    for _ in batch:
                        q.pending.popleft()
        return ok

    def pending(self) -> int:
        """Records not yet accepted by every sink."""
        with self._lock:
            return max((len(q.pending) for q in self._queues), default=0)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran: the emitter records nothing more."""
        return self._closed

    def close(self) -> None:
        """Flushes and closes every sink. Records a sink still refuses are reported, not hidden."""
        with self._lock:
            if self._closed:
                return
            self._closing = True
            self.flush_counters()
            delivered = self.flush()
            self._closed = True
            for q in self._queues:
                q.sink.close()
        if not delivered:
            log.error("telemetry closed with %d undelivered records", self.pending())

    def __enter__(self) -> TelemetryEmitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def emitter_or_default(telemetry: TelemetryEmitter | None) -> TelemetryEmitter:
    """The given emitter, or a new one that writes to Python logging."""
    return telemetry if telemetry is not None else TelemetryEmitter()
