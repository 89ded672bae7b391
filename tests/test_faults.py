"""Single faults that must never stop or lose other work, on SQLite and PostgreSQL.

Each test here reproduces a failure a fault campaign found: a far-future run, a row
that cannot be decoded, a database blip while recording, a forged notification,
cancel_all under load, many async waiters, two concurrent wake-ups of one workflow.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

import anyio
import pytest
from click.testing import CliRunner
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from retrier import Canceled, Completed, Failed, FakeClock, InProgress, Retrier, Success
from retrier._cli import main
from tests.support import Calls, drain
from workpool import Workpool

MakeRetrier = Callable[..., Retrier]


def set_column(retrier: Retrier, run_id: str, column: str, raw: str) -> None:
    """Overwrite one stored column with raw text, as a hand edit or a bug would."""
    with retrier.engine.begin() as conn:
        if retrier.store.dialect.name == "postgresql":
            conn.execute(text(f"UPDATE tiers_runs SET {column} = CAST(:v AS json) WHERE id = :i"),
                         {"v": raw, "i": run_id})
        else:
            conn.execute(text(f"UPDATE tiers_runs SET {column} = :v WHERE id = :i"),
                         {"v": raw, "i": run_id})


def corrupt_json(retrier: Retrier) -> str:
    """Text that the backend stores but that is not what the column must hold: invalid
    JSON on SQLite; on PostgreSQL (whose json type refuses invalid text) a JSON value
    of the wrong shape."""
    return "42" if retrier.store.dialect.name == "postgresql" else "{not json"


# -- 1. a far-future run -----------------------------------------------------------------


def test_a_far_future_row_neither_stops_the_worker_nor_strands_claimed_runs(
    make_retrier: MakeRetrier,
) -> None:
    retrier = make_retrier(lease=timedelta(seconds=30))

    @retrier.action
    def work(i: int) -> int:
        return i

    # Seconds taken for milliseconds, written by an older release or by hand: due in the
    # year 59066, past what datetime (and APScheduler) can represent.
    far = retrier.prepare(work, {"i": -1})
    retrier.submit([replace(far, due_ms=1_800_000_000_000_000)])
    with retrier:
        ids = [retrier.run(work, {"i": i}) for i in range(20)]
        retrier.wait_all(ids, timeout=10)
        later = retrier.run(work, {"i": 99})  # the worker still claims new work
        assert retrier.wait(later, timeout=10) == Completed(Success(99))
    for run_id in ids:
        assert [a.outcome for a in retrier.store.attempts(run_id)] == ["success"]
    assert retrier.store.get(far.id).state == "pending"


def test_a_timer_that_raises_loses_no_claimed_run(
    make_retrier: MakeRetrier, monkeypatch: pytest.MonkeyPatch
) -> None:
    from apscheduler.schedulers.base import BaseScheduler

    real_add_job = BaseScheduler.add_job

    def add_job(self: BaseScheduler, func: Any, trigger: Any = None, **kw: Any) -> Any:
        if trigger == "date":  # every one-off wake-up fails to be set
            raise ValueError("year 59066 is out of range")
        return real_add_job(self, func, trigger, **kw)

    monkeypatch.setattr(BaseScheduler, "add_job", add_job)
    retrier = make_retrier(lease=timedelta(seconds=30))

    @retrier.action
    def work(i: int) -> int:
        return i

    retrier.run_after(timedelta(hours=1), work, {"i": 0})  # gives every claim a wake-up
    with retrier:
        ids = [retrier.run(work, {"i": i}) for i in range(10)]
        retrier.wait_all(ids, timeout=10)


# -- 2. a row that cannot be decoded -------------------------------------------------------


@pytest.mark.parametrize("column", ["args", "context"])
def test_a_run_that_cannot_be_decoded_fails_alone(retrier: Retrier, column: str) -> None:
    if column == "context" and retrier.store.dialect.name == "postgresql":
        pytest.skip("any JSON value is a valid context; PostgreSQL stores only valid JSON")
    calls = Calls()

    @retrier.action
    def work(i: int) -> int:
        calls.add(i)
        return i

    @retrier.on_complete
    def done(run_id: str, result: Any, context: Any) -> None:
        calls.add((run_id, result, context))

    bad = retrier.run(work, {"i": -1}, on_complete=done, context={"n": 1})
    good = [retrier.run(work, {"i": i}, on_complete=done, context={"n": 1}) for i in range(5)]
    set_column(retrier, bad, column, corrupt_json(retrier))
    drain(retrier)
    for i, run_id in enumerate(good):
        assert retrier.status(run_id) == Completed(Success(i))
    status = retrier.status(bad)
    assert isinstance(status, Completed) and isinstance(status.result, Failed)
    assert f"stored {column}" in status.result.error and "cannot be decoded" in status.result.error
    assert -1 not in calls.items, "the action never runs with arguments it cannot read"
    delivered = [c for c in calls.items if isinstance(c, tuple) and c[0] == bad]
    assert len(delivered) == 1 and isinstance(delivered[0][1], Failed)
    assert [a.outcome for a in retrier.store.attempts(bad)] == ["failed"]


def test_a_result_that_cannot_be_decoded_reads_as_a_failure(retrier: Retrier, db_url: str) -> None:
    if retrier.store.dialect.name == "postgresql":
        pytest.skip("PostgreSQL's json type stores only valid JSON; any JSON is a result")

    @retrier.action
    def work() -> int:
        return 1

    run_id = retrier.run(work)
    drain(retrier)
    set_column(retrier, run_id, "result", "{truncated")
    status = retrier.status(run_id)
    assert isinstance(status, Completed) and isinstance(status.result, Failed)
    assert "stored result" in status.result.error
    cli = CliRunner()
    listed = cli.invoke(main, ["--db", db_url, "runs", "list"])
    assert listed.exit_code == 0 and run_id[:8] in listed.output, listed.output
    shown = cli.invoke(main, ["--db", db_url, "runs", "show", run_id])
    assert shown.exit_code == 0, shown.output
    assert "Traceback" not in shown.output and "corrupt" in shown.output


def test_a_corrupt_row_is_listed_and_shown_without_a_traceback(
    retrier: Retrier, db_url: str
) -> None:
    @retrier.action
    def work(i: int) -> int:
        return i

    bad = retrier.run_after(timedelta(hours=1), work, {"i": 1})
    set_column(retrier, bad, "args", corrupt_json(retrier))
    cli = CliRunner()
    for command in (["runs", "list"], ["runs", "show", bad]):
        shown = cli.invoke(main, ["--db", db_url, *command])
        assert shown.exit_code == 0, shown.output
        assert bad[:8] in shown.output and "Traceback" not in shown.output
    assert retrier.status(bad) is not None


# -- 4. notifications are hints -------------------------------------------------------------


def test_a_forged_cancel_notification_cancels_nothing(retrier: Retrier) -> None:
    started = threading.Event()
    release = threading.Event()

    @retrier.action
    def wait_for_release() -> str:
        started.set()
        release.wait(10)
        return "finished"

    with retrier:
        run_id = retrier.run(wait_for_release)
        assert started.wait(10)
        forge_cancel(retrier, run_id)
        time.sleep(0.3)  # the listener would have acted by now
        release.set()
        assert retrier.wait(run_id, timeout=10) == Completed(Success("finished"))


def test_a_real_cancel_still_reaches_a_running_action_in_another_process(
    make_retrier: MakeRetrier,
) -> None:
    worker_side = make_retrier(lease=timedelta(seconds=60))  # its heartbeat: every 20 s
    app_side = make_retrier()
    cancelled = threading.Event()
    started = threading.Event()

    @worker_side.action(name="forever")
    async def forever() -> None:
        started.set()
        try:
            await anyio.sleep(3600)
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise

    @app_side.action(name="forever")
    async def forever_app() -> None: ...

    with worker_side:
        run_id = app_side.run("forever")
        assert started.wait(10)
        app_side.cancel(run_id)  # another Retrier: only the database connects them
        assert cancelled.wait(3), "the notification, not a heartbeat, made it look"
        assert worker_side.wait(run_id, timeout=10) == Completed(Canceled())


def forge_cancel(retrier: Retrier, run_id: str) -> None:
    """A cancel notification for `run_id` from outside: PostgreSQL's NOTIFY, which any
    role that can connect may send; on SQLite a ping to every worker's socket."""
    if retrier.store.dialect.name == "postgresql":
        with retrier.engine.connect() as conn:
            conn.execute(text("SELECT pg_notify('tiers_cancel', :id)"), {"id": run_id})
            conn.commit()
    else:
        from retrier._pings import Pings

        Pings(str(retrier.engine.url.database)).send("cancel", run_id)


