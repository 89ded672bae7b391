"""Tier 3 semantics from DESIGN.md, on SQLite and PostgreSQL.

Time is a FakeClock; `drain` runs everything due now in a worker without timers, and
`later` moves the clock and drains again, so sleeps, backoffs and timeouts take no
real time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import anyio
import pytest
from pydantic import BaseModel
from sqlalchemy import func, select, update

from retrier import (
    Canceled,
    Completed,
    Failed,
    FakeClock,
    InProgress,
    InvalidArguments,
    Retrier,
    RunNotFound,
    Success,
    TiersError,
    UnregisteredFunction,
    WaitTimeout,
)
from retrier._tables import runs
from tests.support import Calls, drain
from workflow import (
    InvalidEvent,
    InvalidWorkflow,
    StepFailed,
    UnregisteredWorkflow,
    WorkflowContext,
    WorkflowEvent,
    WorkflowManager,
    WorkflowNotFinished,
    WorkflowNotFound,
)
from workflow._models import steps_t, workflows_t
from workpool import RetryBehavior, Workpool

MakeRetrier = Callable[..., Retrier]


@dataclass
class App:
    clock: FakeClock
    retrier: Retrier
    pool: Workpool
    workflows: WorkflowManager

    def drain(self) -> None:
        drain(self.retrier)

    def later(self, delta: timedelta | float) -> None:
        self.clock.advance(delta)
        self.drain()

    def count_runs(self, **where: Any) -> int:
        stmt = select(func.count()).select_from(runs)
        for column, value in where.items():
            stmt = stmt.where(runs.c[column] == value)
        with self.retrier.engine.connect() as conn:
            return int(conn.execute(stmt).scalar() or 0)


@pytest.fixture
def app(make_retrier: MakeRetrier) -> App:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    pool = Workpool(
        retrier,
        "steps",
        max_parallelism=4,
        retry_actions_by_default=True,
        default_retry_behavior=RetryBehavior(max_attempts=3, initial_backoff_ms=100, base=2),
    )
    return App(clock, retrier, pool, WorkflowManager(pool))


# -- the seed scenarios ------------------------------------------------------------------


def test_process_order_third_step_failing_once_charges_and_emails_once(app: App) -> None:
    r, wf = app.retrier, app.workflows
    calls = Calls()
    shipped = Calls()

    @r.action
    def charge_card(order_id: str, amount: int) -> str:
        calls.add("charge")
        return f"ch_{order_id}"

    @r.action
    def reserve_stock(order_id: str) -> int:
        calls.add("reserve")
        return 3

    @r.action
    def ship(order_id: str) -> str:
        shipped.add(1)
        if len(shipped.items) == 1:
            raise RuntimeError("carrier API down")
        return "1Z999"

    @r.action
    def send_email(to: str, body: str) -> None:
        calls.add("email")

    @wf.define
    async def process_order(ctx: WorkflowContext, order_id: str, amount: int) -> dict[str, Any]:
        charge = await ctx.step(
            "charge-customer", charge_card, {"order_id": order_id, "amount": amount}
        )
        await ctx.step("reserve", reserve_stock, {"order_id": order_id})
        tracking = await ctx.step("ship", ship, {"order_id": order_id})
        await ctx.step("email", send_email, {"to": "c@x", "body": tracking})
        return {"charge": charge, "tracking": tracking}

    wf_id = wf.start(process_order, {"order_id": "o1", "amount": 100})
    app.drain()
    assert wf.status(wf_id) == InProgress(), "ship backs off 100 ms before its retry"
    app.later(0.1)
    assert wf.status(wf_id) == Completed(Success({"charge": "ch_o1", "tracking": "1Z999"}))
    assert Counter(calls.items) == {"charge": 1, "reserve": 1, "email": 1}
    assert len(shipped.items) == 2
    journal = {s.name: s for s in wf.steps(wf_id)}
    assert list(journal) == ["charge-customer[0]", "reserve[0]", "ship[0]", "email[0]"]
    assert journal["ship[0]"].attempts == 2
    assert all(s.state == "completed" for s in journal.values())


def test_a_100_item_loop_failing_at_item_50_resumes_at_50(app: App) -> None:
    r, wf = app.retrier, app.workflows
    calls = Calls()

    @r.action
    def process(i: int) -> int:
        calls.add(i)
        if i == 50 and calls.count(50) == 1:
            raise RuntimeError("item 50 failed")
        return i * i

    @wf.define
    async def loop(ctx: WorkflowContext, n: int) -> int:
        total = 0
        for i in range(n):
            total += await ctx.step("item", process, {"i": i})
        return total

    wf_id = wf.start(loop, {"n": 100})
    app.drain()
    assert calls.items == list(range(51))
    app.later(0.1)
    assert wf.status(wf_id) == Completed(Success(sum(i * i for i in range(100))))
    assert calls.items == [*range(51), *range(50, 100)], "resumed at 50; 0-49 not rerun"
    # One driver ran the first 50 steps inline; the step's retry woke one more.
    assert app.count_runs(fn=f"tiers.workflow.drive:{app.pool.name}") == 2


def test_duplicate_step_names_get_occurrence_counters(app: App) -> None:
    r, wf = app.retrier, app.workflows

    @r.action
    def fetch(page: int) -> list[int]:
        return [page] * page

    @wf.define
    async def crawl(ctx: WorkflowContext) -> list[list[int]]:
        return [await ctx.step("fetch", fetch, {"page": p}) for p in (1, 2, 3)]

    wf_id = wf.start(crawl)
    app.drain()
    assert wf.status(wf_id) == Completed(Success([[1], [2, 2], [3, 3, 3]]))
    assert [(s.name, s.result) for s in wf.steps(wf_id)] == [
        ("fetch[0]", [1]),
        ("fetch[1]", [2, 2]),
        ("fetch[2]", [3, 3, 3]),
    ]


def test_conditional_steps(app: App) -> None:
    r, wf = app.retrier, app.workflows
    calls = Calls()

    @r.action
    def review(amount: int) -> bool:
        calls.add(("review", amount))
        return amount < 10_000

    @r.action
    def pay(amount: int) -> str:
        calls.add(("pay", amount))
        return "paid"

    @wf.define
    async def payout(ctx: WorkflowContext, amount: int) -> str:
        if amount > 100 and not await ctx.step("review", review, {"amount": amount}):
            return "rejected"
        return str(await ctx.step("pay", pay, {"amount": amount}))

    small, big, huge = (wf.start(payout, {"amount": a}) for a in (50, 500, 50_000))
    app.drain()
    assert [wf.status(i) for i in (small, big, huge)] == [
        Completed(Success("paid")),
        Completed(Success("paid")),
        Completed(Success("rejected")),
    ]
    assert [s.name for s in wf.steps(small)] == ["pay[0]"]
    assert [s.name for s in wf.steps(big)] == ["review[0]", "pay[0]"]
    assert [s.name for s in wf.steps(huge)] == ["review[0]"]
    assert sorted(calls.items) == sorted(
        [("pay", 50), ("review", 500), ("pay", 500), ("review", 50_000)]
    )


def test_wait_for_event_approval_with_timeout_escalates(app: App) -> None:
    r, wf = app.retrier, app.workflows
    calls = Calls()

    @r.action
    def escalate(request_id: str) -> None:
        calls.add(("escalate", request_id))

    @r.action
    def fulfil(request_id: str, approver: str) -> None:
        calls.add(("fulfil", request_id, approver))

    @wf.define
    async def approval(ctx: WorkflowContext, request_id: str) -> str:
        decision = await ctx.wait_for_event(
            "wait-approval", "approval/decided", match="request_id", timeout=timedelta(hours=24)
        )
        if decision is None:
            await ctx.step("escalate", escalate, {"request_id": request_id})
            return "escalated"
        await ctx.step("fulfil", fulfil, {"request_id": request_id, "approver": decision["by"]})
        return "approved"

    approved = wf.start(approval, {"request_id": "r1"})
    ignored = wf.start(approval, {"request_id": "r2"})
    app.drain()
    assert app.count_runs(state="running") == 0, "waiting holds no worker"
    app.clock.advance(timedelta(hours=1))
    wf.send_event("approval/decided", {"request_id": "r1", "by": "ann"})
    wf.send_event("approval/decided", {"request_id": "someone-else", "by": "bob"})
    app.drain()
    assert wf.status(approved) == Completed(Success("approved"))
    assert wf.status(ignored) == InProgress()
    app.later(timedelta(hours=23) - timedelta(milliseconds=1))
    assert wf.status(ignored) == InProgress(), "not a moment early"
    app.later(timedelta(milliseconds=1))
    assert wf.status(ignored) == Completed(Success("escalated"))
    assert calls.items == [("fulfil", "r1", "ann"), ("escalate", "r2")]


def test_an_event_sent_before_the_wait_began_still_matches(app: App) -> None:
    r, wf = app.retrier, app.workflows

    @r.action
    def prepare_invoice(order_id: str) -> str:
        return f"inv-{order_id}"

    @wf.define
    async def billing(ctx: WorkflowContext, order_id: str) -> Any:
        await ctx.sleep("let-things-happen", timedelta(minutes=5))
        await ctx.step("invoice", prepare_invoice, {"order_id": order_id})
        return await ctx.wait_for_event("paid", "payment/completed", match="order_id", timeout=60)

    wf.send_event("payment/completed", {"order_id": "o1", "n": 0})  # before the start
    app.clock.advance(0.01)
    wf_id = wf.start(billing, {"order_id": "o1"})
    other = wf.start(billing, {"order_id": "o2"})
    app.drain()
    app.clock.advance(0.01)
    wf.send_event("payment/completed", {"order_id": "o1", "n": 1})  # during the sleep
    app.later(timedelta(minutes=5))
    assert wf.status(wf_id) == Completed(Success({"order_id": "o1", "n": 1}))
    assert wf.status(other) == InProgress()
    app.later(60)
    assert wf.status(other) == Completed(Success(None))


def test_a_child_workflow_returns_its_result_or_its_failure(app: App) -> None:
    r, wf = app.retrier, app.workflows

    @r.action
    def pack(item: str) -> str:
        if item == "glass":
            raise RuntimeError("broke")
        return f"box({item})"

    @wf.define(name="fulfil")
    async def fulfil(ctx: WorkflowContext, item: str) -> str:
        return str(await ctx.step("pack", pack, {"item": item}, retry=False))

    @wf.define
    async def order(ctx: WorkflowContext, items: list[str]) -> list[str]:
        out = []
        for item in items:
            try:
                out.append(await ctx.invoke("fulfil", fulfil, {"item": item}))
            except StepFailed as exc:
                out.append(f"failed: {exc.error}")
        return out

    wf_id = wf.start(order, {"items": ["book", "glass"]})
    app.drain()
    status = wf.status(wf_id)
    assert isinstance(status, Completed) and isinstance(status.result, Success)
    assert status.result.value[0] == "box(book)"
    assert "StepFailed" in status.result.value[1] and "broke" in status.result.value[1]
    children = [s.child_id for s in wf.steps(wf_id)]
    assert wf.status(str(children[0])) == Completed(Success("box(book)"))
    assert len(wf.list(name="fulfil")) == 2


def test_parallel_fan_out_with_gather_stays_within_the_pool(app: App) -> None:
    r, wf = app.retrier, app.workflows
    running = Calls()
    peak = [0]

    @r.action
    async def square(x: int) -> int:
        running.add(1)
        peak[0] = max(peak[0], len(running.items))
        await anyio.sleep(0.01)
        running.items.pop()
        return x * x

    @wf.define
    async def fan_out(ctx: WorkflowContext, n: int) -> int:
        results = await asyncio.gather(*(ctx.step("square", square, {"x": i}) for i in range(n)))
        return sum(results)

    wf_id = wf.start(fan_out, {"n": 12})
    for _ in range(20):
        app.drain()
        if isinstance(wf.status(wf_id), Completed):
            break
    assert wf.status(wf_id) == Completed(Success(sum(i * i for i in range(12))))
    assert 1 < peak[0] <= app.pool.max_parallelism
    assert [s.name for s in wf.steps(wf_id)] == [f"square[{i}]" for i in range(12)]


def test_retrigger_starts_a_fresh_run_and_leaves_the_old_one(app: App) -> None:
    r, wf = app.retrier, app.workflows
    calls = Calls()

    @r.action
    def once(x: int) -> int:
        calls.add(x)
        if len(calls.items) == 1:
            raise RuntimeError("first time unlucky")
        return x

    @wf.define
    async def job(ctx: WorkflowContext, x: int) -> int:
        return int(await ctx.step("once", once, {"x": x}, retry=False))

    first = wf.start(job, {"x": 7})
    app.drain()
    assert isinstance(wf.status(first).result, Failed)  # type: ignore[union-attr]
    second = wf.retrigger(first)
    app.drain()
    assert second != first
    assert wf.status(second) == Completed(Success(7))
    assert isinstance(wf.status(first).result, Failed)  # type: ignore[union-attr]
    assert [s.state for s in wf.steps(first)] == ["failed"]


def test_idempotent_start_with_an_idempotency_key(app: App) -> None:
    r, wf = app.retrier, app.workflows

    @r.action
    def noop() -> None: ...

    @wf.define
    async def job(ctx: WorkflowContext, order_id: str) -> None:
        await ctx.step("noop", noop)

    a = wf.start(job, {"order_id": "o1"}, idempotency_key="order-o1")
    b = wf.start(job, {"order_id": "o1"}, idempotency_key="order-o1")
    c = wf.start(job, {"order_id": "o2"}, idempotency_key="order-o2")
    assert a == b != c
    assert len(wf.list()) == 2
    app.drain()
    assert wf.start(job, {"order_id": "o1"}, idempotency_key="order-o1") == a, "also once done"
    wf.cleanup(a)
    assert wf.start(job, {"order_id": "o1"}, idempotency_key="order-o1") != a, "key freed"


def test_divergence_is_a_clear_error_naming_the_step_and_workflow(app: App) -> None:
    r, wf = app.retrier, app.workflows
    flavor = {"v": 1}

    @r.action
    def a() -> int:
        return 1

    @r.action
    def b() -> int:
        return 2

    @wf.define
    async def changing(ctx: WorkflowContext) -> None:
        if flavor["v"] == 1:
            await ctx.step("first", a)
            await ctx.step("second", b)
        else:
            await ctx.step("second", b)  # the journal has it after "first"
            await ctx.step("first", a)
        await ctx.sleep("nap", 60)

    swapped = wf.start(changing)
    app.drain()
    flavor["v"] = 2
    app.later(60)
    status = wf.status(swapped)
    assert isinstance(status, Completed) and isinstance(status.result, Failed)
    assert "WorkflowDiverged" in status.result.error
    assert "'first[0]'" in status.result.error and swapped in status.result.error


def test_a_step_of_another_kind_diverges(app: App) -> None:
    r, wf = app.retrier, app.workflows
    flavor = {"v": 1}

    @r.action
    def a() -> int:
        return 1

    @wf.define
    async def changing(ctx: WorkflowContext) -> None:
        if flavor["v"] == 1:
            await ctx.step("x", a)
        else:
            try:
                await ctx.sleep("x", 1)
            except Exception:
                pass  # even caught, the divergence fails the workflow
        await ctx.sleep("nap", 60)

    wf_id = wf.start(changing)
    app.drain()
    flavor["v"] = 2
    app.later(60)
    status = wf.status(wf_id)
    assert isinstance(status, Completed) and isinstance(status.result, Failed)
    assert "diverged" in status.result.error and "'x[0]'" in status.result.error


def test_1000_sleeping_workflows_hold_only_rows(app: App) -> None:
    r, wf = app.retrier, app.workflows

    @wf.define
    async def sleeper(ctx: WorkflowContext, i: int) -> int:
        await ctx.sleep("nap", timedelta(days=1))
        return i

    ids = [wf.start(sleeper, {"i": i}) for i in range(1000)]
    worker = r.worker()
    anyio.run(worker.run_until_idle)
    assert worker._held == {}, "no lease held"
    r.forget_worker(worker)
    assert app.count_runs(state="running") == 0
    assert app.count_runs(state="pending") == 1000, "one due driver row each, nothing else"
    assert len(wf.list(state="running", limit=2000)) == 1000
    app.later(timedelta(days=1))
    assert len(wf.list(state="completed", limit=2000)) == 1000
    assert wf.status(ids[999]) == Completed(Success(999))


# -- failures, on_complete, listeners ------------------------------------------------------


def test_step_failed_can_be_caught_or_fails_the_workflow(app: App) -> None:
    r, wf = app.retrier, app.workflows
    seen = Calls()

    @r.action
    def flaky() -> None:
        raise RuntimeError("always")

    @r.action
    def refund() -> str:
        return "refunded"

    @r.on_complete
    def done(run_id: str, result: Any, context: Any) -> None:
        seen.add((run_id, result, context))

    @wf.define
    async def compensating(ctx: WorkflowContext) -> str:
        try:
            await ctx.step("flaky", flaky)
        except StepFailed as exc:
            assert exc.step == "flaky[0]" and "always" in exc.error
            return str(await ctx.step("refund", refund))
        return "unreachable"

    @wf.define
    async def careless(ctx: WorkflowContext) -> None:
        await ctx.step("flaky", flaky, retry=RetryBehavior(max_attempts=2, initial_backoff_ms=10))

    events: list[WorkflowEvent] = []
    wf.on("run:fail", events.append)
    wf.on("step:fail", events.append)
    wf.on("run:complete", events.append)
    a = wf.start(compensating, on_complete=done, context={"n": 1})
    b = wf.start(careless, on_complete=done, context={"n": 2})
    for _ in range(5):
        app.later(1)
    assert wf.wait(a, timeout=5) == Completed(Success("refunded"))
    status = wf.wait(b, timeout=5)
    assert isinstance(status.result, Failed)
    assert "StepFailed" in status.result.error and "always" in status.result.error
    assert sorted(seen.items, key=lambda s: s[2]["n"]) == [
        (a, Success("refunded"), {"n": 1}),
        (b, status.result, {"n": 2}),
    ]
    assert [s.attempts for s in wf.steps(b)] == [2]
    assert Counter(e.kind for e in events) == {"step:fail": 2, "run:complete": 1, "run:fail": 1}


class Receipt(BaseModel):
    order: str
    total: int


def test_on_complete_gets_a_typed_result_exactly_once(app: App) -> None:
    r, wf = app.retrier, app.workflows
    seen = Calls()

    @r.on_complete
    def done(run_id: str, result: Any, context: Any) -> None:
        seen.add(result)

    @wf.define
    async def checkout(ctx: WorkflowContext, order: str) -> Receipt:
        return Receipt(order=order, total=3)

    wf_id = wf.start(checkout, {"order": "o9"}, on_complete=done)
    app.drain()
    app.drain()
    assert seen.items == [Success(Receipt(order="o9", total=3))]
    assert wf.status(wf_id) == Completed(Success(Receipt(order="o9", total=3)))


def test_cancel_stops_a_workflow_and_its_pending_work(app: App) -> None:
    r, wf = app.retrier, app.workflows
    calls = Calls()
    seen = Calls()

    @r.action
    def step(i: int) -> int:
        calls.add(i)
        return i

    @r.on_complete
    def done(run_id: str, result: Any, context: Any) -> None:
        seen.add(result)

    @wf.define(name="job")
    async def job(ctx: WorkflowContext) -> None:
        await ctx.step("one", step, {"i": 1})
        await ctx.sleep("nap", 60)
        await ctx.step("two", step, {"i": 2})

    @wf.define
    async def parent(ctx: WorkflowContext) -> None:
        await ctx.invoke("child", job)

    wf_id = wf.start(parent, on_complete=done)
    app.drain()
    (child,) = [w.id for w in wf.list(name="job")]
    wf.cancel(wf_id)
    assert wf.status(wf_id) == Completed(Canceled())
    assert wf.status(child) == Completed(Canceled())
    app.later(60)
    assert calls.items == [1], "no further step starts"
    assert seen.items == [Canceled()]
    assert app.count_runs(state="pending") == 0
    wf.cancel(wf_id)  # finished: a no-op
    assert wf.wait(wf_id, timeout=5) == Completed(Canceled())


def test_cleanup_deletes_a_finished_workflow(app: App) -> None:
    r, wf = app.retrier, app.workflows

    @r.action
    def noop() -> None: ...

    @wf.define
    async def job(ctx: WorkflowContext) -> None:
        await ctx.step("noop", noop)
        await ctx.sleep("nap", 1)

    wf_id = wf.start(job)
    app.drain()
    with pytest.raises(WorkflowNotFinished):
        wf.cleanup(wf_id)
    app.later(1)
    wf.cleanup(wf_id)
    with pytest.raises(WorkflowNotFound):
        wf.status(wf_id)
    with r.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(steps_t)).scalar() == 0
    assert app.count_runs(owner=wf_id) == 0


def test_list_filters_by_state_and_name(app: App) -> None:
    wf = app.workflows

    @wf.define
    async def quick(ctx: WorkflowContext) -> int:
        return 1

    @wf.define(name="slow")
    async def slow(ctx: WorkflowContext) -> int:
        await ctx.sleep("nap", 10)
        return 2

    q, s = wf.start(quick), wf.start(slow)
    app.drain()
    assert [w.id for w in wf.list(state="completed")] == [q]
    assert [w.id for w in wf.list(state="running")] == [s]
    assert [w.id for w in wf.list(name="slow")] == [s]
    assert {w.id for w in wf.list()} == {q, s}


# -- bad input -------------------------------------------------------------------------


def test_bad_input_gets_a_clear_error_and_writes_nothing(app: App) -> None:
    r, wf = app.retrier, app.workflows

    async def not_defined(ctx: WorkflowContext) -> None: ...

    with pytest.raises(UnregisteredWorkflow, match="not_defined"):
        wf.start(not_defined)
    with pytest.raises(InvalidWorkflow, match="async def"):

        @wf.define
        def not_async(ctx: WorkflowContext) -> None: ...

    @wf.define
    async def typed(ctx: WorkflowContext, amount: int) -> None: ...

    with pytest.raises(InvalidArguments, match="amount"):
        wf.start(typed, {"amount": "lots"})
    with pytest.raises(InvalidArguments):
        wf.start(typed, {"amount": 1, "extra": 2})
    for bad in ({"x": object()}, {"x": float("nan")}, ["not", "a", "dict"]):
        with pytest.raises(InvalidEvent):
            wf.send_event("e", bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidEvent):
        wf.send_event("", {})
    for call in (wf.status, wf.cancel, wf.cleanup, wf.retrigger, wf.steps):
        with pytest.raises(WorkflowNotFound, match="nope"):
            call("nope")
    assert issubclass(WorkflowNotFound, RunNotFound) and issubclass(WorkflowNotFound, LookupError)
    with pytest.raises(UnregisteredFunction):
        wf.start(typed, {"amount": 1}, on_complete=lambda *a: None)
    with r.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(workflows_t)).scalar() == 0
    assert app.count_runs() == 0
    for exc in (UnregisteredWorkflow, InvalidWorkflow, InvalidEvent, StepFailed, WorkflowNotFound):
        assert issubclass(exc, TiersError)


def test_bad_step_input_fails_the_workflow_clearly(app: App) -> None:
    r, wf = app.retrier, app.workflows

    @r.action
    def charge(amount: int) -> None: ...

    def unregistered() -> None: ...

    @wf.define
    async def bad_args(ctx: WorkflowContext) -> None:
        await ctx.step("charge", charge, {"amount": "a lot"})

    @wf.define
    async def bad_fn(ctx: WorkflowContext) -> None:
        await ctx.step("mystery", unregistered)

    a, b = wf.start(bad_args), wf.start(bad_fn)
    app.drain()
    sa, sb = wf.status(a), wf.status(b)
    assert isinstance(sa, Completed) and isinstance(sa.result, Failed)
    assert "InvalidArguments" in sa.result.error and "amount" in sa.result.error
    assert isinstance(sb, Completed) and isinstance(sb.result, Failed)
    assert "UnregisteredFunction" in sb.result.error and "unregistered" in sb.result.error
    assert wf.steps(a) == [] and app.count_runs(queue=app.pool.name) == 0


# -- performance shape, async API, real workers ------------------------------------------


def test_sequential_steps_take_one_driver_run_and_one_transaction_each(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    r, wf = app.retrier, app.workflows
    from sqlalchemy import Engine, event

    from workflow._server_calls import ServerCalls

    # On PostgreSQL a step's start is one statement that commits alone (no commit
    # event): counted here.
    calls = [0]
    call = ServerCalls._call

    def counted(self: ServerCalls, *args: Any, **kwargs: Any) -> bool:
        calls[0] += 1
        return call(self, *args, **kwargs)

    monkeypatch.setattr(ServerCalls, "_call", counted)

    @r.action
    def noop(i: int) -> int:
        return i

    @wf.define
    async def long(ctx: WorkflowContext, n: int) -> int:
        for i in range(n):
            await ctx.step("s", noop, {"i": i})
        return n

    commits = [0]

    def count(_conn: Any) -> None:
        commits[0] += 1

    wf_id = wf.start(long, {"n": 200})
    event.listen(Engine, "commit", count)  # every engine: PostgreSQL has two
    try:
        app.drain()
    finally:
        event.remove(Engine, "commit", count)
    assert wf.status(wf_id) == Completed(Success(200))
    assert app.count_runs(fn=f"tiers.workflow.drive:{app.pool.name}") == 1
    # Each step's outcome commits with the next step's start (the last with the end),
    # plus a handful for claiming, loading and finishing; never O(n^2).
    assert 200 <= commits[0] + calls[0] <= 200 + 12, (commits[0], calls[0])
    # PostgreSQL starts every step, and ends the workflow, in server-side calls.
    assert calls[0] == (201 if r.store.dialect.name == "postgresql" else 0), calls[0]


def test_no_step_starts_after_one_whose_outcome_could_not_be_stored(app: App) -> None:
    """An inline step's outcome is stored with the next step's start. If it cannot be
    (here: its lease passed to another attempt meanwhile), the next step must not
    start on a result that was never stored; the step runs again and the workflow
    goes on from its stored result."""
    r, wf = app.retrier, app.workflows
    firsts, seconds = Calls(), Calls()

    @r.action
    def first(attempt_marker: str) -> int:
        firsts.add(attempt_marker)
        if len(firsts.items) == 1:
            with r.engine.begin() as conn:  # as if the lease was lost and taken over
                conn.execute(
                    update(runs)
                    .where(runs.c.fn == "first", runs.c.state == "running")
                    .values(fence=runs.c.fence + 1)
                )
        return len(firsts.items)

    @r.action
    def second(value: int) -> int:
        seconds.add(value)
        return value

    @wf.define
    async def chain(ctx: WorkflowContext) -> int:
        value = await ctx.step("first", first, {"attempt_marker": "x"})
        return int(await ctx.step("second", second, {"value": value}))

    wf_id = wf.start(chain, {})
    app.drain()
    assert seconds.items == [], "the second step started on an unstored result"
    assert [s.name for s in wf.steps(wf_id)] == ["first[0]"]
    app.clock.advance(timedelta(minutes=5))  # the lease expires: the step runs again
    assert r.store.reap() == 1
    app.later(timedelta(minutes=5))  # after its backoff
    assert wf.status(wf_id) == Completed(Success(2))
    assert firsts.items == ["x", "x"] and seconds.items == [2]


@pytest.mark.anyio
async def test_async_twins_with_an_in_process_worker(make_retrier: MakeRetrier) -> None:
    retrier = make_retrier()
    pool = Workpool(retrier, "async-steps", max_parallelism=2)
    wf = WorkflowManager(pool)

    @retrier.action
    async def hello(name: str) -> str:
        return f"hello {name}"

    @wf.define(name="greet")
    async def greet(ctx: WorkflowContext, name: str) -> str:
        return str(await ctx.step("hello", hello, {"name": name}))

    @wf.define
    async def waiter(ctx: WorkflowContext) -> Any:
        return await ctx.wait_for_event("go", "go", timeout=30)

    async with retrier:
        wf_id = await wf.start_async(greet, {"name": "ann"})
        assert await wf.wait_async(wf_id, timeout=10) == Completed(Success("hello ann"))
        assert await wf.status_async(wf_id) == Completed(Success("hello ann"))
        assert [w.id for w in await wf.list_async(name="greet")] == [wf_id]
        again = await wf.retrigger_async(wf_id)
        assert await wf.wait_async(again, timeout=10) == Completed(Success("hello ann"))
        w = await wf.start_async(waiter)
        await anyio.sleep(0.05)
        await wf.send_event_async("go", {"ok": True})
        assert await wf.wait_async(w, timeout=10) == Completed(Success({"ok": True}))
        await wf.cleanup_async(w)
        x = await wf.start_async(waiter)
        await wf.cancel_async(x)
        assert await wf.wait_async(x, timeout=10) == Completed(Canceled())


@pytest.mark.anyio
async def test_async_starts_on_one_loop_share_commits_and_keep_starts_rules(
    make_retrier: MakeRetrier,
) -> None:
    """`start_async` joins the calling loop's group commit (no thread per start):
    starts made at once commit together on SQLite, and each keeps `start`'s rules."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from retrier import Debounce

    retrier = make_retrier()
    wf = WorkflowManager(Workpool(retrier, "async-starts", max_parallelism=2))

    @wf.define(name="one")
    async def one(ctx: WorkflowContext, n: int) -> int:
        return n

    commits: list[str] = []

    def counted(conn: Any) -> None:
        commits.append(str(conn.engine.url))

    event.listen(Engine, "commit", counted)
    try:
        ids = await asyncio.gather(*(wf.start_async(one, {"n": i}) for i in range(30)))
    finally:
        event.remove(Engine, "commit", counted)
    assert len(set(ids)) == 30
    stored = wf.list(name="one", limit=100)
    assert sorted(w.id for w in stored) == sorted(ids)
    if retrier.engine.dialect.name == "sqlite":
        assert len(commits) <= 3, commits  # the first alone, the rest in a group or two

    with pytest.raises(InvalidArguments, match="n"):
        await wf.start_async(one, {"m": 1})
    assert len(wf.list(name="one", limit=100)) == 30  # nothing half-written

    twice = await asyncio.gather(
        *(wf.start_async(one, {"n": 7}, idempotency_key="same") for _ in range(3))
    )
    assert len(set(twice)) == 1
    collapsed = await asyncio.gather(
        *(
            wf.start_async(one, {"n": i}, debounce=Debounce("d", timedelta(seconds=60)))
            for i in range(3)
        )
    )
    assert len(set(collapsed)) == 1
    assert len(wf.list(name="one", limit=100)) == 32


