"""Turning one `enqueue` call (or one batch item) into a validated engine row."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from retrier import InvalidSettings, Retrier, RetryPolicy
from retrier.engine import Fn, NewRun, check_name, delay_ms, due_ms

from ._behavior import NO_RETRY, RetryBehavior

OPTIONS = frozenset(
    {
        "on_complete",
        "context",
        "retry",
        "run_at",
        "run_after",
        "priority",
        "key",
        "idempotency_key",
        "debounce",
    }
)
_MAX_PRIORITY = 2**31 - 1

Retry = bool | RetryBehavior | None


class Preparer:
    """Builds the rows of one pool; caches retry policies, which batches share."""

    def __init__(
        self, retrier: Retrier, queue: str, retry_by_default: bool, default: RetryBehavior
    ) -> None:
        self._retrier = retrier
        self._queue = queue
        self._with_retry = default.policy()
        self._default = self._with_retry if retry_by_default else NO_RETRY
        self._policies: dict[RetryBehavior, RetryPolicy] = {}

    def prepare(
        self,
        fn: Fn | str,
        args: dict[str, Any] | None,
        options: Mapping[str, Any],
        now_ms: int,
    ) -> NewRun:
        """Validate one item; raises a `TiersError` naming the problem, writes nothing."""
        unknown = set(options) - OPTIONS
        if unknown:
            raise InvalidSettings(
                f"unknown enqueue option(s) {sorted(unknown)}; expected some of {sorted(OPTIONS)}"
            )
        priority = options.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int) or not (
            -_MAX_PRIORITY <= priority <= _MAX_PRIORITY
        ):
            raise InvalidSettings(f"priority must be a 32-bit integer, got {priority!r}")
        key = options.get("key")
        if key is not None:
            check_name(key, "key")
        debounce = options.get("debounce")
        if debounce is not None and (
            options.get("run_at") is not None or options.get("run_after") is not None
        ):
            raise InvalidSettings(
                "give debounce or run_at/run_after, not both: a debounce sets the start"
            )
        return self._retrier.prepare(
            fn,
            args,
            on_complete=options.get("on_complete"),
            context=options.get("context"),
            policy=self._policy(options.get("retry")),
            due_ms=_due_ms(options.get("run_at"), options.get("run_after"), now_ms),
            queue=self._queue,
            key=key,
            priority=priority,
            idempotency_key=options.get("idempotency_key"),
            debounce=debounce,
        )

    def _policy(self, retry: Retry) -> RetryPolicy:
        if retry is None:
            return self._default
        if retry is True:
            return self._with_retry
        if retry is False:
            return NO_RETRY
        if isinstance(retry, RetryBehavior):
            policy = self._policies.get(retry)
            if policy is None:
                policy = self._policies[retry] = retry.policy()
            return policy
        raise InvalidSettings(f"retry must be True, False or a RetryBehavior, got {retry!r}")


def _due_ms(run_at: datetime | None, run_after: timedelta | float | None, now_ms: int) -> int:
    if run_at is not None and run_after is not None:
        raise InvalidSettings("give run_at or run_after, not both")
    if run_at is not None:
        return due_ms(run_at, "run_at", now_ms)
    if run_after is not None:
        return now_ms + delay_ms(run_after, "run_after")
    return now_ms
