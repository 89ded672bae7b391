"""Tier 1 semantics from DESIGN.md, on SQLite and PostgreSQL.

Timing is checked with a FakeClock and `Worker.run_until_idle`, which claims and
finishes due work without timers: time moves only when the test moves it.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from pydantic import BaseModel
from sqlalchemy import text
from sqlmodel import Field, Session, SQLModel, select

from retrier import (
    Canceled,
    Completed,
    Failed,
    FakeClock,
    InProgress,
    InvalidArguments,
    InvalidDatabaseURL,
    InvalidSettings,
    NonRetryableError,
    Retrier,
    RetryAfter,
    RunNotFinished,
    RunNotFound,
    SchemaTooNew,
    Success,
    TiersError,
    UnregisteredFunction,
    WaitTimeout,
)
from retrier.engine import Outcome
from tests.support import Calls, drain

MakeRetrier = Callable[..., Retrier]


def attempt_starts(retrier: Retrier, run_id: str) -> list[int]:
    return [a.started_ms for a in retrier.store.attempts(run_id)]


# -- backoff ------------------------------------------------------------------------


def test_a_retry_starts_its_backoff_after_the_real_end_of_the_attempt_before(
    make_retrier: MakeRetrier,
) -> None:
    """On the wall clock, an attempt's end is stamped rounded up to a whole millisecond,
    and its retry is due a backoff after that stamp. The retry never starts before the
    backoff has passed since the real end (a record made within the same millisecond
    once counted it from the millisecond before); and the worker that ran the attempt
    gives back what the rounding added, so some retries start before their stamp."""
    retrier = make_retrier(initial_backoff_ms=20)
    ends: dict[int, int] = {}
    starts: dict[int, int] = {}

    @retrier.action
    def fails_once(key: int) -> None:
        if key in ends:
            starts[key] = time.time_ns()
            return
        ends[key] = time.time_ns()
        raise RuntimeError("first attempt fails")

    with retrier:
        ids = []
        for key in range(20):  # one at a time: each retry is claimed ahead, by its timer
            ids.append(retrier.run(fails_once, {"key": key}))
            retrier.wait(ids[-1], timeout=30)
    for key, end in ends.items():
        assert starts[key] - end >= 20_000_000, f"retry {key} started early"
    before_stamp = [
        key for key, run_id in enumerate(ids)
        if starts[key] < attempt_starts(retrier, run_id)[1] * 1_000_000
    ]
    assert before_stamp, "no retry started before its stamp: the rounding was not given back"


def test_default_backoff_reproduces_the_seed_table(make_retrier: MakeRetrier) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    completions = Calls()

    @retrier.action
    def always_fails() -> None:
        raise RuntimeError("down")

    @retrier.on_complete
    def done(run_id: str, result: Any, context: Any) -> None:
        completions.add(result)

    start = clock.now_ms()
    run_id = retrier.run(always_fails, on_complete=done)
    drain(retrier)
    # immediate, then 250 ms, 500 ms, 1000 ms; never a moment early.
    for gap in (250, 500, 1000):
        clock.advance(timedelta(milliseconds=gap - 1))
        drain(retrier)
        assert len(attempt_starts(retrier, run_id)) == {250: 1, 500: 2, 1000: 3}[gap]
        clock.advance(timedelta(milliseconds=1))
        drain(retrier)
    starts = attempt_starts(retrier, run_id)
    assert [s - start for s in starts] == [0, 250, 750, 1750]
    status = retrier.status(run_id)
    assert isinstance(status, Completed) and isinstance(status.result, Failed)
    assert "RuntimeError: down" in status.result.error
    clock.advance(timedelta(days=1))
    drain(retrier)
    assert len(attempt_starts(retrier, run_id)) == 4, "gave up after max_failures=4"
    assert completions.items == [status.result]


def test_a_backoff_counts_from_when_the_attempt_ended_not_from_its_recording(
    make_retrier: MakeRetrier,
) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)

    @retrier.action
    def fails() -> None: ...

    run_id = retrier.run(fails, initial_backoff_ms=250)
    (claimed,), _ = retrier.store.claim("w", 1, 60_000)
    ended = clock.now_ms()
    clock.advance(timedelta(milliseconds=40))  # the record comes 40 ms after the failure
    retrier.store.record(
        [Outcome(run_id, claimed.fence, "failure", claimed.started_ms, error="x", ended_ms=ended)],
        "w",
        60_000,
    )
    assert retrier.store.get(run_id).due_ms == ended + 250


def test_per_run_overrides_set_the_schedule(make_retrier: MakeRetrier) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)

    @retrier.action
    def always_fails() -> None:
        raise RuntimeError("down")

    start = clock.now_ms()
    run_id = retrier.run(always_fails, initial_backoff_ms=1000, base=3, max_failures=6)
    for _ in range(10):
        drain(retrier)
        clock.advance(timedelta(milliseconds=500))
    for _ in range(200):
        drain(retrier)
        clock.advance(timedelta(seconds=1))
    starts = [s - start for s in attempt_starts(retrier, run_id)]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # Each attempt starts on the first tick at or after its due time (ticks are 500 ms / 1 s).
    # (PostgreSQL's claim adds a wait of 5 ms or more for its locks to the start it
    # stamps, which a loaded machine can cause even here: hence the 20 ms.)
    assert len(starts) == 6
    for gap, expected in zip(gaps, [1000, 3000, 9000, 27000, 81000], strict=True):
        assert expected - 20 <= gap < expected + 1000


def test_retry_after_sets_the_next_delay(make_retrier: MakeRetrier) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    calls = Calls()

    @retrier.action
    def rate_limited() -> str:
        calls.add(1)
        if len(calls.items) == 1:
            raise RetryAfter(5)
        return "ok"

    run_id = retrier.run(rate_limited)
    drain(retrier)
    clock.advance(timedelta(milliseconds=4999))
    drain(retrier)
    assert len(calls.items) == 1
    clock.advance(timedelta(milliseconds=1))
    drain(retrier)
    assert retrier.status(run_id) == Completed(Success("ok"))


def test_non_retryable_error_fails_at_once(retrier: Retrier) -> None:
    @retrier.action
    def bad_input() -> None:
        raise NonRetryableError("card declined")

    run_id = retrier.run(bad_input)
    drain(retrier)
    status = retrier.status(run_id)
    assert status == Completed(Failed("NonRetryableError: card declined"))
    assert len(retrier.store.attempts(run_id)) == 1


def test_backoff_fires_on_time_through_the_scheduler(make_retrier: MakeRetrier) -> None:
    # Polling is set to 10 s, so only the APScheduler wake-up can start attempt 2 and 3.
    retrier = make_retrier(poll_interval=timedelta(seconds=10))
    calls = Calls()

    @retrier.action
    def flaky() -> str:
        calls.add(time.monotonic())
        if len(calls.items) < 3:
            raise RuntimeError("not yet")
        return "done"

    with retrier:
        run_id = retrier.run(flaky, initial_backoff_ms=100)
        assert retrier.wait(run_id, timeout=10) == Completed(Success("done"))
    t = calls.items
    assert 0.095 <= t[1] - t[0] <= 0.2
    assert 0.195 <= t[2] - t[1] <= 0.3


def test_a_backoff_never_starts_its_attempt_early(make_retrier: MakeRetrier) -> None:
    """The worker's timer fires a few milliseconds ahead and claims as of the due time
    (so the attempt starts on time); the attempt itself waits for that time."""
    retrier = make_retrier(poll_interval=timedelta(seconds=10))
    started: list[int] = []

    @retrier.action
    def flaky() -> str:
        started.append(time.time_ns() // 1_000_000)
        if len(started) < 4:
            raise RuntimeError("not yet")
        return "done"

    with retrier:
        run_id = retrier.run(flaky, initial_backoff_ms=40, max_failures=5)
        assert retrier.wait(run_id, timeout=10) == Completed(Success("done"))
    attempts = retrier.store.attempts(run_id)
    assert len(attempts) == 4
    for failed, nxt, t in zip(attempts, attempts[1:], started[1:], strict=False):
        backoff = 40 * 2 ** (failed.number - 1)
        assert nxt.started_ms >= failed.started_ms + backoff
        # Not started before its stamped start, but for what rounding up the previous
        # attempt's end added, which this worker gives back (less than 1 ms).
        assert t >= nxt.started_ms - 1


def test_an_attempt_claimed_ahead_and_cancelled_before_its_start_never_runs(
    retrier: Retrier,
) -> None:
    from retrier._attempts import attempt
    from retrier.engine import Claimed

    calls = Calls()

    @retrier.action
    def work() -> None:
        calls.add("ran")

    now = retrier.clock.now_ms()
    claimed = Claimed(
        id="r1", fn="work", args={}, state="running", fence=1, attempts=1, failures=0,
        queue="", owner=None, on_complete=None, context=None, outcome=None, result=None,
        error=None, started_ms=now + 40,
    )

    async def main() -> None:
        limiter = anyio.CapacityLimiter(1)
        with anyio.move_on_after(0.01):  # a cancel request, before its start
            await attempt(retrier.registry, claimed, limiter=limiter,
                          going_async=lambda: None, clock=retrier.clock)
        await anyio.sleep(0.06)  # past the start it waited for

    anyio.run(main)
    assert calls.items == []


def test_an_attempts_end_is_stamped_where_its_action_ran(retrier: Retrier) -> None:
    """A retry's backoff counts from when the action returned or raised, stamped on
    its thread: a loop slow to take the outcome back must not push the retry later."""
    import threading

    from retrier._attempts import attempt
    from retrier.engine import Claimed

    class StampingClock(FakeClock):
        """Moves 100 ms on each reading; notes what the action's thread read."""

        def __init__(self) -> None:
            super().__init__()
            self.on_thread: list[int] = []
            self.loop = threading.get_ident()

        def now_ms(self) -> int:
            self.advance(0.1)
            value = super().now_ms()
            if threading.get_ident() != self.loop:
                self.on_thread.append(value)
            return value

    @retrier.action
    def fails() -> None:
        raise RuntimeError("try again")

    clock = StampingClock()
    claimed = Claimed(
        id="r1", fn="fails", args={}, state="running", fence=1, attempts=1, failures=0,
        queue="", owner=None, on_complete=None, context=None, outcome=None, result=None,
        error=None, started_ms=clock.now_ms(),
    )

    async def main() -> Any:
        clock.loop = threading.get_ident()
        return await attempt(retrier.registry, claimed, limiter=anyio.CapacityLimiter(1),
                             going_async=lambda: None, clock=clock)

    outcome = anyio.run(main)
    assert outcome.kind == "failure"
    assert clock.on_thread, "the end was not stamped on the action's thread"
    assert outcome.ended_ms == clock.on_thread[-1]


