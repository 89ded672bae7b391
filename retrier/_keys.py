"""Idempotency keys and debounce: the values users give, checked before anything is
written.

One vocabulary across the tiers: `idempotency_key` makes a second call with the same
key return the first call's id (for as long as that run is kept); `key` is the
concurrency key a pool's `max_per_key` counts; `Debounce(key, period, max_wait)`
collapses calls into one run.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from ._checks import check_name
from ._clock import delay_ms
from ._errors import InvalidSettings


def check_idempotency_key(value: Any) -> str | None:
    """`value` if it is None or a valid key (1 to 200 characters, not blank, no NUL)."""
    return None if value is None else check_name(value, "idempotency_key")


@dataclass(frozen=True, slots=True)
class Debounce:
    """Collapse calls with the same `key` into one run.

    Calls within `period` of each other become one run, which takes the latest call's
    arguments (and context) and starts `period` after the last call, and no later
    than `max_wait` after the first (None: no such bound). Once that run has started,
    the next call makes a new one. `period` and `max_wait` are timedeltas or seconds.

    >>> pool.enqueue(reindex, {"doc": 7}, debounce=Debounce("doc-7", timedelta(seconds=5)))

    Raises `InvalidSettings` for a blank or over-long key, a period that is not
    positive, or a `max_wait` shorter than `period`.
    """

    key: str
    period: timedelta | float
    max_wait: timedelta | float | None = None
    period_ms: int = field(init=False, repr=False, compare=False)
    max_wait_ms: int | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_name(self.key, "the debounce key")
        period_ms = delay_ms(self.period, "the debounce period")
        if period_ms <= 0:
            raise InvalidSettings(f"the debounce period must be positive, got {self.period!r}")
        max_wait_ms = None
        if self.max_wait is not None:
            max_wait_ms = delay_ms(self.max_wait, "the debounce max_wait")
            if max_wait_ms < period_ms:
                raise InvalidSettings(
                    f"the debounce max_wait ({self.max_wait!r}) must not be shorter than "
                    f"its period ({self.period!r})"
                )
        object.__setattr__(self, "period_ms", period_ms)
        object.__setattr__(self, "max_wait_ms", max_wait_ms)

    def due_ms(self, now_ms: int, first_ms: int) -> int:
        """When the collapsed run starts, called now and first called at `first_ms`."""
        due = now_ms + self.period_ms
        return due if self.max_wait_ms is None else min(due, first_ms + self.max_wait_ms)


def check_debounce(value: Any) -> Debounce | None:
    """`value` if it is None or a `Debounce`."""
    if value is not None and not isinstance(value, Debounce):
        raise InvalidSettings(f"debounce must be a Debounce(key, period), got {value!r}")
    return value


def check_once(idempotency_key: str | None, debounce: Debounce | None) -> None:
    """Refuse an idempotency key with a debounce: each decides which run a call gets."""
    if idempotency_key is not None and debounce is not None:
        raise InvalidSettings(
            "give idempotency_key or debounce, not both: each decides which run a call gets"
        )


def renamed_key(key: Any, idempotency_key: Any, where: str) -> Any:
    """The idempotency key of a call that may still pass it as the old `key=`
    (deprecated: `key` is the concurrency key in every tier)."""
    if key is None:
        return idempotency_key
    if idempotency_key is not None:
        raise InvalidSettings(f"{where}: give idempotency_key, not also key (its old name)")
    warnings.warn(
        f"{where}(key=...) is deprecated: pass idempotency_key=... (in every tier, `key` "
        "is the concurrency key)",
        DeprecationWarning,
        stacklevel=3,
    )
    return key