def test_in_process_worker_runs_sleeps_on_time(make_retrier: MakeRetrier) -> None:
    retrier = make_retrier()
    pool = Workpool(retrier, "timed", max_parallelism=4)
    wf = WorkflowManager(pool)

    @wf.define
    async def napper(ctx: WorkflowContext) -> str:
        await ctx.sleep("nap", 0.2)
        return "rested"

    import time

    with retrier:
        t = time.monotonic()
        wf_id = wf.start(napper)
        assert wf.wait(wf_id, timeout=10) == Completed(Success("rested"))
        took = time.monotonic() - t
    assert 0.19 <= took < 1.5, took


def test_cli_lists_shows_and_sends_events(app: App, db_url: str) -> None:
    from click.testing import CliRunner

    from retrier._cli import main

    r, wf = app.retrier, app.workflows

    @r.action
    def greet(name: str) -> str:
        return f"hi {name}"

    @wf.define(name="cli_flow")
    async def cli_flow(ctx: WorkflowContext, name: str) -> Any:
        await ctx.step("greet", greet, {"name": name})
        return await ctx.wait_for_event("go", "cli/go", match="name")

    wf_id = wf.start(cli_flow, {"name": "ann"})
    app.drain()
    runner = CliRunner()
    listed = runner.invoke(main, ["--db", db_url, "workflows", "list", "--state", "running"])
    assert listed.exit_code == 0 and "cli_flow" in listed.output
    shown = runner.invoke(main, ["--db", db_url, "workflows", "show", wf_id])
    assert shown.exit_code == 0, shown.output
    assert "greet[0]" in shown.output and "hi ann" in shown.output and "go[0]" in shown.output
    sent = runner.invoke(
        main, ["--db", db_url, "workflows", "send-event", "cli/go", '{"name": "ann"}']
    )
    assert sent.exit_code == 0, sent.output
    app.later(timedelta(days=5 * 365))  # the CLI wrote with the real clock
    assert wf.status(wf_id) == Completed(Success({"name": "ann"}))
    missing = runner.invoke(main, ["--db", db_url, "workflows", "show", "nope"])
    assert missing.exit_code == 1 and "no workflow with id 'nope'" in missing.output
    bad = runner.invoke(main, ["--db", db_url, "workflows", "send-event", "x", "[1]"])
    assert bad.exit_code == 1 and "JSON object" in bad.output