def test_a_claim_made_ahead_is_the_claim_of_that_moment(make_retrier: MakeRetrier) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)

    @retrier.action
    def noop() -> None: ...

    now = clock.now_ms()
    due_soon = retrier.run_after(timedelta(milliseconds=5), noop)
    retrier.run_after(timedelta(milliseconds=500), noop)
    assert retrier.store.claim("w", 10, 5_000)[0] == []  # nothing is due yet
    claimed, wake_at = retrier.store.claim("w", 10, 5_000, at_ms=now + 5)
    assert [c.id for c in claimed] == [due_soon]
    assert claimed[0].started_ms == now + 5
    assert wake_at == now + 500


# -- results and on_complete ---------------------------------------------------------


class Receipt(BaseModel):
    order: str
    at: datetime


def test_results_come_back_typed(retrier: Retrier) -> None:
    @retrier.action
    async def make_receipt(order: str) -> Receipt:
        return Receipt(order=order, at=datetime(2026, 1, 2, tzinfo=UTC))

    with retrier:
        run_id = retrier.run(make_receipt, {"order": "o1"})
        status = retrier.wait(run_id, timeout=10)
    assert isinstance(status.result, Success)
    assert status.result.value == Receipt(order="o1", at=datetime(2026, 1, 2, tzinfo=UTC))


