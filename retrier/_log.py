"""Logging: the `tiers` logger, its level from TIERS_LOG_LEVEL (DEBUG, INFO, ERROR...)."""

from __future__ import annotations

import logging
import os

_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def configure_logging() -> None:
    """Set the `tiers` logger's level; give it a handler if the app configured none."""
    logger = logging.getLogger("tiers")
    raw = os.environ.get("TIERS_LOG_LEVEL", "INFO").strip().upper()
    logger.setLevel(raw if raw in _LEVELS else "INFO")
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
