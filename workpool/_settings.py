"""A pool's persisted limits, validated before they reach the database."""

from __future__ import annotations

from datetime import timedelta

from retrier import InvalidSettings
from retrier.engine import QueueLimits, check_flag, check_name, delay_ms

MAX_PARALLELISM = 100_000

RateLimit = tuple[int, timedelta | float]

DEFAULT_PRIORITY_AGING = timedelta(minutes=1)
MAX_PERIOD_MS = 30 * 86_400_000


def pool_limits(
    name: str,
    max_parallelism: int,
    rate_limit: RateLimit | None,
    max_per_key: int | None,
    max_per_worker: int | None = None,
    priority_aging: timedelta | float | None = DEFAULT_PRIORITY_AGING,
    round_robin_keys: bool = False,
    rate_limit_per_key: RateLimit | None = None,
    group: str | None = None,
    guaranteed: int = 0,
) -> QueueLimits:
    """The engine's `QueueLimits` for a pool; raises `InvalidSettings` on bad values."""
    check_name(name, "a pool name")
    check_parallelism(max_parallelism)
    rate, period_ms = None, None
    if rate_limit is not None:
        rate, period_ms = _rate(rate_limit)
    if max_per_key is not None and (_not_int(max_per_key) or max_per_key < 1):
        raise InvalidSettings(
            f"max_per_key must be a positive integer or None, got {max_per_key!r}"
        )
    check_per_worker(max_per_worker)
    aging_ms = check_aging(priority_aging)
    check_flag(round_robin_keys, "round_robin_keys")
    key_rate, key_period_ms = None, None
    if rate_limit_per_key is not None:
        key_rate, key_period_ms = _rate(rate_limit_per_key, "rate_limit_per_key")
    check_guaranteed(group, guaranteed, max_parallelism)
    return QueueLimits(
        name=name,
        max_parallelism=max_parallelism,
        rate_limit=rate,
        rate_period_ms=period_ms,
        max_per_key=max_per_key,
        max_per_worker=max_per_worker,
        priority_aging_ms=aging_ms,
        round_robin=True if round_robin_keys else None,
        key_rate_limit=key_rate,
        key_rate_period_ms=key_period_ms,
        group_name=group,
        guaranteed=guaranteed if group is not None else None,
    )


def check_guaranteed(group: str | None, guaranteed: int, max_parallelism: int) -> None:
    """A pool's `guaranteed` slots of its group: 0 to its own cap, and only in a group
    (whether the group's cap covers them is checked when they are stored)."""
    if group is not None:
        check_name(group, "a pool group's name")
    if _not_int(guaranteed) or guaranteed < 0:
        raise InvalidSettings(f"guaranteed must be an integer of 0 or more, got {guaranteed!r}")
    if guaranteed and group is None:
        raise InvalidSettings(
            f"guaranteed={guaranteed} needs a group=: the slots are guaranteed out of a "
            f"PoolGroup's cap"
        )
    if guaranteed > max_parallelism:
        raise InvalidSettings(
            f"guaranteed={guaranteed} is more than the pool's own "
            f"max_parallelism={max_parallelism}"
        )


def check_aging(value: timedelta | float | None) -> int | None:
    """`priority_aging` in ms (None: due order, priority only breaks ties)."""
    if value is None:
        return None
    aging_ms = delay_ms(value, "priority_aging")
    if not 1 <= aging_ms <= MAX_PERIOD_MS:
        raise InvalidSettings(
            f"priority_aging must be from 1 ms to 30 days, or None (due order), got {value!r}"
        )
    return aging_ms


def check_per_worker(value: int | None) -> None:
    if value is not None and (_not_int(value) or not 1 <= value <= MAX_PARALLELISM):
        raise InvalidSettings(
            f"max_per_worker must be an integer from 1 to {MAX_PARALLELISM} or None, "
            f"got {value!r}"
        )


def check_parallelism(value: int) -> None:
    if _not_int(value) or not 0 <= value <= MAX_PARALLELISM:
        raise InvalidSettings(
            f"max_parallelism must be an integer from 0 (paused) to {MAX_PARALLELISM}, "
            f"got {value!r}"
        )


def _rate(rate_limit: RateLimit, what: str = "rate_limit") -> tuple[int, int]:
    try:
        limit, period = rate_limit
    except (TypeError, ValueError):
        raise InvalidSettings(
            f"{what} must be (limit, period), e.g. (100, timedelta(minutes=1)), "
            f"got {rate_limit!r}"
        ) from None
    if _not_int(limit) or limit < 1:
        raise InvalidSettings(f"{what} must allow at least 1 start, got {limit!r}")
    period_ms = delay_ms(period, "a rate limit period")
    if period_ms < 1:
        raise InvalidSettings(f"a rate limit period must be at least 1 ms, got {period!r}")
    if period_ms > MAX_PERIOD_MS:
        raise InvalidSettings(f"a rate limit period must be at most 30 days, got {period!r}")
    return limit, period_ms


def _not_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)