def test_arguments_are_validated_and_coerced(retrier: Retrier) -> None:
    seen = Calls()

    @retrier.action
    def charge(amount: int, when: datetime) -> None:
        seen.add((amount, when))

    with retrier:
        run_id = retrier.run(charge, {"amount": "42", "when": "2026-01-02T00:00:00Z"})
        retrier.wait(run_id, timeout=10)
    assert seen.items == [(42, datetime(2026, 1, 2, tzinfo=UTC))]


def test_a_result_that_is_not_json_fails_the_run(retrier: Retrier) -> None:
    @retrier.action
    def returns_a_lock() -> Any:
        return threading.Lock()

    run_id = retrier.run(returns_a_lock)
    drain(retrier)
    status = retrier.status(run_id)
    assert isinstance(status, Completed) and isinstance(status.result, Failed)
    assert "not JSON-serializable" in status.result.error
    assert len(retrier.store.attempts(run_id)) == 1


def test_on_complete_runs_once_with_result_and_context(retrier: Retrier) -> None:
    calls = Calls()

    @retrier.action
    def double(x: int) -> int:
        return 2 * x

    @retrier.on_complete
    def record(run_id: str, result: Any, context: Any) -> None:
        calls.add((run_id, result, context))

    with retrier:
        ids = [retrier.run(double, {"x": i}, on_complete=record, context={"i": i})
               for i in range(20)]
        retrier.wait_all(ids, timeout=20)
    assert sorted(calls.items, key=lambda c: c[2]["i"]) == [
        (ids[i], Success(2 * i), {"i": i}) for i in range(20)
    ]


