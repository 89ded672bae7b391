"""`RetryBehavior`: how a pool retries a failing item, as Convex's workpool names it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from retrier import InvalidSettings, RetryPolicy


@dataclass(frozen=True, slots=True)
class RetryBehavior:
    """Retries of one work item: at most `max_attempts` attempts in all.

    The delay before attempt k (k >= 2) is ``initial_backoff_ms * base ** (k - 2)``,
    capped at `max_backoff`; `jitter=True` multiplies it by a random 0.5-1.5.

    >>> RetryBehavior(max_attempts=5, initial_backoff_ms=250, base=2)  # the default
    RetryBehavior(max_attempts=5, initial_backoff_ms=250, base=2, jitter=False, ...)
    """

    max_attempts: int = 5
    initial_backoff_ms: int = 250
    base: float = 2
    jitter: bool = False
    max_backoff: timedelta = timedelta(hours=1)

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not 1 <= self.max_attempts <= 1000:
            raise InvalidSettings(
                f"max_attempts must be between 1 and 1000, got {self.max_attempts}"
            )
        self.policy()  # validates the backoff settings with the retrier's own rules

    def policy(self) -> RetryPolicy:
        """The retrier policy this behaviour stands for (failures = attempts)."""
        return RetryPolicy(
            initial_backoff_ms=self.initial_backoff_ms,
            base=self.base,
            max_failures=self.max_attempts,
            jitter=self.jitter,
            max_backoff=self.max_backoff,
        )


NO_RETRY = RetryPolicy(max_failures=1)