def test_cancel_during_an_inline_step_leaves_nothing_held(make_retrier: MakeRetrier) -> None:
    # Real time and a real worker: the step runs inline in the driver when canceled.
    retrier = make_retrier()
    workflows = WorkflowManager(Workpool(retrier, "inline", max_parallelism=2))
    started = threading.Event()

    @retrier.action
    async def slow_step() -> None:
        started.set()
        await anyio.sleep(3600)

    @workflows.define
    async def long_job(ctx: WorkflowContext) -> None:
        await ctx.step("slow", slow_step)

    with retrier:
        wf_id = workflows.start(long_job)
        assert started.wait(10)
        workflows.cancel(wf_id)
        assert workflows.wait(wf_id, timeout=10) == Completed(Canceled())
        worker = retrier._workers[0]
        deadline = time.monotonic() + 10
        while worker._held and time.monotonic() < deadline:
            time.sleep(0.02)
        assert worker._held == {}, "the worker still holds a lease of the canceled workflow"
    with retrier.engine.connect() as conn:
        states = {row.state for row in conn.execute(select(runs.c.state))}
    assert states <= {"completed"}, states


def test_shutdown_during_an_inline_step_releases_it(make_retrier: MakeRetrier) -> None:
    retrier = make_retrier()
    workflows = WorkflowManager(Workpool(retrier, "inline", max_parallelism=2))
    started = threading.Event()
    finish = threading.Event()

    @retrier.action
    async def slow_step() -> str:
        started.set()
        await anyio.to_thread.run_sync(finish.wait, abandon_on_cancel=True)
        return "done"

    @workflows.define
    async def long_job(ctx: WorkflowContext) -> str:
        return str(await ctx.step("slow", slow_step))

    async def serve_until_stopped() -> None:
        worker = retrier.worker(shutdown_grace=timedelta(milliseconds=200))
        with anyio.fail_after(20):  # a worker that hangs here fails the test
            async with anyio.create_task_group() as tg:
                await tg.start(worker.serve)
                wf_id = await workflows.start_async(long_job)
                await anyio.to_thread.run_sync(started.wait, 10)
                worker.stop()
        retrier.forget_worker(worker)
        step_runs = [r for r in retrier.store.list_runs(owner=wf_id) if r.fn == "slow_step"]
        assert [(r.state, r.failures) for r in step_runs] == [("pending", 0)], (
            "released to run again, not failed or canceled"
        )
        finish.set()

    anyio.run(serve_until_stopped)
    with retrier:
        (wf,) = workflows.list()
        assert workflows.wait(wf.id, timeout=20) == Completed(Success("done"))