class Ledger(SQLModel, table=True):
    __tablename__ = "test_ledger"
    id: int | None = Field(default=None, primary_key=True)
    run_id: str
    outcome: str


def test_on_complete_with_session_commits_exactly_once(retrier: Retrier) -> None:
    SQLModel.metadata.create_all(retrier.engine, tables=[Ledger.__table__])  # type: ignore[list-item]
    calls = Calls()

    @retrier.action
    def work() -> str:
        return "ok"

    @retrier.on_complete
    def write_ledger(run_id: str, result: Any, context: Any, session: Session) -> None:
        calls.add(run_id)
        session.add(Ledger(run_id=run_id, outcome=result.kind))
        if len(calls.items) == 1:
            raise RuntimeError("handler crashed after writing")  # its write must roll back

    run_id = retrier.run(work, on_complete=write_ledger)
    clock_free_drain(retrier)
    with Session(retrier.engine) as s:
        rows = s.exec(select(Ledger)).all()
    assert [(r.run_id, r.outcome) for r in rows] == [(run_id, "success")]
    assert calls.items == [run_id, run_id]


def clock_free_drain(retrier: Retrier, rounds: int = 50) -> None:
    """Drain repeatedly with real time, for handler retries with short backoffs."""
    for _ in range(rounds):
        drain(retrier)
        row_states = {r.state for r in retrier.store.list_runs(limit=1000)}
        if row_states <= {"completed"}:
            return
        time.sleep(0.1)
    raise AssertionError(f"runs did not complete: {row_states}")


def test_on_complete_survives_the_death_of_the_delivering_worker(
    make_retrier: MakeRetrier,
) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock, lease=timedelta(seconds=5))
    calls = Calls()

    @retrier.action
    def work() -> str:
        return "ok"

    @retrier.on_complete
    def notify(run_id: str, result: Any, context: Any) -> None:
        calls.add(run_id)

    run_id = retrier.run(work, on_complete=notify)
    # A worker claims the run and records its outcome, then dies before the handler.
    (claimed,), _ = retrier.store.claim("doomed", 10, 5000)
    from retrier.engine import Outcome

    recorded = retrier.store.record(
        [Outcome(run_id, claimed.fence, "success", claimed.started_ms, result="ok")],
        "doomed",
        5000,
    )
    assert [f.id for f in recorded.to_deliver] == [run_id]
    assert isinstance(retrier.status(run_id), Completed)
    drain(retrier)
    assert calls.items == [], "the lease still belongs to the dead worker"
    clock.advance(timedelta(seconds=6))
    assert retrier.store.reap() == 1
    drain(retrier)
    assert calls.items == [run_id]
    drain(retrier)
    assert calls.items == [run_id]


# -- leases and fencing --------------------------------------------------------------------


def test_a_dead_workers_run_is_retried_and_counted_as_a_failure(
    make_retrier: MakeRetrier,
) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock, lease=timedelta(seconds=5))

    @retrier.action
    def work() -> str:
        return "ok"

    run_id = retrier.run(work)
    (first,), _ = retrier.store.claim("dies", 10, 5000)
    clock.advance(timedelta(seconds=4))
    assert retrier.store.reap() == 0, "lease not yet expired"
    clock.advance(timedelta(seconds=2))
    assert retrier.store.reap() == 1
    row = retrier.store.get(run_id)
    assert (row.state, row.failures) == ("pending", 1)
    clock.advance(timedelta(milliseconds=250))
    drain(retrier)
    assert retrier.status(run_id) == Completed(Success("ok"))
    outcomes = [a.outcome for a in retrier.store.attempts(run_id)]
    assert outcomes == ["lost", "success"]

    # The stale worker wakes up and reports: its outcome is refused by the fence.
    from retrier.engine import Outcome

    stale = retrier.store.record(
        [Outcome(run_id, first.fence, "failure", first.started_ms, error="late")], "dies", 5000
    )
    assert stale.stale == [run_id]
    assert retrier.status(run_id) == Completed(Success("ok"))


