"""The testing mode (`retrier.testing` and the `tiers` pytest plugin), on SQLite and
PostgreSQL: every helper, the fixtures as an app's test suite sees them (through
`pytester`), and the examples of docs/testing.md, run as written."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy.engine import make_url

from retrier import (
    Completed,
    Failed,
    FakeClock,
    InProgress,
    InvalidArguments,
    InvalidSettings,
    NonRetryableError,
    Retrier,
    RetryAfter,
    RunResult,
    Success,
    UnregisteredFunction,
)
from retrier.testing import (
    DrainLimitReached,
    EnqueuedRun,
    advance,
    advance_async,
    assert_enqueued,
    drain,
    drain_async,
    enqueued,
    fake_clock,
    perform,
    perform_async,
    refute_enqueued,
    run_for,
    run_for_async,
)
from tests.support import Calls
from workflow import WorkflowContext, WorkflowManager
from workpool import Workpool

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
MakeRetrier = Callable[..., Retrier]


def attempt_offsets(retrier: Retrier, run_id: str, start_ms: int) -> list[int]:
    return [a.started_ms - start_ms for a in retrier.store.attempts(run_id)]


# -- drain ----------------------------------------------------------------------------------


def test_drain_runs_what_is_due_with_its_follow_ups_and_on_complete(
    make_retrier: MakeRetrier,
) -> None:
    retrier = make_retrier(clock=FakeClock())
    done = Calls()

    @retrier.action
    def send_email(to: str) -> str:
        return f"sent to {to}"

    @retrier.action
    def sign_up(email: str) -> None:
        retrier.run(send_email, {"to": email}, on_complete=email_sent)  # a follow-up
        retrier.run_after(timedelta(hours=1), send_email, {"to": "later@b.c"})

    @retrier.on_complete
    def email_sent(run_id: str, result: RunResult, context: Any) -> None:
        done.add(result)

    signup = retrier.run(sign_up, {"email": "a@b.c"})
    drain(retrier)
    assert retrier.status(signup) == Completed(Success(None))
    assert done.items == [Success("sent to a@b.c")], "on_complete runs inside the drain"
    [later] = enqueued(retrier)  # the clock stood still: the delayed run waits
    assert later.args == {"to": "later@b.c"} and later.due_in == timedelta(hours=1)


def test_drain_takes_a_pool_or_a_workflow_manager_and_nothing_else(
    make_retrier: MakeRetrier,
) -> None:
    retrier = make_retrier(clock=FakeClock())
    pool = Workpool(retrier, "p", max_parallelism=1)
    workflows = WorkflowManager(pool)

    @retrier.action
    def noop() -> None: ...

    ids = [pool.enqueue(noop) for _ in range(3)]
    drain(pool)
    assert [pool.retrier.status(i) for i in ids] == [Completed(Success(None))] * 3
    drain(workflows)
    with pytest.raises(TypeError, match="expected a Retrier, a Workpool or a WorkflowManager"):
        drain(object())  # type: ignore[arg-type]


def test_drain_with_concurrency_one_runs_in_due_order(make_retrier: MakeRetrier) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    order = Calls()

    @retrier.action
    def record(n: int) -> None:
        order.add(n)

    for n in (3, 1, 2):
        retrier.run_at(clock.now() + timedelta(seconds=n), record, {"n": n})
    clock.advance(5)
    drain(retrier, concurrency=1)
    assert order.items == [1, 2, 3]
    with pytest.raises(InvalidSettings):
        drain(retrier, concurrency=0)


def test_drain_gives_up_on_work_that_never_ends(make_retrier: MakeRetrier) -> None:
    retrier = make_retrier(clock=FakeClock())

    @retrier.action
    def again() -> None:
        retrier.run(again)

    retrier.run(again)
    with pytest.raises(DrainLimitReached, match="stopped after 5 claims that found work"):
        drain(retrier, max_rounds=5)
    assert isinstance(DrainLimitReached("x"), AssertionError)


def test_the_blocking_helpers_point_async_code_at_their_twins(retrier: Retrier) -> None:
    import anyio

    @retrier.action
    async def hello() -> str:
        return "hi"

    async def inside_a_loop() -> None:
        with pytest.raises(RuntimeError, match="await drain_async"):
            drain(retrier)
        with pytest.raises(RuntimeError, match="await perform_async"):
            perform(retrier, hello)

    anyio.run(inside_a_loop)


@pytest.mark.anyio
async def test_async_twins(make_retrier: MakeRetrier) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)

    @retrier.action
    async def greet(name: str) -> str:
        return f"hello {name}"

    @retrier.action
    def shout(name: str) -> str:
        return name.upper()

    now_id = await retrier.run_async(greet, {"name": "ann"})
    later_id = await retrier.run_after_async(60, greet, {"name": "bob"})
    latest_id = await retrier.run_after_async(120, greet, {"name": "cy"})
    await drain_async(retrier)
    assert await retrier.status_async(now_id) == Completed(Success("hello ann"))
    await advance_async(retrier, 60)
    assert await retrier.status_async(later_id) == Completed(Success("hello bob"))
    await run_for_async(retrier, timedelta(minutes=1))
    assert await retrier.status_async(latest_id) == Completed(Success("hello cy"))
    assert await perform_async(retrier, greet, {"name": "dee"}) == "hello dee"
    assert await perform_async(retrier, shout, {"name": "dee"}) == "DEE"


# -- moving time ------------------------------------------------------------------------------


def test_run_for_walks_through_each_backoff_at_its_due_time(make_retrier: MakeRetrier) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)

    @retrier.action
    def always_fails() -> None:
        raise RuntimeError("down")

    start = clock.now_ms()
    run_id = retrier.run(always_fails)
    run_for(retrier, timedelta(seconds=2))
    assert attempt_offsets(retrier, run_id, start) == [0, 250, 750, 1750], "the seed table"
    assert clock.now_ms() - start == 2000, "the clock ends exactly delta later"
    status = retrier.status(run_id)
    assert isinstance(status, Completed) and isinstance(status.result, Failed)


def test_run_for_with_a_step_looks_only_every_step(make_retrier: MakeRetrier) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)

    @retrier.action
    def always_fails() -> None:
        raise RuntimeError("down")

    start = clock.now_ms()
    run_id = retrier.run(always_fails)
    run_for(retrier, timedelta(seconds=2), step=timedelta(seconds=1))
    # attempt 2 is due at 250 ms and starts at the 1 s look; attempt 3 is due 500 ms later
    assert attempt_offsets(retrier, run_id, start) == [0, 1000, 2000]
    with pytest.raises(ValueError, match="step must be longer than 0"):
        run_for(retrier, 1, step=0)
    with pytest.raises(InvalidSettings):
        run_for(retrier, -1)


def test_advance_jumps_and_runs_what_fell_due_at_the_end(make_retrier: MakeRetrier) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)

    @retrier.action
    def always_fails() -> None:
        raise RuntimeError("down")

    @retrier.action
    def remind(who: str) -> str:
        return f"reminded {who}"

    start = clock.now_ms()
    run_id = retrier.run(always_fails)
    reminder = retrier.run_after(timedelta(hours=1), remind, {"who": "ann"})
    drain(retrier)
    advance(retrier, timedelta(minutes=59))
    assert retrier.status(reminder) == InProgress()
    advance(retrier, timedelta(minutes=1))
    assert retrier.status(reminder) == Completed(Success("reminded ann"))
    # Each jump ran the retry that fell due during it once, at its end; the next waits.
    assert attempt_offsets(retrier, run_id, start) == [0, 3_540_000, 3_600_000]
    [retry] = assert_enqueued(retrier, always_fails)
    assert retry.attempts == 3 and retry.due_in == timedelta(seconds=1)
    with pytest.raises(InvalidSettings):
        advance(retrier, float("nan"))


def test_an_expired_lease_is_recovered_when_the_clock_passes_it(
    make_retrier: MakeRetrier,
) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock, lease=timedelta(seconds=30))
    calls = Calls()

    @retrier.action
    def work() -> str:
        calls.add(1)
        return "done"

    run_id = retrier.run(work)
    # A worker claims the run, then dies without a word.
    claimed_at = clock.now_ms()
    [claimed], _ = retrier.store.claim("dead-worker", 1, 30_000)
    assert claimed.id == run_id
    run_for(retrier, timedelta(seconds=29))
    assert calls.items == [] and retrier.status(run_id) == InProgress()
    run_for(retrier, timedelta(seconds=5))
    assert calls.items == [1] and retrier.status(run_id) == Completed(Success("done"))
    attempts = retrier.store.attempts(run_id)
    assert [a.outcome for a in attempts] == ["lost", "success"]
    # Recovered the moment the lease expired, then retried after the 250 ms backoff.
    assert attempts[1].started_ms - claimed_at == 30_001 + 250


def test_moving_time_needs_a_fake_clock(make_retrier: MakeRetrier) -> None:
    retrier = make_retrier()
    with pytest.raises(TypeError, match=r"Retrier\(url, clock=FakeClock\(\)\)"):
        advance(retrier, 1)
    with pytest.raises(TypeError, match="not a FakeClock"):
        fake_clock(retrier)
    clock = FakeClock()
    assert fake_clock(make_retrier(clock=clock)) is clock
    assert clock.now() == datetime.fromtimestamp(clock.now_ms() / 1000, tz=UTC)


def test_run_for_takes_a_workflow_through_its_sleep_and_event_timeout(
    make_retrier: MakeRetrier,
) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    pool = Workpool(retrier, "steps", max_parallelism=2)
    workflows = WorkflowManager(pool)
    sent = Calls()

    @retrier.action
    def send_email(to: str, subject: str) -> None:
        sent.add((to, subject, clock.now_ms() - start))

    @workflows.define
    async def onboard(ctx: WorkflowContext, user: str) -> str:
        await ctx.step("welcome", send_email, {"to": user, "subject": "welcome"})
        await ctx.sleep("a-day", timedelta(days=1))
        await ctx.step("tips", send_email, {"to": user, "subject": "tips"})
        answer = await ctx.wait_for_event(
            "survey", "survey/answered", match="user", timeout=timedelta(days=7)
        )
        return "answered" if answer else "no answer"

    start = clock.now_ms()
    answered = workflows.start(onboard, {"user": "ann"})
    silent = workflows.start(onboard, {"user": "bob"})
    run_for(workflows, timedelta(days=1))
    day = 86_400_000
    assert sorted(sent.items) == [
        ("ann", "tips", day), ("ann", "welcome", 0), ("bob", "tips", day), ("bob", "welcome", 0)
    ]
    workflows.send_event("survey/answered", {"user": "ann"})
    drain(workflows)
    assert workflows.status(answered) == Completed(Success("answered"))
    run_for(workflows, timedelta(days=7) - timedelta(milliseconds=1))
    assert workflows.status(silent) == InProgress()
    run_for(workflows, timedelta(milliseconds=1))
    assert workflows.status(silent) == Completed(Success("no answer"))


# -- what is enqueued -----------------------------------------------------------------------


class Address(BaseModel):
    city: str


def test_enqueued_lists_waiting_runs_in_start_order_with_filters(
    make_retrier: MakeRetrier,
) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    pool = Workpool(retrier, "mail", max_parallelism=1)

    @retrier.action
    def send_email(to: str, when: datetime | None = None) -> None: ...

    @retrier.action(name="billing.charge")
    def charge(amount: int, to: Address) -> None: ...

    at = datetime(2030, 1, 1, tzinfo=UTC)
    a = retrier.run_after(60, send_email, {"to": "a@b.c", "when": at})
    b = retrier.run(charge, {"amount": 5, "to": {"city": "Oslo"}}, context={"order": 1})
    c = pool.enqueue(send_email, {"to": "c@d.e"}, priority=5, key="k")
    d = pool.enqueue(send_email, {"to": "d@e.f"}, priority=1)

    # b, c and d are due at the same (fake) millisecond: higher priority first.
    assert [r.id for r in enqueued(retrier)] == [c, d, b, a]
    assert [r.id for r in enqueued(retrier, send_email)] == [c, d, a]
    assert [r.id for r in enqueued(retrier, "billing.charge")] == [b]
    assert [r.id for r in enqueued(retrier, charge, {"to": Address(city="Oslo")})] == [b]
    assert [r.id for r in enqueued(retrier, args={"when": at})] == [a], "compared as JSON"
    assert [r.id for r in enqueued(pool)] == [c, d], "a pool: its own items"
    assert [r.id for r in enqueued(pool, queue="")] == [b, a]
    assert enqueued(retrier, send_email, {"to": "nobody"}) == []
    [run] = enqueued(retrier, send_email, {"to": "c@d.e"})
    assert run == EnqueuedRun(
        id=c, fn="send_email", args={"to": "c@d.e", "when": None},
        due_at=clock.now(), due_in=timedelta(0), attempts=0, queue="mail", key="k",
        priority=5, on_complete=None, context=None,
    )
    [billing] = enqueued(retrier, charge)
    assert billing.context == {"order": 1}
    with pytest.raises(UnregisteredFunction):
        enqueued(retrier, lambda: None)
    drain(retrier)
    assert [r.id for r in enqueued(retrier)] == [a]
    clock.advance(61)
    assert enqueued(retrier)[0].due_in == timedelta(seconds=-1), "overdue until drained"


def test_assert_enqueued_returns_matches_or_shows_what_waits(make_retrier: MakeRetrier) -> None:
    retrier = make_retrier(clock=FakeClock())
    pool = Workpool(retrier, "mail")

    @retrier.action
    def send_email(to: str) -> None: ...

    @retrier.action
    def charge(amount: int) -> None: ...

    with pytest.raises(AssertionError, match=r"^expected a run of 'send_email'; nothing is "
                       r"enqueued$"):
        assert_enqueued(retrier, send_email)
    with pytest.raises(AssertionError, match=r"^expected a run in queue 'mail'; nothing is "
                       r"enqueued in that queue$"):
        assert_enqueued(pool)
    work_id = pool.enqueue(send_email, {"to": "a@b.c"}, run_after=timedelta(minutes=5))
    retrier.run(charge, {"amount": 3})
    [found] = assert_enqueued(pool, send_email, {"to": "a@b.c"})
    assert found.id == work_id
    with pytest.raises(AssertionError) as failure:
        assert_enqueued(retrier, send_email, {"to": "x@y.z"})
    message = str(failure.value)
    assert message.startswith(
        "expected a run of 'send_email' with args including {'to': 'x@y.z'}; "
        "found none among the 2 runs enqueued:\n"
    )
    assert f"  - send_email {{'to': 'a@b.c'}} (due in 0:05:00, queue 'mail'; id {work_id})" in (
        message
    )
    assert "  - charge {'amount': 3} (due now; id " in message
    with pytest.raises(AssertionError, match="in queue 'other'; nothing is enqueued in that"):
        assert_enqueued(pool, queue="other")


def test_refute_enqueued_fails_listing_the_matches(make_retrier: MakeRetrier) -> None:
    retrier = make_retrier(clock=FakeClock())

    @retrier.action
    def send_email(to: str) -> None:
        raise RuntimeError("smtp down")

    refute_enqueued(retrier)
    run_id = retrier.run(send_email, {"to": "a@b.c"})
    refute_enqueued(retrier, send_email, {"to": "other@b.c"})
    drain(retrier)  # the first attempt fails; the retry waits for its backoff
    with pytest.raises(AssertionError) as failure:
        refute_enqueued(retrier, send_email)
    assert str(failure.value) == (
        "expected no run of 'send_email'; found 1 run:\n"
        f"  - send_email {{'to': 'a@b.c'}} (due in 0:00:00.250000, 1 attempt(s) made; "
        f"id {run_id})"
    )
    for n in range(12):
        retrier.run(send_email, {"to": f"{n}@b.c"})
    with pytest.raises(AssertionError, match=r"found 13 runs:\n(.*\n){10}  \.\.\. and 3 more$"):
        refute_enqueued(retrier)


# -- perform -------------------------------------------------------------------------------


class Receipt(BaseModel):
    order_id: str
    total: float


def test_perform_calls_an_action_as_a_worker_would(make_retrier: MakeRetrier) -> None:
    retrier = make_retrier(clock=FakeClock())
    seen = Calls()
    pool = Workpool(retrier, "p")

    @retrier.action
    def make_receipt(order_id: str, amounts: list[float], when: datetime) -> Receipt:
        seen.add(when)
        return Receipt(order_id=order_id, total=sum(amounts))

    @retrier.action
    async def declined(card: str) -> None:
        raise NonRetryableError(f"card {card} declined")

    @retrier.action
    def rate_limited() -> None:
        raise RetryAfter(30)

    @retrier.action
    def unstorable() -> float:
        return float("nan")

    receipt = perform(
        retrier, make_receipt, {"order_id": "o1", "amounts": [1, 2.5], "when": "2030-01-01T00:00Z"}
    )
    assert receipt == Receipt(order_id="o1", total=3.5)
    assert seen.items == [datetime(2030, 1, 1, tzinfo=UTC)], "arguments arrive typed"
    assert perform(pool, "make_receipt", {"order_id": "o2", "amounts": [], "when": datetime(
        2030, 1, 1, tzinfo=UTC)}) == Receipt(order_id="o2", total=0)
    with pytest.raises(NonRetryableError, match="card 4242 declined"):
        perform(retrier, declined, {"card": "4242"})
    with pytest.raises(RetryAfter):
        perform(retrier, rate_limited)
    with pytest.raises(TypeError, match="is not JSON-serializable"):
        perform(retrier, unstorable)
    with pytest.raises(InvalidArguments, match="make_receipt"):
        perform(retrier, make_receipt, {"order_id": "o1"})
    with pytest.raises(UnregisteredFunction):
        perform(retrier, "nope")
    refute_enqueued(retrier)
    assert retrier.store.list_runs() == [], "nothing is stored"


# -- the pytest plugin, as an app's test suite uses it ------------------------------------

APP_TEST = '''
from datetime import timedelta

from retrier import Completed, Success
from retrier.testing import assert_enqueued, refute_enqueued, run_for


def test_signup_sends_a_welcome_email(tiers_retrier, tiers_clock, tiers_drain):
    sent = []

    @tiers_retrier.action
    def send_email(to: str) -> str:
        sent.append((to, tiers_clock.now_ms()))
        return "ok"

    run_id = tiers_retrier.run(send_email, {"to": "a@b.c"})
    assert_enqueued(tiers_retrier, send_email, {"to": "a@b.c"})
    tiers_drain()
    refute_enqueued(tiers_retrier)
    assert tiers_retrier.status(run_id) == Completed(Success("ok"))
    later = tiers_retrier.run_after(timedelta(days=3), send_email, {"to": "b@c.d"})
    start = tiers_clock.now_ms()
    run_for(tiers_retrier, timedelta(days=3))
    assert tiers_retrier.status(later) == Completed(Success("ok"))
    assert sent[-1] == ("b@c.d", start + 3 * 86_400_000)


def test_each_test_has_a_database_of_its_own(tiers_make_retrier, tiers_database_url):
    first = tiers_make_retrier()
    second = tiers_make_retrier()
    assert first.clock is second.clock
    assert first.store.list_runs() == []
    assert tiers_database_url.startswith(EXPECTED)


LEFT_OPEN = []


def test_a_leaked_connection_fails_the_test(tiers_retrier):
    LEFT_OPEN.append(tiers_retrier.engine.connect())


def test_tiers_drain_needs_something_to_drain(tiers_drain):
    LEFT_OPEN.pop().close()
    tiers_drain()
'''


def pytester_args(db_url: str) -> tuple[list[str], str]:
    """Command-line arguments that point the plugin at `db_url`'s kind of database, and
    how its URLs start."""
    if db_url.startswith("sqlite"):
        return [], "sqlite:///"
    base = make_url(db_url).set(query={}).render_as_string(hide_password=False)
    return [f"--tiers-database-url={base}"], base + "?options=-csearch_path%3Dtiers_test_"


def test_the_plugin_lets_an_app_test_enqueue_drain_and_assert(
    pytester: pytest.Pytester, db_url: str
) -> None:
    args, expected = pytester_args(db_url)
    pytester.makepyfile(test_app=f"EXPECTED = {expected!r}\n" + APP_TEST)
    result = pytester.runpytest("-p", "no:cacheprovider", *args)
    result.assert_outcomes(passed=3, failed=1, errors=1)  # the leak: an error at teardown
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_a_leaked_connection_fails_the_test*",
            "*1 database connection(s) left checked out by the test*",
            "*ValueError: tiers_drain() has nothing to drain*",
        ]
    )
    if args:  # every schema the tests made was dropped
        from sqlalchemy import create_engine, text

        engine = create_engine(make_url(db_url).set(query={}))
        try:
            with engine.connect() as conn:
                left = conn.execute(
                    text("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'tiers_test_%'")
                ).scalar()
        finally:
            engine.dispose()
        assert left == 0


def test_the_plugin_is_an_option_away_from_postgresql(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--tiers-database-url=URL*"])
    pytester.makepyfile(test_x="def test_x(tiers_database_url): pass\n")
    result = pytester.runpytest("--tiers-database-url=sqlite:///x.db")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*takes a PostgreSQL URL, got 'sqlite'*"])
    result = pytester.runpytest("-p", "no:tiers")
    result.stdout.fnmatch_lines(["*fixture 'tiers_database_url' not found*"])


# -- docs/testing.md, run as written --------------------------------------------------------


def doc_files() -> dict[str, str]:
    """The files docs/testing.md shows: each ```python block whose first line is
    `# file: NAME`."""
    text = (ROOT / "docs" / "testing.md").read_text()
    files = {}
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL):
        first, _, body = block.partition("\n")
        if first.startswith("# file: "):
            files[first.removeprefix("# file: ").strip()] = body
    return files


def test_the_docs_examples_pass_as_written(pytester: pytest.Pytester, db_url: str) -> None:
    files = doc_files()
    assert "shop.py" in files and any(name.startswith("test_") for name in files)
    for name, body in files.items():
        pytester.makefile(Path(name).suffix, **{Path(name).stem: body})
    args, _ = pytester_args(db_url)
    pytester.syspathinsert()
    result = pytester.runpytest("-p", "no:cacheprovider", *args)
    tests = sum(body.count("\ndef test_") + body.count("\nasync def test_")
                for name, body in files.items() if name.startswith("test_"))
    result.assert_outcomes(passed=tests)