# -- 5. a database blip while recording -----------------------------------------------------


def test_an_outcome_whose_record_fails_for_a_moment_is_recorded_not_rerun(
    make_retrier: MakeRetrier, monkeypatch: pytest.MonkeyPatch
) -> None:
    retrier = make_retrier(lease=timedelta(seconds=60))
    calls = Calls()
    real_record = retrier.store.record
    failures = {"left": 3}

    def flaky_record(*args: Any, **kwargs: Any) -> Any:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OperationalError("COMMIT", {}, Exception("server closed the connection"))
        return real_record(*args, **kwargs)

    monkeypatch.setattr(retrier.store, "record", flaky_record)

    @retrier.action
    def work(i: int) -> int:
        calls.add(i)
        return i

    with retrier:
        started = time.monotonic()
        ids = [retrier.run(work, {"i": i}) for i in range(10)]
        retrier.wait_all(ids, timeout=20)
        took = time.monotonic() - started
    assert failures["left"] == 0
    assert sorted(calls.items) == list(range(10)), "each action ran exactly once"
    assert took < 10, f"recorded after {took:.1f} s: it waited for the lease"


def test_a_terminated_database_connection_does_not_rerun_finished_work(
    db_url: str, make_retrier: MakeRetrier
) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("terminates PostgreSQL backends")
    name = f"tiers-blip-{time.monotonic_ns()}"
    retrier = Retrier(f"{db_url}&application_name={name}", lease=timedelta(seconds=60))
    calls = Calls()
    release = threading.Event()
    running = threading.Semaphore(0)

    @retrier.action
    def work(i: int) -> int:
        calls.add(i)
        running.release()
        release.wait(10)
        return i

    try:
        with retrier:
            ids = [retrier.run(work, {"i": i}) for i in range(8)]
            for _ in range(8):
                assert running.acquire(timeout=10)
            with make_retrier().engine.connect() as conn:
                killed = conn.execute(
                    text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                         "WHERE application_name = :n"),
                    {"n": name},
                ).scalar()
                conn.commit()
            assert killed and killed > 0
            release.set()
            retrier.wait_all(ids, timeout=20)
        assert sorted(calls.items) == list(range(8)), "each action ran exactly once"
    finally:
        checked_out = retrier.store.checked_out()
        retrier.close()
        assert checked_out == 0


