"""One call that makes a failure visible twice: a log line and a telemetry event."""

from __future__ import annotations

import logging
from typing import Any

from tolaria.telemetry import _LOG_LEVELS, TelemetryEmitter

__all__ = ["report"]

log = logging.getLogger("tolaria.state")


def report(telemetry: TelemetryEmitter, kind: str, severity: str, message: str, **fields: Any) -> None:
    """Logs ``message`` on the ``tolaria.state`` logger and emits it as a telemetry event of ``kind``."""
    log.log(_LOG_LEVELS[severity], "%s: %s", kind, message)
    telemetry.event(kind, severity=severity, message=message, **fields)