def test_wait_all_returns_each_outcome_in_order_and_times_out_on_one_still_going(
    app: App,
) -> None:
    r, wf = app.retrier, app.workflows
    handled = Calls()

    @r.action
    def echo(x: str) -> str:
        return x

    @r.action
    def broken() -> None:
        raise ValueError("always")

    @r.on_complete
    def done(run_id: str, result: Any, context: Any) -> None:
        handled.add(run_id)

    @wf.define
    async def echoing(ctx: WorkflowContext, x: str) -> str:
        return str(await ctx.step("echo", echo, {"x": x}))

    @wf.define
    async def failing(ctx: WorkflowContext) -> None:
        await ctx.step("broken", broken, retry=False)

    @wf.define
    async def sleepy(ctx: WorkflowContext) -> None:
        await ctx.sleep("nap", 3600)

    a = wf.start(echoing, {"x": "a"}, on_complete=done)
    b = wf.start(failing)
    c = wf.start(echoing, {"x": "c"})
    slow = wf.start(sleepy)
    app.drain()
    got = wf.wait_all([c, a, b, a], timeout=5)
    assert got[:2] == [Completed(Success("c")), Completed(Success("a"))] and got[3] == got[1]
    assert isinstance(got[2].result, Failed) and "always" in got[2].result.error
    assert a in handled.items  # its on_complete ran before the wait returned
    with pytest.raises(WaitTimeout):
        wf.wait_all([a, slow], timeout=0.2)
    with pytest.raises(WorkflowNotFound):
        wf.wait_all([a, "no-such-workflow"], timeout=5)
    assert anyio.run(wf.wait_all_async, [b, c]) == [got[2], got[0]]