# -- 6. cancel_all under load ----------------------------------------------------------------


def test_cancel_all_while_items_run_frees_their_slots_at_once(make_retrier: MakeRetrier) -> None:
    retrier = make_retrier(lease=timedelta(seconds=60))
    pool = Workpool(retrier, "busy", max_parallelism=3)
    release = threading.Event()
    running = threading.Semaphore(0)

    @retrier.action
    def block(i: int) -> int:
        running.release()
        release.wait(10)
        return i

    @retrier.action
    def quick() -> str:
        return "ok"

    with retrier:
        ids = pool.enqueue_batch([(block, {"i": i}) for i in range(8)])
        for _ in range(3):
            assert running.acquire(timeout=10)
        finished_meanwhile = ids[:3]
        assert pool.cancel_all() == 8
        assert pool.cancel_all() == 0, "nothing is left to cancel"
        release.set()
        retrier.wait_all(ids, timeout=10)
        for work_id in ids:
            assert pool.wait(work_id, timeout=5) == Completed(Canceled())
        # The canceled items' slots are free again: new items start at once.
        started = time.monotonic()
        after = pool.enqueue_batch([(quick, {}) for _ in range(3)])
        retrier.wait_all(after, timeout=10)
        assert time.monotonic() - started < 5
    assert all(retrier.store.get(i).state == "completed" for i in finished_meanwhile)


