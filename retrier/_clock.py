"""Time as integer epoch milliseconds, injectable so tests never sleep.

Every due time a user gives (`run_at`, `run_after`, `RetryAfter`, a workflow's
`sleep`, `sleep_until` and `wait_for_event` timeout) is checked here, by `delay_ms`
or `due_ms`: a due time lies within `MAX_AHEAD` (100 years) of now, so a delay given
in milliseconds where seconds were meant is refused instead of crashing workers
later with a date past the year 9999.
"""

from __future__ import annotations

import numbers
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

from ._errors import InvalidSettings

MAX_AHEAD = timedelta(days=36_525)
"""How far from now a due time may lie: 100 years, either way."""
_MAX_AHEAD_MS = MAX_AHEAD // timedelta(milliseconds=1)
_ONE_MS = timedelta(milliseconds=1)


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

    def now(self) -> datetime:
        """The fake time as a timezone-aware UTC datetime (for `run_at` in tests)."""
        return ms_to_datetime(self.now_ms())

    def advance(self, delta: timedelta | float) -> None:
        """Move forward by a timedelta or a number of seconds."""
        ms = to_ms(delta)
        with self._lock:
            self._now += ms


def seconds_until(clock: Clock, epoch_ms: int) -> float:
    """Seconds from now until `epoch_ms` on `clock`. The system clock's fraction of a
    millisecond counts: a wait counted from whole milliseconds ends up to 1 ms late."""
    if isinstance(clock, SystemClock):
        return epoch_ms / 1000 - time.time()
    return (epoch_ms - clock.now_ms()) / 1000


def ms_after_ns(clock: Clock) -> tuple[int, int]:
    """Now on `clock`, rounded up to a whole millisecond: a time counted from an event
    stamped so (a retry's backoff from its attempt's end) never falls before it. And
    how many nanoseconds before that stamp now really is (what rounding up added; 0
    on any clock but the system's)."""
    if isinstance(clock, SystemClock):
        ns = time.time_ns()
        ms = -(-ns // 1_000_000)
        return ms, ms * 1_000_000 - ns
    return clock.now_ms(), 0


def to_ms(delta: timedelta | float) -> int:
    """A duration (timedelta or seconds) in whole milliseconds, unchecked: for values
    already validated (see `delay_ms` for what users give)."""
    if isinstance(delta, timedelta):
        return round(delta / timedelta(milliseconds=1))
    return round(float(delta) * 1000)


def delay_ms(delay: timedelta | float, what: str) -> int:
    """A delay from now (a timedelta or seconds) in whole milliseconds.

    Raises `InvalidSettings` naming `what` unless it is a timedelta or a real number
    of seconds (not a bool), not NaN, and from 0 to 100 years.
    """
    if isinstance(delay, timedelta):
        ms = delay / _ONE_MS
    elif isinstance(delay, numbers.Real) and not isinstance(delay, bool):
        try:
            ms = float(delay) * 1000
        except OverflowError:  # an int too large for a float
            ms = float("inf")
    else:
        raise InvalidSettings(f"{what} needs a timedelta or a number of seconds, got {delay!r}")
    if not 0 <= ms <= _MAX_AHEAD_MS:  # NaN fails this too
        hint = " (seconds, not milliseconds?)" if 0 < ms / 1000 <= _MAX_AHEAD_MS else ""
        raise InvalidSettings(
            f"{what} needs a delay from 0 to 100 years (a timedelta, or seconds), "
            f"got {delay!r}{hint}"
        )
    return round(ms)


def due_ms(when: datetime, what: str, now_ms: int) -> int:
    """A timezone-aware datetime within 100 years of `now_ms` (either way), in epoch
    milliseconds. Raises `InvalidSettings` naming `what` otherwise (naive datetimes
    included: their time zone would be a guess)."""
    if not isinstance(when, datetime):
        raise InvalidSettings(f"{what} needs a timezone-aware datetime, got {when!r}")
    if when.tzinfo is None or when.utcoffset() is None:
        raise InvalidSettings(
            f"{what} got a naive datetime, {when!r}: give a timezone, "
            f"e.g. datetime.now(timezone.utc)"
        )
    try:
        ms = round(when.timestamp() * 1000)
    except (OverflowError, ValueError, OSError):  # a zone offset past year 1 or 9999
        ms = None
    if ms is None or abs(ms - now_ms) > _MAX_AHEAD_MS:
        raise InvalidSettings(
            f"{what} needs a time within 100 years of now, got {when.isoformat()}"
        )
    return ms


def ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
