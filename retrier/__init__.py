"""durable-tiers, tier 1: durable retries of actions with exponential backoff.

The engine the higher tiers build on lives here too: the store (`_store`, with
`_dialects` for SQLite and PostgreSQL), the registry (`_registry`), the worker
(`_worker`) and its timers (`_timers`).
"""

from __future__ import annotations

from ._clock import Clock, FakeClock, SystemClock
from ._errors import (
    DatabaseBusy,
    DatabaseUnavailable,
    DuplicateRegistration,
    HandBack,
    InvalidArguments,
    InvalidDatabaseURL,
    InvalidSchedule,
    InvalidSettings,
    NonRetryableError,
    RetryAfter,
    RunNotFinished,
    RunNotFound,
    RunNotRetryable,
    ScheduleNotFound,
    SchemaMissing,
    SchemaTooNew,
    TiersError,
    UnregisteredFunction,
    ValueTooLarge,
    WaitTimeout,
)
from ._explain import Why
from ._keys import Debounce
from ._policy import RetryPolicy
from ._results import (
    Canceled,
    Completed,
    Failed,
    InProgress,
    RunResult,
    RunStatus,
    Success,
)
from ._retrier import Retrier
from ._schedules import Schedule
from ._worker import Worker

__all__ = [
    "Canceled",
    "Clock",
    "Completed",
    "DatabaseBusy",
    "DatabaseUnavailable",
    "Debounce",
    "DuplicateRegistration",
    "Failed",
    "FakeClock",
    "HandBack",
    "InProgress",
    "InvalidArguments",
    "InvalidDatabaseURL",
    "InvalidSchedule",
    "InvalidSettings",
    "NonRetryableError",
    "Retrier",
    "RetryAfter",
    "RetryPolicy",
    "RunNotFinished",
    "RunNotFound",
    "RunNotRetryable",
    "RunResult",
    "RunStatus",
    "Schedule",
    "ScheduleNotFound",
    "SchemaMissing",
    "SchemaTooNew",
    "Success",
    "SystemClock",
    "TiersError",
    "UnregisteredFunction",
    "ValueTooLarge",
    "WaitTimeout",
    "Why",
    "Worker",
]
