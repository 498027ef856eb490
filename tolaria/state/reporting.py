"""One call that makes a failure visible twice: a log line and a telemetry event."""

from __future__ import annotations

import logging
from typing import Any

from tolaria.telemetry import _LOG_LEVELS, TelemetryEmitter

__all__ = ["report", "report_fallback"]

log = logging.getLogger("tolaria.state")


def report(telemetry: TelemetryEmitter, kind: str, severity: str, message: str, **fields: Any) -> None:
    """Logs ``message`` on the ``tolaria.state`` logger and emits it as a telemetry event of ``kind``.

    A report that comes after the emitter was closed (an abandoned staging read finishing after the
    run ended) is logged, saying so, instead of raising in the thread that made it and being lost.
    """
    if telemetry.closed:
        log.log(_LOG_LEVELS[severity], "%s: %s (after telemetry closed: logged only)", kind, message)
        return
    log.log(_LOG_LEVELS[severity], "%s: %s", kind, message)
    telemetry.event(kind, severity=severity, message=message, **fields)


def report_fallback(telemetry: TelemetryEmitter, problem: str, step: int, file: Any) -> None:
    """A committed checkpoint that does not verify or load: the reader falls back to the one before."""
    report(
        telemetry,
        "state.checkpoint_invalid",
        "error",
        f"{problem}; falling back to the previous checkpoint",
        step=step,
        file=file,
    )
