"""Time as integer epoch milliseconds, injectable so tests never sleep."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int:
        """Milliseconds since the Unix epoch."""
        ...


class SystemClock:
    """The real wall clock."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class FakeClock:
    """A clock that moves only when told to; thread-safe. For tests and simulations."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now = start_ms
        self._lock = threading.Lock()

    def now_ms(self) -> int:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta | float) -> None:
        """Move forward by a timedelta or a number of seconds."""
        ms = to_ms(delta)
        with self._lock:
            self._now += ms


def to_ms(delta: timedelta | float) -> int:
    """A duration (timedelta or seconds) in whole milliseconds."""
    if isinstance(delta, timedelta):
        return round(delta / timedelta(milliseconds=1))
    return round(float(delta) * 1000)


def datetime_to_ms(when: datetime) -> int:
    """An aware datetime in epoch milliseconds; naive datetimes are refused."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(
            f"naive datetime {when!r}: give a timezone, e.g. datetime.now(timezone.utc)"
        )
    return round(when.timestamp() * 1000)


def ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