def test_heartbeats_keep_a_long_action_leased(make_retrier: MakeRetrier) -> None:
    retrier = make_retrier(lease=timedelta(milliseconds=600))
    calls = Calls()

    @retrier.action
    def slow() -> str:
        calls.add(1)
        time.sleep(1.5)  # longer than two leases: only heartbeats keep it ours
        return "done"

    with retrier:
        run_id = retrier.run(slow)
        assert retrier.wait(run_id, timeout=10) == Completed(Success("done"))
    assert len(calls.items) == 1
    assert [a.outcome for a in retrier.store.attempts(run_id)] == ["success"]


# -- cancel -------------------------------------------------------------------------------


def test_cancel_pending_run(retrier: Retrier) -> None:
    calls = Calls()

    @retrier.action
    def later() -> None:
        calls.add("ran")

    @retrier.on_complete
    def done(run_id: str, result: Any, context: Any) -> None:
        calls.add(result)

    run_id = retrier.run_after(timedelta(hours=1), later, on_complete=done)
    assert retrier.status(run_id) == InProgress()
    retrier.cancel(run_id)
    assert retrier.status(run_id) == Completed(Canceled())
    drain(retrier)
    assert calls.items == [Canceled()]
    retrier.cancel(run_id)  # already finished: a no-op
    assert calls.items == [Canceled()]


def test_cancel_running_async_action_cancels_its_task(retrier: Retrier) -> None:
    started = threading.Event()
    cancelled = threading.Event()
    calls = Calls()

    @retrier.action
    async def forever() -> None:
        started.set()
        try:
            await anyio.sleep(3600)
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise

    @retrier.on_complete
    def done(run_id: str, result: Any, context: Any) -> None:
        calls.add(result)

    with retrier:
        run_id = retrier.run(forever, on_complete=done)
        assert started.wait(10)
        retrier.cancel(run_id)
        assert retrier.status(run_id) == Completed(Canceled())
        assert retrier.wait(run_id, timeout=10) == Completed(Canceled())
    assert cancelled.is_set()
    assert calls.items == [Canceled()]


def test_cancel_running_sync_action_discards_its_result(retrier: Retrier) -> None:
    started = threading.Event()
    release = threading.Event()

    @retrier.action
    def blocking() -> str:
        started.set()
        release.wait(10)
        return "too late"

    with retrier:
        run_id = retrier.run(blocking)
        assert started.wait(10)
        retrier.cancel(run_id)
        assert retrier.status(run_id) == Completed(Canceled())
        release.set()
        assert retrier.wait(run_id, timeout=10) == Completed(Canceled())
    row = retrier.store.get(run_id)
    assert row.result is None and row.outcome == "canceled"


# -- status, cleanup, retention --------------------------------------------------------------


def test_status_moves_from_in_progress_to_completed(retrier: Retrier) -> None:
    started = threading.Event()
    release = threading.Event()

    @retrier.action
    def step() -> int:
        started.set()
        release.wait(10)
        return 7

    run_id = retrier.run(step)
    assert retrier.status(run_id) == InProgress()
    with retrier:
        assert started.wait(10)
        assert retrier.status(run_id) == InProgress()
        release.set()
        assert retrier.wait(run_id, timeout=10) == Completed(Success(7))
    assert retrier.status(run_id) == Completed(Success(7))


def test_cleanup_deletes_a_finished_run(retrier: Retrier) -> None:
    @retrier.action
    def quick() -> int:
        return 1

    pending = retrier.run_after(3600, quick)
    with pytest.raises(RunNotFinished):
        retrier.cleanup(pending)
    run_id = retrier.run(quick)
    drain(retrier)
    retrier.cleanup(run_id)
    with pytest.raises(RunNotFound):
        retrier.status(run_id)
    with pytest.raises(RunNotFound):
        retrier.cleanup(run_id)
    assert retrier.store.attempts(run_id) == []


def test_completed_runs_are_deleted_after_seven_days(make_retrier: MakeRetrier) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)

    @retrier.action
    def quick() -> int:
        return 1

    done = retrier.run(quick)
    drain(retrier)
    waiting = retrier.run_after(timedelta(days=30), quick)
    clock.advance(timedelta(days=7) - timedelta(milliseconds=1))
    assert retrier.store.purge_completed(int(retrier.retention.total_seconds() * 1000)) == 0
    clock.advance(timedelta(milliseconds=2))
    assert retrier.store.purge_completed(int(retrier.retention.total_seconds() * 1000)) == 1
    with pytest.raises(RunNotFound):
        retrier.status(done)
    assert retrier.status(waiting) == InProgress()