def test_cancel_all_counts_only_what_it_canceled(make_retrier: MakeRetrier) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    pool = Workpool(retrier, "p", max_parallelism=2)

    @retrier.action
    def work(i: int) -> int:
        return i

    done = pool.enqueue_batch([(work, {"i": i}) for i in range(2)])
    drain(retrier)
    later = pool.enqueue_batch([(work, {"i": i}, {"run_after": 60}) for i in range(3)])
    assert all(pool.wait(i, timeout=5) == Completed(Success(n)) for n, i in enumerate(done))
    assert pool.cancel_all(limit=2) == 2
    assert pool.cancel_all() == 1
    assert [retrier.status(i) for i in later] == [Completed(Canceled())] * 3


# -- 7. many async waiters ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_many_async_waiters_do_not_starve_the_worker(retrier: Retrier) -> None:
    delivered = Calls()
    gate = anyio.Event()

    @retrier.action
    async def work(i: int) -> int:
        await gate.wait()
        return i

    @retrier.on_complete
    def done(run_id: str, result: Any, context: Any) -> None:  # runs in a worker thread
        delivered.add(run_id)

    results: dict[str, Any] = {}

    async def wait_one(run_id: str) -> None:
        results[run_id] = await retrier.wait_async(run_id, timeout=30)

    with anyio.fail_after(30):
        async with retrier:
            ids = [await retrier.run_async(work, {"i": i}, on_complete=done) for i in range(80)]
            async with anyio.create_task_group() as tg:
                for run_id in ids:
                    tg.start_soon(wait_one, run_id)
                await anyio.sleep(0.3)  # every waiter is waiting now
                gate.set()
    assert len(results) == 80 and len(delivered.items) == 80


# -- 8. a body that raises inside `async with retrier:` ---------------------------------------


@pytest.mark.anyio
async def test_an_error_in_the_async_with_body_comes_out_as_itself(retrier: Retrier) -> None:
    @retrier.action
    async def work() -> None: ...

    with pytest.raises(KeyError, match="from the body"):
        async with retrier:
            await retrier.run_async(work)
            raise KeyError("from the body")


def test_an_error_in_the_with_body_comes_out_as_itself(retrier: Retrier) -> None:
    with pytest.raises(KeyError, match="from the body"), retrier:
        raise KeyError("from the body")


# -- 3. a worker that lacks a function ----------------------------------------------------------


def test_a_worker_leaves_a_run_it_cannot_run_for_one_that_can(make_retrier: MakeRetrier) -> None:
    old_release = make_retrier()  # a worker of the previous release: it lacks "added"
    new_release = make_retrier()
    calls = Calls()
    for r in (old_release, new_release):

        @r.action(name="kept")
        def kept() -> str:
            return "kept"

    @new_release.action(name="added")
    def added() -> str:
        calls.add("added")
        return "added"

    run_id = new_release.run("added")
    other = new_release.run("kept")
    drain(old_release)
    assert old_release.status(other) == Completed(Success("kept"))
    row = old_release.store.get(run_id)
    assert (row.state, row.attempts, row.failures) == ("pending", 0, 0)
    drain(new_release)
    assert new_release.status(run_id) == Completed(Success("added"))
    assert calls.items == ["added"]


def test_a_run_no_live_worker_can_run_fails_after_the_grace(make_retrier: MakeRetrier) -> None:
    from retrier import UnregisteredFunction

    clock = FakeClock()
    old_release = make_retrier(clock=clock, unregistered_grace=timedelta(minutes=10))
    new_release = make_retrier(clock=clock)
    delivered = Calls()

    @old_release.action(name="kept")
    def kept() -> None: ...

    for r in (old_release, new_release):

        @r.on_complete(name="done")
        def done(run_id: str, result: Any, context: Any) -> None:
            delivered.add(result)

    @new_release.action(name="added")
    def added() -> None: ...

    run_id = new_release.run("added", on_complete="done")
    old_worker = old_release.worker()
    new_worker = new_release.worker()
    old_worker.announce()
    new_worker.announce()
    clock.advance(timedelta(minutes=11))
    old_worker.announce()
    new_worker.announce()  # a live worker knows it: it waits for that one
    assert old_worker.sweep_unrunnable() == 0
    clock.advance(timedelta(minutes=11))
    old_worker.announce()  # the new release's worker is gone now
    assert old_worker.sweep_unrunnable() == 1
    status = old_release.status(run_id)
    assert isinstance(status, Completed) and isinstance(status.result, Failed)
    assert UnregisteredFunction.__name__ in status.result.error and "added" in status.result.error
    drain(old_release)
    assert delivered.items == [status.result], "on_complete is called for it"
    old_worker.retire()
    new_worker.retire()


