"""Cron schedules: declared in code, stored, each tick fired exactly once, missed ticks
as the policy says, DST as documented, bad settings refused before anything is
written; on the retrier, a workpool and a workflow manager, on both backends.

Time is a FakeClock moved by the testing mode (`run_for`, `advance`), which fires due
ticks as a worker's timer would.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from retrier import (
    Completed,
    FakeClock,
    InvalidArguments,
    InvalidSchedule,
    InvalidSettings,
    Retrier,
    ScheduleNotFound,
    Success,
    UnregisteredFunction,
)
from retrier._models import RunRow
from retrier._schedules import Schedules, tick_run_id
from retrier.testing import advance, drain, run_for
from workflow import WorkflowContext, WorkflowManager
from workpool import Workpool

PARIS = ZoneInfo("Europe/Paris")


def at(*parts: int, tz: Any = UTC) -> int:
    """Epoch ms of a wall-clock time."""
    return round(datetime(*parts, tzinfo=tz).timestamp() * 1000)  # type: ignore[misc]


def app(
    make_retrier: Callable[..., Retrier], start_ms: int
) -> tuple[Retrier, FakeClock, list[Any]]:
    clock = FakeClock(start_ms)
    retrier = make_retrier(clock=clock)
    calls: list[Any] = []

    @retrier.action(name="report")
    def report(to: str) -> str:
        calls.append((to, clock.now_ms()))
        return to

    return retrier, clock, calls


def runs_of(retrier: Retrier, fn: str = "report") -> list[RunRow]:
    return retrier.store.list_runs(fn=fn, limit=10_000)


def fired(retrier: Retrier, name: str, to: str | None = None) -> list[int]:
    """The ticks of `name` that started a run (read from the runs' ids), in order."""
    ids = {r.id for r in runs_of(retrier) if to is None or r.args.get("to") == to}
    schedule = retrier.get_schedule(name)
    assert schedule.last_fire is not None or not ids
    # Every tick fired lies between the first run's creation and the last tick.
    rows = runs_of(retrier)
    low = min((r.created_ms for r in rows), default=0) - 10 * 86_400_000
    high = round(schedule.last_fire.timestamp() * 1000) if schedule.last_fire else 0
    found = [t for t in _candidates(low, high) if tick_run_id(name, t) in ids]
    assert len(found) == len(ids), "a run whose id is no tick of the schedule"
    return found


def _candidates(low: int, high: int) -> range:
    """Every whole minute from low to high (the ticks the tests use are whole minutes)."""
    return range(low - low % 60_000, high + 1, 60_000)


def test_each_tick_fires_once_at_its_time(make_retrier: Callable[..., Retrier]) -> None:
    retrier, clock, calls = app(make_retrier, at(2026, 1, 5, 8, 59, 30))
    s = retrier.schedule("each-minute", "report", {"to": "ops"}, cron="* * * * *")
    assert s.next_fire == datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    assert s.target == "run" and s.fn == "report" and not s.paused

    run_for(retrier, timedelta(minutes=5, seconds=10))

    ticks = [at(2026, 1, 5, 9, m) for m in range(5)]
    assert [t for _, t in calls] == ticks  # each at its tick, none twice, none lost
    assert fired(retrier, "each-minute") == ticks
    assert all(retrier.status(r.id) == Completed(Success("ops")) for r in runs_of(retrier))
    stored = retrier.get_schedule("each-minute")
    assert stored.last_fire == datetime(2026, 1, 5, 9, 4, tzinfo=UTC)
    assert stored.last_run_id == tick_run_id("each-minute", ticks[-1])
    assert stored.next_fire == datetime(2026, 1, 5, 9, 5, tzinfo=UTC)
    assert clock.now_ms() == at(2026, 1, 5, 9, 4, 40)


def test_many_firers_at_once_fire_each_tick_once(make_retrier: Callable[..., Retrier]) -> None:
    """Four stores (as four workers would) race to fire the same due ticks, for 21 s of
    a schedule that ticks every second."""
    retrier, clock, _ = app(make_retrier, at(2026, 1, 5, 9, 0, 0, 500))
    retrier.schedule("every-second", "report", {"to": "x"}, cron="* * * * * *", missed="all")
    others = [make_retrier(clock=clock) for _ in range(3)]
    fired: list[str] = []
    lock = threading.Lock()

    errors: list[BaseException] = []

    def fire(r: Retrier) -> None:
        for _ in range(5):
            try:
                got = r.store.fire_schedules()
            except BaseException as exc:  # a duplicate run id, say
                errors.append(exc)
                return
            with lock:
                fired.extend(f.run_id for f in got)

    for _ in range(30):  # 21 s of per-second ticks
        clock.advance(0.7)
        threads = [threading.Thread(target=fire, args=(r,)) for r in [retrier, *others]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    ids = {r.id for r in runs_of(retrier)}
    assert ids == {tick_run_id("every-second", at(2026, 1, 5, 9, 0, s)) for s in range(1, 22)}
    assert Counter(fired) == Counter(r.id for r in runs_of(retrier))
    assert max(Counter(fired).values()) == 1


def test_a_firer_that_dies_mid_tick_leaves_the_tick_to_another(
    make_retrier: Callable[..., Retrier], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dying after the compare-and-set but before the commit rolls both back."""
    retrier, clock, calls = app(make_retrier, at(2026, 1, 5, 8, 59, 59))
    retrier.schedule("each-minute", "report", {"to": "ops"}, cron="* * * * *")
    clock.advance(2)

    def die(self: Schedules, new: Any, conn: Any) -> None:
        raise SystemExit("killed mid-tick")

    victim = make_retrier(clock=clock)
    parts = victim.store.fire_schedules.__self__  # type: ignore[attr-defined]
    monkeypatch.setattr(parts, "_insert_runs", lambda new, conn: die(parts, new, conn))
    with pytest.raises(SystemExit):
        victim.store.fire_schedules()
    assert runs_of(retrier) == []
    assert retrier.get_schedule("each-minute").next_fire == datetime(2026, 1, 5, 9, 0, tzinfo=UTC)

    drain(retrier)
    assert [t for _, t in calls] == [at(2026, 1, 5, 9, 0, 1)]
    assert [r.id for r in runs_of(retrier)] == [tick_run_id("each-minute", at(2026, 1, 5, 9))]


@pytest.mark.parametrize(
    ("missed", "expected_hours"),  # the ticks 07:00 to 10:00 were missed
    [("latest", [10]), ("all", [7, 8, 9, 10]), ("none", [])],
)
def test_missed_ticks_follow_the_policy(
    make_retrier: Callable[..., Retrier], missed: str, expected_hours: list[int]
) -> None:
    retrier, _, _ = app(make_retrier, at(2026, 1, 5, 6, 30))
    retrier.schedule("hourly", "report", {"to": "ops"}, cron="0 * * * *", missed=missed)
    advance(retrier, timedelta(hours=4, minutes=5))  # every worker down from 06:30 to 10:35
    assert fired(retrier, "hourly") == [at(2026, 1, 5, h) for h in expected_hours]
    assert retrier.get_schedule("hourly").next_fire == datetime(2026, 1, 5, 11, tzinfo=UTC)


def test_a_tick_less_than_a_minute_late_is_on_time_under_every_policy(
    make_retrier: Callable[..., Retrier],
) -> None:
    retrier, _, _ = app(make_retrier, at(2026, 1, 5, 6, 59))
    retrier.schedule("hourly", "report", {"to": "ops"}, cron="0 * * * *", missed="none")
    advance(retrier, timedelta(seconds=110))
    assert fired(retrier, "hourly") == [at(2026, 1, 5, 7)]


def test_spring_forward_fires_a_skipped_time_an_hour_later(
    make_retrier: Callable[..., Retrier],
) -> None:
    """Europe/Paris, 29 March 2026: 02:00 CET jumps to 03:00 CEST."""
    retrier, _, _ = app(make_retrier, at(2026, 3, 28, 12, tz=PARIS))
    retrier.schedule("daily", "report", {"to": "a"}, cron="30 2 * * *", timezone="Europe/Paris")
    retrier.schedule("half-hourly", "report", {"to": "b"}, cron="*/30 1-3 * * *",
                     timezone="Europe/Paris")
    run_for(retrier, timedelta(days=2))
    daily = fired(retrier, "daily", "a")
    assert daily == [
        at(2026, 3, 29, 3, 30, tz=PARIS),  # 02:30 did not exist: an hour later
        at(2026, 3, 30, 2, 30, tz=PARIS),
    ]
    half = fired(retrier, "half-hourly", "b")[:4]
    assert half == [
        at(2026, 3, 29, 1, 0, tz=PARIS),
        at(2026, 3, 29, 1, 30, tz=PARIS),
        at(2026, 3, 29, 3, 0, tz=PARIS),  # 02:00 and 02:30 never came
        at(2026, 3, 29, 3, 30, tz=PARIS),
    ]


def test_fall_back_fires_a_repeated_time_once_unless_hourly(
    make_retrier: Callable[..., Retrier],
) -> None:
    """Europe/Paris, 25 October 2026: 03:00 CEST goes back to 02:00 CET."""
    retrier, _, _ = app(make_retrier, at(2026, 10, 25, 0, tz=PARIS))
    retrier.schedule("daily", "report", {"to": "a"}, cron="30 2 * * *", timezone="Europe/Paris")
    retrier.schedule("half-hourly", "report", {"to": "b"}, cron="*/30 * 25 10 *",
                     timezone="Europe/Paris")
    run_for(retrier, timedelta(hours=28))
    utc = fired(retrier, "daily", "a")
    assert utc == [at(2026, 10, 25, 0, 30), at(2026, 10, 26, 1, 30)]  # 02:30 CEST, CET
    half = fired(retrier, "half-hourly", "b")
    # Every half hour of real time, through both 02:00-03:00 hours: 25 hours that day.
    assert half == [at(2026, 10, 24, 22, 30) + k * 1_800_000 for k in range(49)]
    assert [datetime.fromtimestamp(t / 1000, PARIS).strftime("%H:%M%z") for t in half[2:8]] == [
        "01:30+0200", "02:00+0200", "02:30+0200", "02:00+0100", "02:30+0100", "03:00+0100"
    ]


def test_declaring_again_updates_and_keeps_the_next_tick(
    make_retrier: Callable[..., Retrier],
) -> None:
    retrier, clock, _ = app(make_retrier, at(2026, 1, 5, 8, 0))
    retrier.schedule("report", "report", {"to": "a"}, cron="0 9 * * *")
    clock.advance(timedelta(minutes=30))
    again = retrier.schedule("report", "report", {"to": "b"}, cron="0 9 * * *")
    assert again.args == {"to": "b"} and again.next_fire == datetime(2026, 1, 5, 9, tzinfo=UTC)
    retrier.pause_schedule("report")
    moved = retrier.schedule("report", "report", {"to": "b"}, cron="0 10 * * *",
                             timezone="Europe/Paris")
    assert moved.paused, "declaring at start-up must not resume a paused schedule"
    assert moved.next_fire == datetime(2026, 1, 5, 10, tzinfo=PARIS)
    assert [s.name for s in retrier.schedules()] == ["report"]


def test_pause_resume_trigger_and_delete(make_retrier: Callable[..., Retrier]) -> None:
    retrier, _, calls = app(make_retrier, at(2026, 1, 5, 8, 59, 30))
    retrier.schedule("each-minute", "report", {"to": "ops"}, cron="* * * * *")
    assert retrier.pause_schedule("each-minute").paused
    run_for(retrier, timedelta(minutes=3))
    assert calls == []
    resumed = retrier.resume_schedule("each-minute")  # the paused ticks are skipped
    assert not resumed.paused
    assert resumed.next_fire == datetime(2026, 1, 5, 9, 3, tzinfo=UTC)
    run_id = retrier.trigger_schedule("each-minute")
    drain(retrier)
    assert retrier.status(run_id) == Completed(Success("ops"))
    assert retrier.get_schedule("each-minute").next_fire == resumed.next_fire
    assert retrier.unschedule("each-minute") is True
    assert retrier.unschedule("each-minute") is False
    run_for(retrier, timedelta(minutes=3))
    assert len(calls) == 1
    assert retrier.status(run_id) == Completed(Success("ops"))  # its runs stay
    for call in (retrier.get_schedule, retrier.pause_schedule, retrier.resume_schedule,
                 retrier.trigger_schedule):
        with pytest.raises(ScheduleNotFound, match="no schedule named 'each-minute'"):
            call("each-minute")


BAD: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"cron": "61 * * * *"}, InvalidSchedule, "not valid"),
    ({"cron": "* * *"}, InvalidSchedule, "3 fields"),
    ({"cron": ""}, InvalidSchedule, "cron expression"),
    ({"cron": 5}, InvalidSchedule, "cron expression"),
    ({"cron": "0 0 30 2 *"}, InvalidSchedule, "never fires"),
    ({"cron": "* * * * 1-9"}, InvalidSchedule, "weekday"),
    ({"timezone": "Mars/Olympus"}, InvalidSchedule, "unknown timezone"),
    ({"timezone": "../../etc/passwd"}, InvalidSchedule, "unknown timezone"),
    ({"timezone": None}, InvalidSchedule, "IANA"),
    ({"missed": "some"}, InvalidSchedule, "missed must be"),
    ({"name": ""}, InvalidSchedule, "schedule name"),
    ({"name": "x" * 151}, InvalidSchedule, "schedule name"),
    ({"name": "a\x00b"}, InvalidSchedule, "schedule name"),
    ({"fn": "nope"}, UnregisteredFunction, "nope"),
    ({"args": {"to": 5}}, InvalidArguments, "to"),
    ({"max_failures": -1}, InvalidSettings, "max_failures"),
]


@pytest.mark.parametrize(("change", "error", "message"), BAD)
def test_bad_settings_are_refused_before_anything_is_written(
    make_retrier: Callable[..., Retrier], change: dict[str, Any], error: type[Exception],
    message: str,
) -> None:
    retrier, _, _ = app(make_retrier, at(2026, 1, 5))
    call: dict[str, Any] = {"name": "s", "fn": "report", "args": {"to": "a"},
                            "cron": "* * * * *", **change}
    with pytest.raises(error, match=message):
        retrier.schedule(call.pop("name"), call.pop("fn"), call.pop("args"), **call)
    assert retrier.schedules() == []


def test_weekdays_count_from_sunday_as_in_crontab(make_retrier: Callable[..., Retrier]) -> None:
    retrier, _, _ = app(make_retrier, at(2026, 1, 5))  # a Monday
    assert retrier.schedule("sun", "report", {"to": "a"}, cron="0 3 * * 0").next_fire == (
        datetime(2026, 1, 11, 3, tzinfo=UTC)
    )
    assert retrier.schedule("sun7", "report", {"to": "a"}, cron="0 3 * * 7").next_fire == (
        datetime(2026, 1, 11, 3, tzinfo=UTC)
    )
    weekdays = retrier.schedule("wd", "report", {"to": "a"}, cron="0 3 * * 1-5")
    assert weekdays.next_fire == datetime(2026, 1, 5, 3, tzinfo=UTC)
    assert retrier.schedule("daily", "report", {"to": "a"}, cron="@daily").next_fire == (
        datetime(2026, 1, 6, tzinfo=UTC)
    )


def test_a_pool_schedule_enqueues_items_in_the_pool(make_retrier: Callable[..., Retrier]) -> None:
    retrier, _, calls = app(make_retrier, at(2026, 1, 5, 8, 59, 30))
    pool = Workpool(retrier, "mail", max_parallelism=2)
    s = pool.schedule("mail-digest", "report", {"to": "d"}, cron="* * * * *", priority=3)
    assert (s.target, s.queue) == ("pool", "mail")
    run_for(retrier, timedelta(minutes=2))
    rows = runs_of(retrier)
    assert [r.queue for r in rows] == ["mail", "mail"] and {r.priority for r in rows} == {3}
    assert len(calls) == 2
    with pytest.raises(InvalidSchedule):
        pool.schedule("bad", "report", {"to": "d"}, cron="* * * * *", timezone="Nowhere")


def test_a_workflow_schedule_starts_one_workflow_per_tick(
    make_retrier: Callable[..., Retrier],
) -> None:
    retrier, _, _ = app(make_retrier, at(2026, 1, 5, 8, 59, 30))
    workflows = WorkflowManager(Workpool(retrier, "wf"))

    @workflows.define(name="billing")
    async def billing(ctx: WorkflowContext, account: str) -> str:
        return await ctx.step("bill", "report", {"to": account})

    s = workflows.schedule("nightly-billing", billing, {"account": "acme"}, cron="* * * * *")
    assert s.target == "workflow"
    run_for(retrier, timedelta(minutes=3))
    started = workflows.list()
    assert len(started) == 3
    assert sorted(w.idempotency_key or "" for w in started) == [
        f"schedule:nightly-billing:{at(2026, 1, 5, 9, m)}" for m in range(3)
    ]
    assert all(workflows.status(w.id) == Completed(Success("acme")) for w in started)
    # A start run again (a retried tick) starts nothing new: the key holds.
    retrier.store.insert_runs([retrier.prepare(
        "tiers.workflow.start:wf",
        {"workflow": "billing", "args": {"account": "acme"}, "schedule": "nightly-billing",
         "tick_ms": at(2026, 1, 5, 9, 0)},
    )])
    drain(retrier)
    assert len(workflows.list()) == 3
    with pytest.raises(InvalidArguments):
        workflows.schedule("bad", billing, {"nope": 1}, cron="* * * * *")


@pytest.mark.anyio
async def test_async_twins(make_retrier: Callable[..., Retrier]) -> None:
    retrier, _, _ = app(make_retrier, at(2026, 1, 5, 8, 59, 30))
    s = await retrier.schedule_async("a", "report", {"to": "x"}, cron="@hourly")
    assert s.name == "a"
    assert (await retrier.pause_schedule_async("a")).paused
    assert not (await retrier.resume_schedule_async("a")).paused
    assert [x.name for x in await retrier.schedules_async()] == ["a"]
    assert (await retrier.get_schedule_async("a")).cron == "@hourly"
    assert await retrier.trigger_schedule_async("a")
    assert await retrier.unschedule_async("a") is True
    pool = Workpool(retrier, "p")
    assert (await pool.schedule_async("b", "report", {"to": "x"}, cron="@daily")).queue == "p"
    with retrier.store.dialect.read() as conn:
        assert conn.execute(select(RunRow.fn)).scalars().all() == ["report"]  # type: ignore[call-overload]


def test_the_schedules_commands(make_retrier: Callable[..., Retrier], db_url: str) -> None:
    import json
    import time

    from click.testing import CliRunner

    from retrier._cli import main

    retrier, _, _ = app(make_retrier, time.time_ns() // 1_000_000)  # the CLI's clock is real
    nightly = retrier.schedule("nightly-report", "report", {"to": "ops"}, cron="0 3 * * *",
                     timezone="Europe/Paris")
    Workpool(retrier, "mail").schedule("digest", "report", {"to": "d"}, cron="@hourly")
    cli = CliRunner()

    def tiers(*args: str) -> Any:
        return cli.invoke(main, ["--db", db_url, "schedules", *args])

    listed = tiers("list")
    assert listed.exit_code == 0, listed.output
    assert "nightly-report" in listed.output and "pool:mail" in listed.output
    assert "2 schedule(s)" in listed.output
    rows = {r["name"]: r for r in json.loads(tiers("list", "--json").output)}
    assert nightly.next_fire is not None and nightly.next_fire.hour == 3
    assert rows["nightly-report"]["next_fire"] == nightly.next_fire.isoformat()
    assert rows["nightly-report"]["timezone"] == "Europe/Paris"
    assert rows["digest"]["target"] == "pool" and rows["digest"]["queue"] == "mail"
    assert rows["digest"]["state"] == "active" and rows["digest"]["last_fire"] is None

    assert tiers("pause", "digest").exit_code == 0
    assert retrier.get_schedule("digest").paused
    assert json.loads(tiers("list", "--json").output)[0]["state"] == "paused"
    resumed = tiers("resume", "digest")
    assert resumed.exit_code == 0 and "next tick" in resumed.output
    assert not retrier.get_schedule("digest").paused
    triggered = tiers("trigger", "nightly-report")
    assert triggered.exit_code == 0, triggered.output
    run_id = triggered.output.split()[1]
    advance(retrier, 5)  # past the real time the command started it at
    assert retrier.status(run_id) == Completed(Success("ops"))
    assert tiers("delete", "digest").exit_code == 0
    assert [s.name for s in retrier.schedules()] == ["nightly-report"]
    for command in ("delete", "pause", "resume", "trigger"):
        missing = tiers(command, "digest")
        assert missing.exit_code == 1 and "no schedule named 'digest'" in missing.output


def test_processes_declaring_at_once_store_one_schedule(
    make_retrier: Callable[..., Retrier],
) -> None:
    """Every process declares its schedules at start-up, often at the same moment."""
    retriers = [app(make_retrier, at(2026, 1, 5, 8))[0] for _ in range(4)]
    barrier = threading.Barrier(len(retriers))
    errors: list[BaseException] = []

    def declare(r: Retrier) -> None:
        barrier.wait()
        try:
            r.schedule("report", "report", {"to": "a"}, cron="0 9 * * *")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=declare, args=(r,)) for r in retriers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [s.name for s in retriers[0].schedules()] == ["report"]


def test_a_firer_with_a_stale_read_loses_the_compare_and_set(
    make_retrier: Callable[..., Retrier],
) -> None:
    """A worker that read the schedule before another fired it changes nothing."""
    from retrier._schedules import schedules_t

    retrier, clock, _ = app(make_retrier, at(2026, 1, 5, 8, 59, 59))
    retrier.schedule("each-minute", "report", {"to": "ops"}, cron="* * * * *")
    clock.advance(2)
    with retrier.store.dialect.read() as conn:
        stale = conn.execute(select(schedules_t)).one()
    assert [f.tick_ms for f in retrier.store.fire_schedules()] == [at(2026, 1, 5, 9)]
    clock.advance(60)  # 09:01:01: the stale read would fire 09:00 and 09:01
    parts = retrier.store.fire_schedules.__self__  # type: ignore[attr-defined]
    with retrier.store.dialect.write() as conn:
        assert parts._fire(conn, stale, clock.now_ms()) == []
    assert retrier.get_schedule("each-minute").next_fire == datetime(2026, 1, 5, 9, 1, tzinfo=UTC)
    assert fired(retrier, "each-minute") == [at(2026, 1, 5, 9)]


@pytest.mark.parametrize("column", ["options", "args", "cron", "timezone"])
def test_a_schedule_row_that_cannot_be_read_stops_only_itself(
    make_retrier: Callable[..., Retrier], column: str, caplog: pytest.LogCaptureFixture
) -> None:
    from sqlalchemy import text

    retrier, _, calls = app(make_retrier, at(2026, 1, 5, 8, 59, 30))
    retrier.schedule("broken", "report", {"to": "x"}, cron="* * * * *")
    retrier.schedule("healthy", "report", {"to": "ok"}, cron="* * * * *")
    postgres = retrier.store.dialect.name == "postgresql"
    bad = {"options": "42" if postgres else "{not json", "args": "42" if postgres else "{",
           "cron": "not a cron", "timezone": "Nowhere/Else"}[column]
    cast = "CAST(:v AS json)" if postgres and column in ("options", "args") else ":v"
    with retrier.engine.begin() as conn:
        conn.execute(text(f"UPDATE tiers_schedules SET {column} = {cast} WHERE name = 'broken'"),
                     {"v": bad})
    run_for(retrier, timedelta(minutes=2))
    assert [to for to, _ in calls] == ["ok", "ok"]
    assert "schedule broken cannot fire" in caplog.text
    assert retrier.get_schedule("broken").next_fire is None
    assert {s.name for s in retrier.schedules()} == {"broken", "healthy"}
    fixed = retrier.schedule("broken", "report", {"to": "x"}, cron="* * * * *")
    assert fixed.next_fire is not None  # declared again: it fires again
    run_for(retrier, timedelta(minutes=1))
    assert sorted(to for to, _ in calls) == ["ok", "ok", "ok", "x"]