def test_workers_schedule_retention_daily(retrier: Retrier) -> None:
    with retrier:
        worker = retrier._workers[0]
        assert worker._timers is not None
        assert {"heartbeat", "reap", "retention", "poll"} <= set(worker._timers.job_names())


def test_wait_times_out(retrier: Retrier) -> None:
    @retrier.action
    def never_runs() -> None: ...

    run_id = retrier.run(never_runs)
    with pytest.raises(WaitTimeout) as info:
        retrier.wait(run_id, timeout=0.05)
    assert isinstance(info.value, TimeoutError)


# -- transactional enqueue -------------------------------------------------------------------


def test_run_in_a_session_rolls_back_with_the_caller(retrier: Retrier) -> None:
    SQLModel.metadata.create_all(retrier.engine, tables=[Ledger.__table__])  # type: ignore[list-item]

    @retrier.action
    def welcome(user: str) -> str:
        return f"hi {user}"

    with Session(retrier.engine) as s:
        s.add(Ledger(run_id="-", outcome="user created"))
        rolled_back = retrier.run(welcome, {"user": "ann"}, session=s)
        s.rollback()
    with pytest.raises(RunNotFound):
        retrier.status(rolled_back)

    with Session(retrier.engine) as s:
        s.add(Ledger(run_id="-", outcome="user created"))
        committed = retrier.run(welcome, {"user": "bob"}, session=s)
        s.commit()
    with retrier:
        assert retrier.wait(committed, timeout=10) == Completed(Success("hi bob"))
    with Session(retrier.engine) as s:
        assert len(s.exec(select(Ledger)).all()) == 1


# -- bad input ------------------------------------------------------------------------------


def _count_runs(retrier: Retrier) -> int:
    with retrier.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM tiers_runs")).scalar() or 0)


def test_bad_input_gets_a_clear_error_and_writes_nothing(retrier: Retrier) -> None:
    def not_registered(x: int) -> None: ...

    @retrier.action
    def typed(x: int) -> None: ...

    with pytest.raises(UnregisteredFunction, match="not_registered"):
        retrier.run(not_registered, {"x": 1})
    with pytest.raises(InvalidArguments, match="typed"):
        retrier.run(typed, {"x": "not a number"})
    with pytest.raises(InvalidArguments):
        retrier.run(typed, {"x": 1, "extra": 2})
    with pytest.raises(InvalidArguments):
        retrier.run(typed, {})
    for bad in ({"initial_backoff_ms": -1}, {"base": 0}, {"max_failures": 0},
                {"max_failures": 10**9}, {"initial_backoff_ms": 10**12}):
        with pytest.raises(InvalidSettings):
            retrier.run(typed, {"x": 1}, **bad)
    with pytest.raises(UnregisteredFunction):
        retrier.run(typed, {"x": 1}, on_complete=not_registered)
    with pytest.raises(ValueError, match="naive"):
        retrier.run_at(datetime(2030, 1, 1), typed, {"x": 1})
    assert _count_runs(retrier) == 0
    with pytest.raises(RunNotFound) as info:
        retrier.status("no-such-run")
    assert isinstance(info.value, LookupError) and "no-such-run" in str(info.value)
    with pytest.raises(RunNotFound):
        retrier.cancel("no-such-run")


def test_every_error_shares_one_root() -> None:
    for error in (RunNotFound, InvalidArguments, InvalidSettings, UnregisteredFunction,
                  InvalidDatabaseURL, SchemaTooNew, WaitTimeout, RunNotFinished):
        assert issubclass(error, TiersError)


@pytest.mark.parametrize("url", ["not a url", "mysql://u@h/db", "sqlite://", "sqlite:///:memory:",
                                 "postgresql+asyncpg://u@h/db"])
def test_malformed_database_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidDatabaseURL):
        Retrier(url)


def test_a_newer_schema_is_refused(db_url: str) -> None:
    first = Retrier(db_url)
    with first.engine.begin() as conn:
        conn.execute(text("UPDATE tiers_meta SET value = 99 WHERE key = 'schema_version'"))
    first.close()
    with pytest.raises(SchemaTooNew, match="version 99"):
        Retrier(db_url)