def test_an_on_complete_this_worker_lacks_is_left_for_one_that_has_it(
    make_retrier: MakeRetrier,
) -> None:
    old_release = make_retrier()
    new_release = make_retrier()
    delivered = Calls()
    for r in (old_release, new_release):

        @r.action(name="work")
        def work() -> int:
            return 7

    @new_release.on_complete(name="added_handler")
    def added_handler(run_id: str, result: Any, context: Any) -> None:
        delivered.add(result)

    run_id = new_release.run("work", on_complete="added_handler")
    drain(old_release)  # runs the action, but cannot deliver its on_complete
    row = old_release.store.get(run_id)
    assert (row.state, row.outcome, row.handler_failures) == ("finishing", "success", 0)
    assert delivered.items == []
    drain(new_release)
    assert delivered.items == [Success(7)]
    assert new_release.store.get(run_id).state == "completed"


def test_two_apps_in_one_postgresql_database_keep_apart(db_url: str) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("namespaces are PostgreSQL schemas; on SQLite, give each app its file")
    import uuid

    names = [f"app_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    apps = [Retrier(db_url, namespace=name) for name in names]
    ran = Calls()
    try:
        for app in apps:

            @app.action(name="same_name")
            def same_name(tag: str) -> str:
                ran.add(tag)
                return tag

        first = apps[0].run("same_name", {"tag": names[0]})
        drain(apps[1])
        assert apps[1].store.list_runs() == [], "the other app sees none of its runs"
        assert apps[0].store.get(first).state == "pending"
        drain(apps[0])
        assert apps[0].status(first) == Completed(Success(names[0]))
        assert ran.items == [names[0]]
        channels = {apps[0].store.dialect.wake_channel, apps[1].store.dialect.wake_channel}
        assert len(channels) == 2
    finally:
        for app in apps:
            app.close()
        with apps[0].engine.connect() as conn:
            for name in names:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
            conn.commit()
        for app in apps:
            app.close()


def test_a_namespace_on_sqlite_is_refused_with_advice(tmp_path: Any) -> None:
    from retrier import InvalidSettings

    with pytest.raises(InvalidSettings, match="file"):
        Retrier(f"sqlite:///{tmp_path / 'x.db'}", namespace="billing")


# -- 10. one pending driver per workflow ----------------------------------------------------


def test_two_concurrent_wake_ups_of_a_workflow_leave_one_pending_driver(
    make_retrier: MakeRetrier,
) -> None:
    from sqlalchemy import func, select

    from retrier._tables import runs
    from workflow import WorkflowContext, WorkflowManager

    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    workflows = WorkflowManager(Workpool(retrier, "wf", max_parallelism=2))

    @workflows.define
    async def sleeper(ctx: WorkflowContext) -> None:
        await ctx.sleep("nap", timedelta(hours=1))

    wf_id = workflows.start(sleeper, {})
    drain(retrier)  # the workflow now sleeps: one driver pending, due in an hour
    journal = workflows._journal
    first_woke, second_started = threading.Event(), threading.Event()

    def first() -> None:
        with retrier.store.dialect.write() as conn:
            journal.wake(conn, wf_id)
            first_woke.set()
            assert second_started.wait(10)
            _until_a_writer_waits(retrier)

    def second() -> None:
        assert first_woke.wait(10)
        second_started.set()
        with retrier.store.dialect.write() as conn:
            journal.wake(conn, wf_id)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    with retrier.engine.connect() as conn:
        due = list(
            conn.execute(
                select(runs.c.due_ms).where(
                    runs.c.owner == wf_id, runs.c.state == "pending", runs.c.fn.like("%drive%")
                )
            ).scalars()
        )
        assert conn.execute(select(func.count()).where(runs.c.owner == wf_id)).scalar()
    assert due == [clock.now_ms()], f"one pending driver, due now: {due}"


def _until_a_writer_waits(retrier: Retrier) -> None:
    """Return once another connection waits for a lock (PostgreSQL), or after a moment
    (SQLite, whose waiting writer sits in its busy handler, invisible); on PostgreSQL
    without such a wait, return after a while too: the test then checks the result."""
    deadline = time.monotonic() + (0.3 if retrier.store.dialect.name != "postgresql" else 2)
    while time.monotonic() < deadline:
        if retrier.store.dialect.name == "postgresql":
            with retrier.engine.connect() as conn:
                waiting = conn.execute(
                    text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
                ).scalar()
            if waiting:
                return
        time.sleep(0.01)


# -- 11. what a failure leaves behind, and the async twins ------------------------------------


def test_each_failed_attempt_keeps_its_traceback(
    make_retrier: Callable[..., Retrier], db_url: str
) -> None:
    # A fake clock: the second attempt's backoff must not run out during the drain,
    # however slow the machine (formatting the deep traceback takes a while).
    retrier = make_retrier(clock=FakeClock())

    @retrier.action
    def explode(depth: int) -> None:
        def inner(n: int) -> None:
            if n == 0:
                raise RuntimeError("boom at the bottom")
            inner(n - 1)

        inner(depth)

    small = retrier.run(explode, {"depth": 2}, max_failures=2)
    deep = retrier.run(explode, {"depth": 900}, max_failures=1)
    drain(retrier)
    attempts = retrier.store.attempts(small)
    assert [a.outcome for a in attempts] == ["failed"]  # the second is due after backoff
    tb = attempts[0].traceback or ""
    assert tb.startswith("Traceback") and "in inner" in tb and "boom at the bottom" in tb
    (deep_attempt,) = retrier.store.attempts(deep)
    assert deep_attempt.traceback is not None and len(deep_attempt.traceback) < 8_100
    assert deep_attempt.traceback.rstrip().endswith("RuntimeError: boom at the bottom")
    shown = CliRunner().invoke(main, ["--db", db_url, "runs", "show", small])
    assert shown.exit_code == 0 and "boom at the bottom" in shown.output
    assert "in inner" in shown.output


@pytest.mark.anyio
async def test_the_async_twins_the_docs_promise_exist(retrier: Retrier) -> None:
    from workflow import WorkflowContext, WorkflowManager

    pool = Workpool(retrier, "twins", max_parallelism=2)
    workflows = WorkflowManager(pool)

    @retrier.action
    async def work(i: int) -> int:
        return i

    @workflows.define
    async def one_step(ctx: WorkflowContext) -> int:
        return int(await ctx.step("s", work, {"i": 3}))

    async with retrier:
        ids = [await retrier.run_async(work, {"i": i}) for i in range(3)]
        await retrier.wait_all_async(ids, timeout=10)
        await pool.set_max_per_worker_async(1)
        assert pool.limits.max_per_worker == 1
        wf_id = await workflows.start_async(one_step, {})
        assert await workflows.wait_async(wf_id, timeout=10) == Completed(Success(3))
        steps = await workflows.steps_async(wf_id)
        assert [s.name for s in steps] == ["s[0]"]


def test_a_workflow_this_worker_lacks_waits_for_a_worker_that_has_it(
    make_retrier: MakeRetrier,
) -> None:
    from workflow import UnregisteredWorkflow, WorkflowContext, WorkflowManager

    clock = FakeClock()
    old_release = make_retrier(clock=clock, unregistered_grace=timedelta(minutes=10))
    new_release = make_retrier(clock=clock)
    WorkflowManager(Workpool(old_release, "flows", max_parallelism=2))  # lacks added_flow
    new_flows = WorkflowManager(Workpool(new_release, "flows", max_parallelism=2))

    @new_flows.define(name="added_flow")
    async def added_flow(ctx: WorkflowContext) -> str:
        return "done"

    first = new_flows.start(added_flow, {})
    drain(old_release)  # a worker of the old release takes the driver, and hands it back
    assert new_flows.status(first) == InProgress()
    clock.advance(timedelta(seconds=30))
    drain(new_release)
    assert new_flows.status(first) == Completed(Success("done"))
    # With no worker of the new release left, it fails only after the grace.
    second = new_flows.start(added_flow, {})
    drain(old_release)
    for _ in range(3):
        clock.advance(timedelta(minutes=3))
        drain(old_release)
        assert new_flows.status(second) == InProgress()
    clock.advance(timedelta(minutes=2))
    drain(old_release)
    status = new_flows.status(second)
    assert isinstance(status, Completed) and isinstance(status.result, Failed)
    assert UnregisteredWorkflow.__name__ in status.result.error


def test_a_driver_that_runs_before_a_sleep_ends_leaves_one_for_its_end(
    make_retrier: MakeRetrier,
) -> None:
    """Chaos found it: a retried driver, due before the sleep ends, took the wake-up's
    place; it ran, found the sleep not over, and left none for its end."""
    from workflow import WorkflowContext, WorkflowManager

    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    workflows = WorkflowManager(Workpool(retrier, "wf", max_parallelism=2))

    @workflows.define
    async def nap_then_wait(ctx: WorkflowContext) -> Any:
        await ctx.sleep("nap", timedelta(hours=1))
        return await ctx.wait_for_event("ask", "answer", timeout=timedelta(hours=1))

    def early_driver_then_an_hour() -> list[tuple[str, str]]:
        with retrier.store.dialect.write() as conn:
            workflows._journal.wake(conn, wf_id)  # an early driver, as a retry would be
        drain(retrier)
        clock.advance(timedelta(minutes=61))
        drain(retrier)
        return [(s.name, s.state) for s in workflows.steps(wf_id)]

    wf_id = workflows.start(nap_then_wait, {})
    drain(retrier)
    assert early_driver_then_an_hour() == [("nap[0]", "completed"), ("ask[0]", "waiting")]
    assert early_driver_then_an_hour() == [("nap[0]", "completed"), ("ask[0]", "completed")]
    assert workflows.status(wf_id) == Completed(Success(None))


def test_a_database_error_under_a_workflow_retries_its_driver_not_fails_it(
    make_retrier: MakeRetrier, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workflow import WorkflowContext, WorkflowManager

    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    workflows = WorkflowManager(Workpool(retrier, "wf", max_parallelism=2))
    journal = workflows._journal

    @retrier.action
    def step_fn(i: int) -> int:
        return i

    @workflows.define
    async def two_steps(ctx: WorkflowContext) -> int:
        try:
            a = await ctx.step("a", step_fn, {"i": 1})
            await ctx.sleep("nap", 0)
            b = await ctx.step("b", step_fn, {"i": 2})
        except Exception as exc:  # workflow code that catches broadly must not see it
            raise AssertionError(f"the workflow saw an engine error: {exc!r}") from exc
        return int(a + b)

    for method in ("start_step", "add_entry"):
        real = getattr(journal, method)
        fails = {"left": 1}

        def flaky(*args: Any, _real: Any = real, _fails: dict[str, int] = fails) -> Any:
            if _fails["left"]:
                _fails["left"] -= 1
                raise OperationalError("INSERT", {}, Exception("server closed the connection"))
            return _real(*args)

        monkeypatch.setattr(journal, method, flaky)
    wf_id = workflows.start(two_steps, {})
    for _ in range(5):
        drain(retrier)
        clock.advance(timedelta(seconds=1))
    assert workflows.status(wf_id) == Completed(Success(3))


def test_the_app_side_survives_its_connections_being_dropped(db_url: str) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("terminates PostgreSQL backends")
    name = f"tiers-app-{time.monotonic_ns()}"
    app = Retrier(f"{db_url}&application_name={name}")
    killer = Retrier(db_url)
    try:

        @app.action
        def work() -> None: ...

        first = app.run(work)
        app.status(first)  # the pool now holds connections
        held = [app.engine.connect() for _ in range(4)]  # several of them
        for conn in held:
            conn.close()
        with killer.engine.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE application_name = :n"),
                {"n": name},
            )
            conn.commit()
        second = app.run(work)  # each on a dead pooled connection first
        assert app.status(second) == InProgress()
        assert app.status(app.run(work)) == InProgress()  # the pool's others were dead too
        assert app.store.get(first).state == "pending"
    finally:
        app.close()
        killer.close()


def test_an_error_message_with_a_nul_character_is_stored(retrier: Retrier) -> None:
    @retrier.action
    def nul() -> None:
        raise ValueError("bad\x00byte")

    run_id = retrier.run(nul, max_failures=1)
    drain(retrier)
    status = retrier.status(run_id)
    assert status == Completed(Failed("ValueError: bad\\x00byte"))
    (attempt,) = retrier.store.attempts(run_id)
    assert attempt.traceback is not None and "bad\\x00byte" in attempt.traceback
