"""`explain` / `tiers runs why`: one test per reason a run (or workflow) is where it is,
on SQLite and PostgreSQL. Time is a FakeClock; runs are claimed by hand where a test
needs one held."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta

import pytest
from click.testing import CliRunner

from retrier import FakeClock, Retrier, RunNotFound, Why
from retrier import _explain as reasons
from retrier._cli import main as cli
from tests.support import drain
from workflow import WorkflowContext, WorkflowManager, WorkflowNotFound
from workflow import _explain as wf_reasons
from workpool import Workpool

MakeRetrier = Callable[..., Retrier]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def retrier(make_retrier: MakeRetrier, clock: FakeClock) -> Retrier:
    r = make_retrier(clock=clock)

    @r.action(name="job")
    def job(n: int = 0) -> int:
        return n

    @r.action(name="boom")
    def boom() -> None:
        raise RuntimeError("boom")

    return r


def live_worker(retrier: Retrier) -> str:
    """A worker registered in tiers_workers (alive for three leases), claiming nothing."""
    worker = retrier.worker()
    worker.announce()
    return worker.id


def claim_all(retrier: Retrier, worker: str = "w-hand") -> list[str]:
    claimed, _ = retrier.store.claim(worker, 100, 60_000)
    return [c.id for c in claimed]


def test_finished_failed_and_canceled(retrier: Retrier) -> None:
    ok = retrier.run("job", {"n": 1})
    bad = retrier.run("boom", max_failures=1)
    gone = retrier.run_after(60, "job")
    retrier.cancel(gone)
    drain(retrier)
    assert retrier.explain(ok).reason == reasons.FINISHED
    assert "succeeded" in retrier.explain(ok).message
    assert "failed" in retrier.explain(bad).message
    assert retrier.explain(gone).reason == reasons.CANCELED_


def test_a_running_run_is_held_by_its_worker_until_its_lease_ends(retrier: Retrier) -> None:
    run_id = retrier.run("job")
    assert claim_all(retrier, "w-7") == [run_id]
    why = retrier.explain(run_id)
    assert (why.reason, why.worker, why.state) == (reasons.HELD, "w-7", "running")
    assert why.until is not None and "w-7" in why.message


def test_no_live_worker(retrier: Retrier) -> None:
    run_id = retrier.run("job")
    why = retrier.explain(run_id)
    assert why.reason == reasons.NO_WORKERS and "tiers worker" in why.message


def test_no_live_worker_registers_its_function(
    retrier: Retrier, make_retrier: MakeRetrier, clock: FakeClock
) -> None:
    other = make_retrier(clock=clock)  # an older release: it has no "job"

    @other.action(name="other_job")
    def other_job() -> None: ...

    live_worker(other)
    run_id = retrier.run("job")
    why = retrier.explain(run_id)
    assert why.reason == reasons.NOT_REGISTERED and "'job'" in why.message
    live_worker(retrier)  # the new release's worker arrives
    assert retrier.explain(run_id).reason == reasons.CLAIMABLE


def test_due_later_by_run_after_and_by_backoff(retrier: Retrier, clock: FakeClock) -> None:
    live_worker(retrier)
    later = retrier.run_after(60, "job")
    why = retrier.explain(later)
    assert why.reason == reasons.DUE_LATER and "run_at" in why.message
    assert why.until is not None
    assert abs(why.until.timestamp() * 1000 - (clock.now_ms() + 60_000)) < 2
    failing = retrier.run("boom")
    drain(retrier)  # first attempt fails: a backoff follows
    why = retrier.explain(failing)
    assert why.reason == reasons.DUE_LATER and "backoff" in why.message


def test_pool_paused(retrier: Retrier) -> None:
    live_worker(retrier)
    pool = Workpool(retrier, "paused", max_parallelism=0)
    item = pool.enqueue("job")
    assert pool.explain(item).reason == reasons.PAUSED


def test_pool_full_says_how_many_run(retrier: Retrier) -> None:
    live_worker(retrier)
    pool = Workpool(retrier, "small", max_parallelism=2)
    first, second, third = (pool.enqueue("job", {"n": n}) for n in range(3))
    assert set(claim_all(retrier)) == {first, second}
    why = pool.explain(third)
    assert why.reason == reasons.POOL_FULL
    assert "2 of 2 running" in why.message and why.details["running"] == 2


def test_key_full(retrier: Retrier) -> None:
    live_worker(retrier)
    pool = Workpool(retrier, "keyed", max_parallelism=10, max_per_key=1)
    a = pool.enqueue("job", key="tenant-a")
    b = pool.enqueue("job", key="tenant-a")
    other = pool.enqueue("job", key="tenant-b")
    claimed = claim_all(retrier)
    assert a in claimed and other in claimed and b not in claimed
    why = pool.explain(b)
    assert why.reason == reasons.KEY_FULL and "tenant-a" in why.message


def test_rate_window(retrier: Retrier, clock: FakeClock) -> None:
    live_worker(retrier)
    pool = Workpool(retrier, "rated", max_parallelism=10, rate_limit=(1, 60))
    first = pool.enqueue("job")
    second = pool.enqueue("job")
    assert claim_all(retrier) == [first]
    why = pool.explain(second)
    assert why.reason == reasons.RATE_LIMITED and why.until is not None
    assert abs(why.until.timestamp() * 1000 - (clock.now_ms() + 60_000)) < 2


def test_claimable_says_how_many_are_ahead(retrier: Retrier, clock: FakeClock) -> None:
    live_worker(retrier)
    pool = Workpool(retrier, "open", max_parallelism=10)
    ids = []
    for n in range(3):
        ids.append(pool.enqueue("job", {"n": n}))
        clock.advance(timedelta(milliseconds=1))
    why = pool.explain(ids[2])
    assert why.reason == reasons.CLAIMABLE
    assert why.details["ahead"] == 2
    low = pool.enqueue("job")  # due last, at the same time as the next one
    high = pool.enqueue("job", priority=5)
    assert pool.explain(high).details["ahead"] == 0, "higher priority goes first"
    assert pool.explain(low).details["ahead"] == 4


def test_unknown_run(retrier: Retrier) -> None:
    with pytest.raises(RunNotFound):
        retrier.explain("nope")


def test_the_cli_answers_in_words_and_in_json(make_retrier: MakeRetrier, db_url: str) -> None:
    retrier = make_retrier()  # the CLI reads the real clock: so does this worker

    @retrier.action(name="job")
    def job() -> None: ...

    live_worker(retrier)
    pool = Workpool(retrier, "paused-cli", max_parallelism=0)
    item = pool.enqueue("job")
    out = CliRunner().invoke(cli, ["--db", db_url, "runs", "why", item])
    assert out.exit_code == 0, out.output
    assert "paused" in out.output
    out = CliRunner().invoke(cli, ["--db", db_url, "runs", "why", item, "--json"])
    answer = json.loads(out.output)
    assert answer["reason"] == reasons.PAUSED and answer["state"] == "pending"
    out = CliRunner().invoke(cli, ["--db", db_url, "runs", "why", "nope"])
    assert out.exit_code != 0


def test_a_workflow_says_what_it_waits_for(
    retrier: Retrier, clock: FakeClock, db_url: str
) -> None:
    pool = Workpool(retrier, "wf-pool", max_parallelism=1)
    workflows = WorkflowManager(pool)

    @workflows.define(name="napper")
    async def napper(ctx: WorkflowContext) -> str:
        await ctx.sleep("nap", 60)
        event = await ctx.wait_for_event("approval", "approved")
        return str(event)

    wf_id = workflows.start("napper")
    drain(retrier)
    why = workflows.explain(wf_id)
    assert why.reason == wf_reasons.SLEEPING and "'nap" in why.message
    assert why.until is not None
    clock.advance(timedelta(seconds=61))
    drain(retrier)
    why = workflows.explain(wf_id)
    assert why.reason == wf_reasons.WAITING_FOR_EVENT and "approved" in why.message
    out = CliRunner().invoke(cli, ["--db", db_url, "workflows", "why", wf_id, "--json"])
    assert json.loads(out.output)["reason"] == wf_reasons.WAITING_FOR_EVENT
    workflows.send_event("approved", {"ok": True})
    drain(retrier)
    assert workflows.explain(wf_id).reason == wf_reasons.FINISHED_
    with pytest.raises(WorkflowNotFound):
        workflows.explain("nope")


def test_a_workflow_whose_step_waits_for_room_says_so(retrier: Retrier) -> None:
    live_worker(retrier)
    pool = Workpool(retrier, "wf-full", max_parallelism=1)
    workflows = WorkflowManager(pool)

    @workflows.define(name="one-step")
    async def one_step(ctx: WorkflowContext) -> int:
        return int(await ctx.step("only", "job", {"n": 3}))

    blocker = pool.enqueue("job")
    assert claim_all(retrier, "w-block") == [blocker]  # the pool's one slot is taken
    wf_id = workflows.start("one-step")
    drain(retrier)  # the driver runs; its step cannot start inline, so it waits
    why = workflows.explain(wf_id)
    assert isinstance(why, Why) and why.run_id == wf_id
    assert why.reason == reasons.POOL_FULL and why.message.startswith("step 'only")
