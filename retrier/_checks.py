"""Checks of options and names, one rule each, shared by every tier.

Each raises a `TiersError` naming the option (`InvalidSettings` unless told
otherwise) before anything is written, and none converts a value: a bool is not a
number, 1.5 is not an integer, 30 is not a timedelta.
"""

from __future__ import annotations

import math
import numbers
from datetime import timedelta
from typing import Any

from ._errors import InvalidSettings, TiersError

MAX_NAME = 200
"""Most characters in a stored name: a function, handler, pool, key or event name."""


def check_integer(value: Any, what: str, low: int, high: int) -> int:
    """`value` if it is an int (not a bool) from `low` to `high`."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidSettings(f"{what} must be an integer from {low} to {high}, got {value!r}")
    return value


def check_number(value: Any, what: str, low: float, high: float) -> float:
    """`value` if it is a real number (not a bool, not NaN) from `low` to `high`."""
    number = float(value) if isinstance(value, numbers.Real) else math.nan
    # NaN fails the range test: it compares false with everything.
    if isinstance(value, bool) or not low <= number <= high:
        raise InvalidSettings(f"{what} must be a number from {low:g} to {high:g}, got {value!r}")
    return number


def check_flag(value: Any, what: str) -> bool:
    """`value` if it is True or False (so "no" is not silently true)."""
    if not isinstance(value, bool):
        raise InvalidSettings(f"{what} must be True or False, got {value!r}")
    return value


def check_duration(value: Any, what: str, low: timedelta, high: timedelta) -> timedelta:
    """`value` if it is a timedelta from `low` to `high`."""
    if not isinstance(value, timedelta) or not low <= value <= high:
        raise InvalidSettings(
            f"{what} must be a timedelta from {low} to {high}, got {value!r}"
        )
    return value


def check_timeout(value: Any, what: str, most: timedelta) -> int:
    """A time limit (a timedelta or a real number of seconds, not a bool) in whole
    milliseconds: more than zero, at most `most`. Zero is refused rather than read as
    "no limit" (leave the option out, or pass None, for that)."""
    if isinstance(value, timedelta):
        ms = value / _ONE_MS
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            ms = float(value) * 1000
        except OverflowError:  # an int too large for a float
            ms = math.inf
    else:
        raise InvalidSettings(
            f"{what} needs a timedelta or a number of seconds, got {value!r}"
        )
    most_ms = most / _ONE_MS
    if not 0.5 <= ms <= most_ms:  # NaN fails this too
        hint = " (seconds, not milliseconds?)" if 1 <= ms / 1000 <= most_ms else ""
        raise InvalidSettings(
            f"{what} needs a time limit above 0 and at most {_span(most)} (a timedelta, "
            f"or seconds), got {value!r}{hint}"
        )
    return round(ms)


def format_limit(ms: int) -> str:
    """A time limit as people write it: "30 s", "1.5 s", "250 ms", "2 h"."""
    if ms < 1000:
        return f"{ms} ms"
    seconds = ms / 1000
    for unit, size in (("day", 86_400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            plural = "s" if unit == "day" and count != 1 else ""
            return f"{count:g} {unit}{plural}"
    return f"{seconds:g} s"


def _span(limit: timedelta) -> str:
    return format_limit(round(limit / _ONE_MS))


def check_name(
    value: Any,
    what: str,
    *,
    max_length: int = MAX_NAME,
    error: type[TiersError] = InvalidSettings,
) -> str:
    """`value` if it is a string of 1 to `max_length` characters, not blank, without
    NUL (which PostgreSQL cannot store in text and SQLite would keep)."""
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= max_length
        or "\x00" in value
        or value.isspace()
    ):
        raise error(
            f"{what} must be a string of 1 to {max_length} characters, not blank and "
            f"without NUL, got {value!r}"
        )
    return value


def check_worker_settings(
    *,
    concurrency: Any,
    lease: Any,
    poll_interval: Any,
    retention: Any,
    unregistered_grace: Any,
) -> None:
    """The options of a worker (and of the `Retrier` that makes its workers)."""
    check_integer(concurrency, "concurrency", 1, 10_000)
    check_duration(lease, "lease", timedelta(milliseconds=300), timedelta(days=1))
    check_duration(poll_interval, "poll_interval", timedelta(milliseconds=1), timedelta(hours=1))
    check_duration(retention, "retention", timedelta(0), _CENTURY)
    check_duration(unregistered_grace, "unregistered_grace", timedelta(0), _CENTURY)


_CENTURY = timedelta(days=36_525)
_ONE_MS = timedelta(milliseconds=1)

MAX_ATTEMPT_TIMEOUT = timedelta(days=7)
"""The longest time limit an attempt may have (a longer one is a mistake: seconds
read as milliseconds, or a limit meant for a whole workflow)."""
