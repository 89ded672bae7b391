"""Logging: the `tiers` logger, its level from TIERS_LOG_LEVEL (DEBUG, INFO, ERROR...),
its format from TIERS_LOG_FORMAT (`text`, the default, or `json`: one JSON object a
line, with the `extra` fields of state changes: run_id, fn, attempt, queue, ...).
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from typing import Any

_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}

# The attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def run_extra(
    run_id: str, fn: str | None = None, attempt: int | None = None, queue: str | None = None
) -> dict[str, Any]:
    """The `extra` fields of a log event about one run."""
    return {"run_id": run_id, "fn": fn, "attempt": attempt, "queue": queue}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the record's `extra`
    fields, and `exc_info` formatted as `exception`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def formatter() -> logging.Formatter:
    """The formatter TIERS_LOG_FORMAT asks for."""
    if os.environ.get("TIERS_LOG_FORMAT", "").strip().lower() == "json":
        return JsonFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def configure_logging() -> None:
    """Set the `tiers` logger's level; give it a handler if the app configured none."""
    logger = logging.getLogger("tiers")
    raw = os.environ.get("TIERS_LOG_LEVEL", "INFO").strip().upper()
    logger.setLevel(raw if raw in _LEVELS else "INFO")
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(formatter())
        logger.addHandler(handler)
