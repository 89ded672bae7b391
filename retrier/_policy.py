"""Retry policy: when the next attempt of a failing run is due."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import timedelta

from ._checks import check_duration, check_flag, check_integer, check_number

_DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff, as in Convex's action-retrier.

    The delay before attempt k (k >= 2) is ``initial_backoff_ms * base ** (k - 2)``,
    capped at ``max_backoff``; with the defaults: immediate, 250 ms, 500 ms, 1000 ms,
    and the run fails after ``max_failures`` = 4 failed attempts. ``jitter=True``
    multiplies each delay by a random factor in [0.5, 1.5).
    """

    initial_backoff_ms: int = 250
    base: float = 2.0
    max_failures: int = 4
    jitter: bool = False
    max_backoff: timedelta = timedelta(hours=1)
    _max_backoff_ms: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Types are checked too: 1.5 ms or max_failures=True would otherwise be stored
        # as whatever each database makes of them.
        check_integer(self.initial_backoff_ms, "initial_backoff_ms (one day at most)", 0, _DAY_MS)
        check_number(self.base, "base", 1, 100)
        check_integer(self.max_failures, "max_failures", 1, 1000)
        check_flag(self.jitter, "jitter")
        check_duration(self.max_backoff, "max_backoff", timedelta(0), timedelta(days=30))
        # Read on every enqueue: computed once.
        ms = int(self.max_backoff / timedelta(milliseconds=1))
        object.__setattr__(self, "_max_backoff_ms", ms)

    @property
    def max_backoff_ms(self) -> int:
        return self._max_backoff_ms

    def delay_ms(self, failures: int, rng: random.Random | None = None) -> int:
        """Delay after the `failures`-th failure, before the next attempt."""
        return backoff_ms(
            failures,
            self.initial_backoff_ms,
            self.base,
            self.max_backoff_ms,
            self.jitter,
            rng,
        )

    def with_overrides(
        self,
        *,
        initial_backoff_ms: int | None = None,
        base: float | None = None,
        max_failures: int | None = None,
        jitter: bool | None = None,
        max_backoff: timedelta | None = None,
    ) -> RetryPolicy:
        """A copy with the given settings replaced (None keeps the current one)."""
        if (
            initial_backoff_ms is None
            and base is None
            and max_failures is None
            and jitter is None
            and max_backoff is None
        ):
            return self  # the common case, on every enqueue: nothing to check again
        return RetryPolicy(
            initial_backoff_ms=self.initial_backoff_ms
            if initial_backoff_ms is None
            else initial_backoff_ms,
            base=self.base if base is None else base,
            max_failures=self.max_failures if max_failures is None else max_failures,
            jitter=self.jitter if jitter is None else jitter,
            max_backoff=self.max_backoff if max_backoff is None else max_backoff,
        )


def backoff_ms(
    failures: int,
    initial_backoff_ms: int,
    base: float,
    max_backoff_ms: int,
    jitter: bool,
    rng: random.Random | None = None,
) -> int:
    """The stored-row form of `RetryPolicy.delay_ms`, safe against overflow."""
    if failures < 1:
        return 0
    exponent = failures - 1
    # base ** exponent overflows floats for large exponents; the cap wins long before.
    if base > 1 and exponent * math.log2(base) > 64:
        delay = float(max_backoff_ms)
    else:
        delay = min(initial_backoff_ms * base**exponent, float(max_backoff_ms))
    if jitter:
        delay *= (rng or random).uniform(0.5, 1.5)
    return int(delay)

