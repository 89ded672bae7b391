"""Execution timeouts (issue #13, part 2): an attempt's time limit on every tier, and
a workflow's deadline. On SQLite and PostgreSQL.

Retries and deadlines move on a FakeClock; the limit of an attempt is real time (it
is measured by the worker's event loop), so those tests use limits of 0.2 s.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import anyio
import pytest
from sqlalchemy import text

from retrier import (
    Canceled,
    Completed,
    DuplicateRegistration,
    Failed,
    FakeClock,
    InProgress,
    InvalidSettings,
    Retrier,
    Success,
)
from tests.support import Calls, drain

MakeRetrier = Callable[..., Retrier]

LIMIT = 0.2  # seconds: an attempt past it fails


def attempts(retrier: Retrier, run_id: str) -> list[tuple[str, str | None]]:
    return [(a.outcome, a.error) for a in retrier.store.attempts(run_id)]


def count_runs(retrier: Retrier) -> int:
    with retrier.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM tiers_runs")).scalar_one())


# -- the retrier ------------------------------------------------------------------------


def test_an_async_attempt_past_its_limit_is_cancelled_and_retried(
    make_retrier: MakeRetrier,
) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    cancelled = threading.Event()
    calls = Calls()

    @retrier.action(timeout=LIMIT)
    async def slow_then_fast() -> str:
        calls.add("start")
        if len(calls.items) == 1:
            try:
                await anyio.sleep(3600)
            except anyio.get_cancelled_exc_class():
                cancelled.set()
                raise
        return "done"

    run_id = retrier.run(slow_then_fast)
    assert retrier.store.get(run_id).timeout_ms == 200  # the registration's limit
    drain(retrier)
    assert cancelled.is_set(), "the task of the timed-out attempt was cancelled"
    assert attempts(retrier, run_id) == [("failed", "AttemptTimeout: attempt exceeded 200 ms")]
    clock.advance(timedelta(seconds=1))  # past the policy's backoff
    drain(retrier)
    assert retrier.status(run_id) == Completed(Success("done"))


def test_a_run_that_keeps_timing_out_fails_with_the_limit_in_its_error(
    make_retrier: MakeRetrier,
) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock, max_failures=2)
    results = Calls()

    @retrier.action
    async def hangs() -> None:
        await anyio.sleep(3600)

    @retrier.on_complete
    def done(run_id: str, result: Any, context: Any) -> None:
        results.add(result)

    run_id = retrier.run(hangs, timeout=timedelta(milliseconds=200), on_complete=done)
    drain(retrier)
    clock.advance(timedelta(seconds=1))
    drain(retrier)
    error = "AttemptTimeout: attempt exceeded 200 ms"
    assert retrier.status(run_id) == Completed(Failed(error))
    assert attempts(retrier, run_id) == [("failed", error), ("failed", error)]
    assert results.items == [Failed(error)]


def test_a_sync_attempt_past_its_limit_is_abandoned_and_frees_its_slot(
    make_retrier: MakeRetrier,
) -> None:
    retrier = make_retrier(concurrency=1)
    release = threading.Event()
    returned = threading.Event()

    @retrier.action(timeout=LIMIT)
    def blocks() -> str:
        release.wait(30)
        returned.set()
        return "too late"

    @retrier.action
    def quick() -> str:
        return "quick"

    try:
        with retrier:
            stuck = retrier.run(blocks, max_failures=1)
            after = retrier.run(quick)
            # The only slot is freed when the limit passes, while the thread still runs.
            assert retrier.wait(after, timeout=10) == Completed(Success("quick"))
            status = retrier.wait(stuck, timeout=10)
            assert not returned.is_set()
            release.set()
            assert returned.wait(10)
    finally:
        release.set()
    assert isinstance(status.result, Failed)
    assert status.result.error.startswith("AttemptTimeout: attempt exceeded 200 ms; its thread")
    row = retrier.store.get(stuck)
    assert row.outcome == "failed" and row.result is None, "the late result is discarded"


def test_a_run_limit_overrides_the_registered_one(make_retrier: MakeRetrier) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock, max_failures=1)

    @retrier.action(timeout=3600)
    async def waits(seconds: float) -> str:
        await anyio.sleep(seconds)
        return "ok"

    @retrier.action
    async def unlimited() -> None: ...

    short = retrier.run(waits, {"seconds": 5}, timeout=LIMIT)
    later = retrier.run_after(0, waits, {"seconds": 5}, timeout=LIMIT)
    fits = retrier.run(waits, {"seconds": 0})
    free = retrier.run(unlimited)
    drain(retrier)
    for run_id in (short, later):
        assert retrier.status(run_id) == Completed(
            Failed("AttemptTimeout: attempt exceeded 200 ms")
        )
    assert retrier.status(fits) == Completed(Success("ok"))
    assert retrier.store.get(fits).timeout_ms == 3_600_000
    assert retrier.store.get(free).timeout_ms is None


BAD_LIMITS = [0, 0.0, -1, timedelta(0), timedelta(seconds=-5), True, False, "30", [30],
              float("nan"), float("inf"), 10**30, 8 * 86_400, timedelta(days=8), 0.0001]


@pytest.mark.parametrize("limit", BAD_LIMITS, ids=repr)
def test_bad_limits_are_refused_before_anything_is_written(
    retrier: Retrier, limit: Any
) -> None:
    @retrier.action
    def act() -> None: ...

    with pytest.raises(InvalidSettings, match="timeout"):
        retrier.action(name="other", timeout=limit)(lambda: None)
    with pytest.raises(InvalidSettings, match="timeout"):
        retrier.run(act, timeout=limit)
    with pytest.raises(InvalidSettings, match="timeout"):
        retrier.run_after(1, act, timeout=limit)
    assert count_runs(retrier) == 0
    assert not retrier.registry.has_action("other")


def test_a_limit_in_milliseconds_gets_a_hint(retrier: Retrier) -> None:
    @retrier.action
    def act() -> None: ...

    with pytest.raises(InvalidSettings, match="seconds, not milliseconds"):
        retrier.run(act, timeout=30_000_000)


def test_registering_again_with_another_limit_is_refused(retrier: Retrier) -> None:
    async def act() -> None: ...

    retrier.action(timeout=5)(act)
    retrier.action(timeout=5)(act)  # the same registration again: fine
    with pytest.raises(DuplicateRegistration, match="another timeout"):
        retrier.action(timeout=6)(act)


# -- the workpool ---------------------------------------------------------------------------


def test_a_pool_item_past_its_limit_frees_its_slot_and_is_retried(
    make_retrier: MakeRetrier,
) -> None:
    from workpool import RetryBehavior, Workpool

    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    pool = Workpool(retrier, "slow", max_parallelism=1, default_timeout=LIMIT)
    calls = Calls()

    @retrier.action
    async def hangs_once(n: int) -> int:
        calls.add(n)
        if calls.count(n) == 1:
            await anyio.sleep(3600)
        return n

    first = pool.enqueue(hangs_once, {"n": 1}, retry=RetryBehavior(max_attempts=2))
    second = pool.enqueue(hangs_once, {"n": 2}, retry=False)
    drain(retrier)
    # The only slot went to the first item; its attempt timed out and freed the slot
    # for the second, whose one attempt timed out too.
    error = "AttemptTimeout: attempt exceeded 200 ms"
    assert pool.status(first).previous_attempts == 1  # type: ignore[union-attr]
    assert retrier.status(second) == Completed(Failed(error))
    clock.advance(timedelta(seconds=1))
    drain(retrier)
    assert pool.wait(first, timeout=10) == Completed(Success(1))


def test_pool_limits_follow_item_then_action_then_pool(make_retrier: MakeRetrier) -> None:
    from workpool import Workpool

    retrier = make_retrier()
    pool = Workpool(retrier, "limits", default_timeout=timedelta(minutes=1))

    @retrier.action(timeout=5)
    def own_limit() -> None: ...

    @retrier.action
    def no_limit() -> None: ...

    ids = [
        pool.enqueue(own_limit),
        pool.enqueue(no_limit),
        pool.enqueue(own_limit, timeout=2.5),
        *pool.enqueue_batch([(no_limit, {}, {"timeout": 7}), (no_limit, {})]),
    ]
    stored = [retrier.store.get(i).timeout_ms for i in ids]
    assert stored == [5000, 60_000, 2500, 7000, 60_000]


@pytest.mark.parametrize("limit", [0, -2, True, "1", float("nan"), 10**12], ids=repr)
def test_bad_pool_limits_are_refused(retrier: Retrier, limit: Any) -> None:
    from workpool import InvalidBatchItem, Workpool

    @retrier.action
    def act() -> None: ...

    with pytest.raises(InvalidSettings, match="default_timeout"):
        Workpool(retrier, "bad", default_timeout=limit)
    pool = Workpool(retrier, "good")
    with pytest.raises(InvalidSettings, match="timeout"):
        pool.enqueue(act, timeout=limit)
    with pytest.raises(InvalidBatchItem, match="timeout"):
        pool.enqueue_batch([(act, {}), (act, {}, {"timeout": limit})])
    assert count_runs(retrier) == 0


# -- workflows ------------------------------------------------------------------------------


class Flows:
    """A retrier on a FakeClock, a pool whose steps run one attempt, and a manager."""

    def __init__(self, make_retrier: MakeRetrier, **pool_options: Any) -> None:
        from workflow import WorkflowManager
        from workpool import Workpool

        self.clock = FakeClock()
        self.retrier = make_retrier(clock=self.clock)
        self.pool = Workpool(self.retrier, "steps", **pool_options)
        self.workflows = WorkflowManager(self.pool)
        self.ended = Calls()

        @self.retrier.on_complete
        def ended(run_id: str, result: Any, context: Any) -> None:
            self.ended.add(result)

        self.on_complete = ended

    def later(self, delta: timedelta | float) -> None:
        self.clock.advance(delta)
        drain(self.retrier)

    def pending_runs(self, fn_prefix: str) -> int:
        with self.retrier.engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT count(*) FROM tiers_runs WHERE state = 'pending' AND fn LIKE :p"),
                    {"p": fn_prefix + "%"},
                ).scalar_one()
            )


DEADLINE_ERROR = "DeadlineExceeded: the workflow ran past its deadline (1 min after its start"


def test_a_step_past_its_limit_fails_and_is_retried(make_retrier: MakeRetrier) -> None:
    from workflow import StepFailed, WorkflowContext
    from workpool import RetryBehavior

    f = Flows(make_retrier, default_timeout=LIMIT)
    calls = Calls()

    @f.retrier.action
    async def hangs_once(n: int) -> int:
        calls.add(n)
        if calls.count(n) == 1:
            await anyio.sleep(3600)
        return n

    @f.workflows.define
    async def flow(ctx: WorkflowContext) -> str:
        retried = await ctx.step("retried", hangs_once, {"n": 1},
                                 retry=RetryBehavior(max_attempts=2, initial_backoff_ms=100))
        try:
            await ctx.step("once", hangs_once, {"n": 2}, retry=False, timeout=0.1)
        except StepFailed as exc:
            return f"{retried}: {exc}"
        return "no timeout"

    wf_id = f.workflows.start(flow)
    drain(f.retrier)
    f.later(1)  # the first step's retry, after its backoff
    f.later(1)
    status = f.workflows.status(wf_id)
    assert status == Completed(
        Success("1: step 'once[0]' failed: AttemptTimeout: attempt exceeded 100 ms")
    ), status


def test_a_sleeping_workflow_fails_at_its_deadline(make_retrier: MakeRetrier) -> None:
    from workflow import WorkflowContext

    f = Flows(make_retrier)
    steps = Calls()

    @f.retrier.action
    def step() -> None:
        steps.add(1)

    @f.workflows.define
    async def naps(ctx: WorkflowContext) -> None:
        await ctx.step("before", step)
        await ctx.sleep("nap", timedelta(hours=1))
        await ctx.step("after", step)

    wf_id = f.workflows.start(naps, timeout=60, on_complete=f.on_complete)
    drain(f.retrier)
    f.later(59)
    assert f.workflows.status(wf_id) == InProgress()
    f.later(1)
    status = f.workflows.status(wf_id)
    assert isinstance(status, Completed) and isinstance(status.result, Failed)
    assert status.result.error.startswith(DEADLINE_ERROR), status.result.error
    assert f.ended.items == [status.result]
    f.later(timedelta(hours=2))  # the sleep's driver finds it over
    assert steps.items == [1]
    assert f.pending_runs("tiers.workflow") == 0


def test_a_workflow_waiting_for_an_event_fails_at_its_deadline(
    make_retrier: MakeRetrier,
) -> None:
    from workflow import WorkflowContext

    f = Flows(make_retrier)

    @f.workflows.define
    async def waits(ctx: WorkflowContext) -> Any:
        return await ctx.wait_for_event("paid", "payment/completed")

    @f.workflows.define
    async def parent(ctx: WorkflowContext) -> Any:
        return await ctx.invoke("child", waits, {})

    wf_id = f.workflows.start(parent, timeout=timedelta(minutes=1), on_complete=f.on_complete)
    drain(f.retrier)
    (child,) = [w.id for w in f.workflows.list(name="waits")]
    f.later(61)
    status = f.workflows.status(wf_id)
    assert isinstance(status, Completed) and isinstance(status.result, Failed)
    assert status.result.error.startswith(DEADLINE_ERROR)
    assert f.workflows.wait(wf_id, timeout=10) == status
    assert f.workflows.status(child) == Completed(Canceled()), "its child is canceled"
    assert f.ended.items == [status.result]


def test_a_workflow_that_ends_in_time_leaves_no_deadline_behind(
    make_retrier: MakeRetrier,
) -> None:
    from workflow import WorkflowContext

    f = Flows(make_retrier)

    @f.workflows.define
    async def quick(ctx: WorkflowContext) -> int:
        await ctx.sleep("nap", 10)
        return 7

    wf_id = f.workflows.start(quick, timeout=60)
    (info,) = f.workflows.list()
    assert info.deadline is not None
    assert info.deadline == f.clock.now() + timedelta(seconds=60)
    drain(f.retrier)
    assert f.pending_runs("tiers.workflow.deadline") == 1
    f.later(10)
    assert f.workflows.status(wf_id) == Completed(Success(7))
    assert f.pending_runs("tiers.workflow.deadline") == 0
    f.later(3600)
    assert f.workflows.status(wf_id) == Completed(Success(7))
    f.workflows.cleanup(wf_id)
    with f.retrier.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM tiers_runs")).scalar_one() == 0


def test_a_retrigger_gets_the_same_timeout_from_its_own_start(
    make_retrier: MakeRetrier,
) -> None:
    from workflow import WorkflowContext

    f = Flows(make_retrier)

    @f.workflows.define
    async def naps(ctx: WorkflowContext) -> None:
        await ctx.sleep("nap", timedelta(hours=1))

    first = f.workflows.start(naps, timeout=60)
    f.later(61)
    again = f.workflows.retrigger(first)
    f.later(59)
    assert f.workflows.status(again) == InProgress()
    f.later(1)
    status = f.workflows.status(again)
    assert isinstance(status, Completed) and isinstance(status.result, Failed)
    assert status.result.error.startswith(DEADLINE_ERROR)


def test_a_deadline_cancels_the_step_running_when_it_passes(make_retrier: MakeRetrier) -> None:
    from workflow import WorkflowContext, WorkflowManager
    from workpool import Workpool

    retrier = make_retrier()  # real time: the step runs inline in the driver meanwhile
    workflows = WorkflowManager(Workpool(retrier, "steps"))
    cancelled = threading.Event()
    started = threading.Event()

    @retrier.action
    async def hangs() -> None:
        started.set()
        try:
            await anyio.sleep(3600)
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise

    @workflows.define
    async def stuck(ctx: WorkflowContext) -> None:
        await ctx.step("hangs", hangs)

    with retrier:
        wf_id = workflows.start(stuck, timeout=1)  # room for the step to start first
        assert started.wait(10)
        status = workflows.wait(wf_id, timeout=10)
        assert cancelled.wait(10)
    assert isinstance(status.result, Failed)
    assert status.result.error.startswith(
        "DeadlineExceeded: the workflow ran past its deadline (1 s after its start"
    )
    (step,) = workflows.steps(wf_id)
    assert step.state == "canceled"


@pytest.mark.parametrize("limit", [0, -60, True, "60", float("nan"), 10**12], ids=repr)
def test_bad_deadlines_and_step_limits_are_refused(
    make_retrier: MakeRetrier, limit: Any
) -> None:
    from workflow import WorkflowContext

    f = Flows(make_retrier)

    @f.retrier.action
    def act() -> None: ...

    @f.workflows.define
    async def flow(ctx: WorkflowContext, limit: Any = None) -> None:
        await ctx.step("act", act, timeout=limit)

    with pytest.raises(InvalidSettings, match="timeout"):
        f.workflows.start(flow, timeout=limit)
    assert f.workflows.list() == []
    assert count_runs(f.retrier) == 0
    wf_id = f.workflows.start(flow, {"limit": limit if not isinstance(limit, float) else None})
    drain(f.retrier)
    status = f.workflows.status(wf_id)
    if isinstance(limit, float):
        return
    assert isinstance(status, Completed) and isinstance(status.result, Failed)
    assert "InvalidSettings" in status.result.error and "timeout" in status.result.error


def test_a_driver_that_runs_after_the_deadline_runs_no_step(make_retrier: MakeRetrier) -> None:
    from workflow import WorkflowContext

    f = Flows(make_retrier)
    steps = Calls()

    @f.retrier.action
    def step() -> None:
        steps.add(1)

    @f.workflows.define
    async def late(ctx: WorkflowContext) -> None:
        await ctx.step("step", step)

    wf_id = f.workflows.start(late, timeout=60)
    f.later(120)  # no worker until after the deadline: its first driver comes too late
    status = f.workflows.status(wf_id)
    assert isinstance(status, Completed) and isinstance(status.result, Failed)
    assert status.result.error.startswith(DEADLINE_ERROR)
    assert steps.items == []


# -- the docs ---------------------------------------------------------------------------------


def test_the_docs_example_runs_as_written(tmp_path: Any) -> None:
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "retrier.md").read_text()
    section = doc.split("## Timeouts", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    done = subprocess.run(
        [sys.executable, "-c", code.group(1)],
        cwd=tmp_path,
        env={**os.environ, "TIERS_LOG_LEVEL": "ERROR", "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "Failed(error='AttemptTimeout: attempt exceeded 500 ms', kind='failed')",
        "Success(value=1.0, kind='success')",
    ]


def test_a_canceled_workflow_leaves_no_deadline_behind(make_retrier: MakeRetrier) -> None:
    from workflow import WorkflowContext

    f = Flows(make_retrier)

    @f.workflows.define
    async def naps(ctx: WorkflowContext) -> None:
        await ctx.sleep("nap", timedelta(hours=1))

    wf_id = f.workflows.start(naps, timeout=60, on_complete=f.on_complete)
    drain(f.retrier)
    f.workflows.cancel(wf_id)
    assert f.pending_runs("tiers.workflow.deadline") == 0
    f.later(120)
    assert f.workflows.status(wf_id) == Completed(Canceled())
    assert f.ended.items == [Canceled()]


def test_a_deadline_run_that_comes_early_is_handed_back(make_retrier: MakeRetrier) -> None:
    from retrier import HandBack
    from workflow import WorkflowContext

    f = Flows(make_retrier)

    @f.workflows.define
    async def naps(ctx: WorkflowContext) -> None:
        await ctx.sleep("nap", timedelta(hours=1))

    wf_id = f.workflows.start(naps, timeout=60)
    drain(f.retrier)
    f.clock.advance(30)  # a worker whose clock is 30 s behind the starter's
    driver = f.workflows._driver
    with pytest.raises(HandBack) as caught:
        anyio.run(driver.deadline, wf_id)
    assert caught.value.seconds == 30
    assert f.workflows.status(wf_id) == InProgress()


def test_runs_show_tells_the_limit(retrier: Retrier, db_url: str) -> None:
    from click.testing import CliRunner

    from retrier._cli import main

    @retrier.action
    def act() -> None: ...

    limited = retrier.run(act, timeout=90)
    free = retrier.run(act)
    shown = CliRunner().invoke(main, ["--db", db_url, "runs", "show", limited])
    assert shown.exit_code == 0 and "90 s an attempt" in shown.output
    shown = CliRunner().invoke(main, ["--db", db_url, "runs", "show", free])
    assert shown.exit_code == 0 and "an attempt" not in shown.output


def test_a_child_past_its_deadline_fails_its_invoke(make_retrier: MakeRetrier) -> None:
    from workflow import StepFailed, WorkflowContext

    f = Flows(make_retrier)

    @f.workflows.define
    async def naps(ctx: WorkflowContext) -> None:
        await ctx.sleep("nap", timedelta(hours=1))

    @f.workflows.define
    async def parent(ctx: WorkflowContext) -> str:
        try:
            await ctx.invoke("child", naps, {}, timeout=60)
        except StepFailed as exc:
            return str(exc)
        return "in time"

    wf_id = f.workflows.start(parent)
    drain(f.retrier)
    f.later(60)
    status = f.workflows.status(wf_id)
    assert isinstance(status, Completed) and isinstance(status.result, Success)
    assert status.result.value.startswith(f"step 'child[0]' failed: {DEADLINE_ERROR}")


# -- cron schedules -------------------------------------------------------------------------


def test_scheduled_runs_keep_their_limit(make_retrier: MakeRetrier) -> None:
    from retrier.testing import run_for
    from workpool import Workpool

    retrier = make_retrier(clock=FakeClock())
    pool = Workpool(retrier, "ticks", default_timeout=9)

    @retrier.action(timeout=5)
    def registered() -> None: ...

    @retrier.action
    def plain() -> None: ...

    retrier.schedule("by-registration", registered, cron="* * * * *")
    retrier.schedule("by-schedule", plain, cron="* * * * *", timeout=2)
    pool.schedule("by-pool", plain, cron="* * * * *")
    pool.schedule("by-item", plain, cron="* * * * *", timeout=timedelta(seconds=3))
    run_for(retrier, timedelta(minutes=1, seconds=1))
    with retrier.engine.connect() as conn:
        rows = conn.execute(text("SELECT fn, queue, timeout_ms FROM tiers_runs")).all()
    assert sorted((r.queue, r.fn, r.timeout_ms) for r in rows) == [
        ("", "plain", 2000),
        ("", "registered", 5000),
        ("ticks", "plain", 3000),
        ("ticks", "plain", 9000),
    ]
    with pytest.raises(InvalidSettings, match="timeout"):
        retrier.schedule("bad", plain, cron="* * * * *", timeout=0)
    with pytest.raises(InvalidSettings, match="timeout"):
        pool.schedule("bad", plain, cron="* * * * *", timeout=-1)
    assert {s.name for s in retrier.schedules()} == {
        "by-registration", "by-schedule", "by-pool", "by-item"
    }


def test_scheduled_workflows_get_their_deadline(make_retrier: MakeRetrier) -> None:
    from retrier.testing import run_for
    from workflow import WorkflowContext

    f = Flows(make_retrier)

    @f.workflows.define
    async def naps(ctx: WorkflowContext) -> None:
        await ctx.sleep("nap", timedelta(hours=1))

    with pytest.raises(InvalidSettings, match="timeout"):
        f.workflows.schedule("bad", naps, cron="* * * * *", timeout=True)
    f.workflows.schedule("every-minute", naps, cron="* * * * *", timeout=90)
    run_for(f.retrier, timedelta(minutes=1, seconds=1))
    (first,) = f.workflows.list()
    assert first.deadline == first.created + timedelta(seconds=90)
    run_for(f.retrier, timedelta(seconds=90))
    status = f.workflows.status(first.id)
    assert isinstance(status, Completed) and isinstance(status.result, Failed)
    assert "past its deadline (90 s after its start" in status.result.error


def test_a_restart_gets_a_fresh_deadline_of_the_same_length(make_retrier: MakeRetrier) -> None:
    from workflow import WorkflowContext

    f = Flows(make_retrier)

    @f.workflows.define
    async def naps(ctx: WorkflowContext) -> None:
        await ctx.sleep("nap", timedelta(hours=1))

    wf_id = f.workflows.start(naps, timeout=60)
    drain(f.retrier)
    f.later(61)
    assert isinstance(f.workflows.status(wf_id), Completed)
    f.workflows.restart(wf_id, "nap")
    drain(f.retrier)
    (info,) = f.workflows.list()
    assert info.deadline == f.clock.now() + timedelta(seconds=60)
    f.later(59)
    assert f.workflows.status(wf_id) == InProgress()
    f.later(1)
    status = f.workflows.status(wf_id)
    assert isinstance(status, Completed) and isinstance(status.result, Failed)
    # The error counts from the workflow's first start (121 s), which a restart keeps.
    assert status.result.error.startswith("DeadlineExceeded: the workflow ran past its deadline")