def test_a_row_naming_an_unregistered_function_is_refused(make_retrier: MakeRetrier) -> None:
    """Never imported or called: left for a worker that has it, and failed once no live
    worker has registered it for the grace period."""
    clock = FakeClock()
    retrier = make_retrier(clock=clock, unregistered_grace=timedelta(minutes=5))

    @retrier.action
    def real() -> None: ...

    new = retrier.prepare(real, {})
    from dataclasses import replace

    retrier.submit([replace(new, fn="os.system", args={"command": "touch /tmp/pwned"})])
    drain(retrier)
    assert retrier.store.get(new.id).state == "pending"
    worker = retrier.worker()
    worker.announce()
    assert worker.sweep_unrunnable() == 0
    clock.advance(timedelta(minutes=5))
    worker.announce()
    assert worker.sweep_unrunnable() == 1
    status = retrier.status(new.id)
    assert isinstance(status, Completed) and isinstance(status.result, Failed)
    assert "os.system" in status.result.error and "not registered" in status.result.error
    worker.retire()


def test_two_functions_cannot_share_a_name(retrier: Retrier) -> None:
    @retrier.action(name="same")
    def one() -> None: ...

    with pytest.raises(TiersError, match="same"):

        @retrier.action(name="same")
        def two() -> None: ...


# -- async API --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_enqueues_on_one_loop_share_commits_and_keep_runs_rules(
    retrier: Retrier,
) -> None:
    """`run_async` joins the calling loop's group commit (no thread per enqueue):
    enqueues made at once commit together on SQLite, each keeping `run`'s rules."""
    import asyncio

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @retrier.action
    async def add(a: int, b: int) -> int:
        return a + b

    commits: list[object] = []

    def counted(conn: Any) -> None:
        commits.append(conn)

    event.listen(Engine, "commit", counted)
    try:
        ids = await asyncio.gather(*(retrier.run_async(add, {"a": i, "b": 1}) for i in range(30)))
    finally:
        event.remove(Engine, "commit", counted)
    assert len(set(ids)) == 30
    assert all(retrier.status(i) == InProgress() for i in ids)
    if retrier.engine.dialect.name == "sqlite":
        # The first alone (autocommit, on a connection of its own: no commit event),
        # the rest in a group or two. (With a thread each, all 30 alone: none.)
        assert 1 <= len(commits) <= 2, commits

    with pytest.raises(InvalidArguments):
        await retrier.run_async(add, {"a": "x", "b": 1})
    with pytest.raises(InvalidSettings):
        await retrier.run_async(add, {"a": 1, "b": 1}, max_failures=-1)
    keyed = await asyncio.gather(
        *(retrier.run_async(add, {"a": 1, "b": 1}, idempotency_key="k") for _ in range(3))
    )
    assert len(set(keyed)) == 1
    # run_at_async and run_after_async take the same way, with their due times.
    before = len(commits)
    event.listen(Engine, "commit", counted)
    try:
        later = await asyncio.gather(
            *(retrier.run_after_async(3600, add, {"a": i, "b": 0}) for i in range(5)),
            *(
                retrier.run_at_async(datetime.now(UTC) + timedelta(hours=1), add, {"a": 1, "b": i})
                for i in range(5)
            ),
        )
    finally:
        event.remove(Engine, "commit", counted)
    if retrier.engine.dialect.name == "sqlite":
        assert 1 <= len(commits) - before <= 2, commits  # a group or two (none: threads)
    now = retrier.clock.now_ms()
    assert all(retrier.store.get(i).due_ms > now + 3_500_000 for i in later)
    with pytest.raises(InvalidSettings, match="unknown option"):
        await retrier.run_after_async(1, add, {"a": 1, "b": 1}, debounce=None, queue="x")
    with retrier.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM tiers_runs")).scalar() == 41
    async with retrier:
        await retrier.wait_all_async(ids, timeout=10)
        assert retrier.status(ids[4]) == Completed(Success(5))


@pytest.mark.anyio
async def test_async_twins_and_async_with(retrier: Retrier) -> None:
    @retrier.action
    async def add(a: int, b: int) -> int:
        return a + b

    async with retrier:
        run_id = await retrier.run_async(add, {"a": 2, "b": 3})
        assert await retrier.wait_async(run_id, timeout=10) == Completed(Success(5))
        assert await retrier.status_async(run_id) == Completed(Success(5))
        later = await retrier.run_after_async(3600, add, {"a": 1, "b": 1})
        await retrier.cancel_async(later)
        assert await retrier.status_async(later) == Completed(Canceled())
        await retrier.cleanup_async(later)
        at = await retrier.run_at_async(datetime.now(UTC), add, {"a": 1, "b": 2})
        assert await retrier.wait_async(at, timeout=10) == Completed(Success(3))


