"""Retrying a failed run by hand (`Retrier.retry`, `Store.retry`): what the dashboard's
"retry now" does."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from retrier import (
    Completed,
    Failed,
    FakeClock,
    NonRetryableError,
    Retrier,
    RunNotFound,
    RunNotRetryable,
    Success,
)
from tests.support import Calls, drain

MakeRetrier = Callable[..., Retrier]


def test_a_failed_run_becomes_pending_again_due_now(make_retrier: MakeRetrier) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    outcomes = Calls()
    healthy = {"yes": False}

    @retrier.action
    def flaky() -> str:
        if not healthy["yes"]:
            raise NonRetryableError("down")
        return "up"

    @retrier.on_complete
    def done(run_id: str, result: object, context: object) -> None:
        outcomes.add(result)

    run_id = retrier.run(flaky, on_complete=done)
    drain(retrier)
    assert retrier.status(run_id) == Completed(Failed("NonRetryableError: down"))

    clock.advance(60)
    retrier.retry(run_id)
    row = retrier.store.get(run_id)
    assert (row.state, row.outcome, row.failures, row.finished_ms) == ("pending", None, 0, None)
    assert row.due_ms == clock.now_ms()  # due now, whatever its backoff said

    healthy["yes"] = True
    drain(retrier)
    assert retrier.status(run_id) == Completed(Success("up"))
    assert [a.number for a in retrier.store.attempts(run_id)] == [1, 2]  # history kept
    assert len(outcomes.items) == 2  # on_complete heard of the failure, then the success


def test_only_failed_runs_can_be_retried(make_retrier: MakeRetrier) -> None:
    retrier = make_retrier(clock=FakeClock())

    @retrier.action
    def fine() -> int:
        return 1

    pending = retrier.run(fine)
    with pytest.raises(RunNotRetryable, match="pending"):
        retrier.retry(pending)
    drain(retrier)
    with pytest.raises(RunNotRetryable, match="has not failed"):
        retrier.retry(pending)
    with pytest.raises(RunNotFound):
        retrier.retry("nope")