# -- wake-ups across processes ---------------------------------------------------------------


def test_a_run_enqueued_elsewhere_starts_within_milliseconds(
    make_retrier: MakeRetrier, db_url: str
) -> None:
    """Announced (PostgreSQL's NOTIFY; a ping to the worker's socket on SQLite), not
    found by a poll: the worker's poll is set to 30 s."""
    worker_side = make_retrier(poll_interval=timedelta(seconds=30))
    app_side = make_retrier()
    for r in (worker_side, app_side):

        @r.action(name="ping")
        def ping() -> None: ...

    with worker_side:
        time.sleep(0.2)  # let the listener come up
        latencies = []
        for _ in range(5):
            t = time.monotonic()
            run_id = app_side.run("ping")
            app_side.wait(run_id, timeout=5)
            latencies.append(time.monotonic() - t)
    assert sorted(latencies)[2] < 0.2, latencies


def test_log_level_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, db_url: str
) -> None:
    import logging

    monkeypatch.setenv("TIERS_LOG_LEVEL", "ERROR")
    Retrier(db_url).close()
    assert logging.getLogger("tiers").level == logging.ERROR
    monkeypatch.setenv("TIERS_LOG_LEVEL", "DEBUG")
    Retrier(db_url).close()
    assert logging.getLogger("tiers").level == logging.DEBUG
    monkeypatch.setenv("TIERS_LOG_LEVEL", "INFO")
    Retrier(db_url).close()


# -- graceful shutdown -------------------------------------------------------------------------


def test_async_runs_claimed_together_end_cleanly_when_the_worker_is_cancelled(
    make_retrier: MakeRetrier,
) -> None:
    # Claimed in one batch, they run as tasks of one task of the worker's group: a
    # cancellation from outside reaches each attempt, none takes the worker down
    # (recording into the stopped record loop once raised BrokenResourceError), and
    # the worker records their interruptions on its way out: the runs are free to run
    # elsewhere at once, not leased until their leases expire.
    retrier = make_retrier()
    started: list[int] = []
    cancelled: list[int] = []
    all_started = threading.Event()

    @retrier.action
    async def hangs(i: int) -> None:
        started.append(i)
        if len(started) == 3:
            all_started.set()
        try:
            await anyio.sleep(3600)
        except BaseException:
            cancelled.append(i)
            raise

    async def scenario() -> list[str]:
        ids = [retrier.run(hangs, {"i": i}) for i in range(3)]  # stored before any claim
        worker = retrier.worker(concurrency=5)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                await tg.start(worker.serve)
                await anyio.to_thread.run_sync(all_started.wait, 10)
                tg.cancel_scope.cancel()
        retrier.forget_worker(worker)
        return ids

    ids = anyio.run(scenario)
    assert sorted(cancelled) == [0, 1, 2]
    # Released, not failed: pending again, held by no one, due at once.
    rows = [retrier.store.get(run_id) for run_id in ids]
    assert [(r.state, r.failures, r.lease_owner) for r in rows] == [("pending", 0, None)] * 3
    assert all(r.due_ms <= retrier.store.clock.now_ms() for r in rows)


def test_shutdown_finishes_sync_work_and_releases_async_work(make_retrier: MakeRetrier) -> None:
    retrier = make_retrier()
    sync_started = threading.Event()
    async_started = threading.Event()

    @retrier.action
    def short_sync() -> str:
        sync_started.set()
        time.sleep(0.3)
        return "finished"

    @retrier.action
    async def long_async() -> str:
        async_started.set()
        await anyio.sleep(3600)
        return "never"

    async def scenario() -> tuple[str, str]:
        worker = retrier.worker(shutdown_grace=timedelta(milliseconds=500))
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                await tg.start(worker.serve)
                sync_id = await retrier.run_async(short_sync)
                async_id = await retrier.run_async(long_async)
                await anyio.to_thread.run_sync(sync_started.wait, 10)
                await anyio.to_thread.run_sync(async_started.wait, 10)
                worker.stop()
        retrier.forget_worker(worker)
        return sync_id, async_id

    sync_id, async_id = anyio.run(scenario)
    assert retrier.status(sync_id) == Completed(Success("finished"))
    row = retrier.store.get(async_id)
    # Released, not failed: another worker will run it as if it never started.
    assert (row.state, row.failures, row.attempts) == ("pending", 0, 0)
