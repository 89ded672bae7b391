"""Workflow progress, log lines, watch, size limits and retention, on SQLite and
PostgreSQL (issue #14, parts 3 and 4)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import func, select

from retrier import (
    Completed,
    FakeClock,
    InProgress,
    InvalidArguments,
    Retrier,
    Success,
    ValueTooLarge,
)
from tests.support import drain
from workflow import (
    LogAdded,
    ProgressChanged,
    StatusChanged,
    StepChanged,
    StepFailed,
    WatchEvent,
    WorkflowContext,
    WorkflowManager,
    WorkflowNotFound,
)
from workflow._limits import INLINE_RESULT, MAX_PROGRESS, MAX_RESULT, MiB
from workflow._models import events_t, logs_t, results_t, steps_t, workflows_t
from workpool import Workpool

MakeRetrier = Callable[..., Retrier]
ROOT = Path(__file__).resolve().parent.parent
DAY = timedelta(days=1)


@dataclass
class App:
    clock: FakeClock
    retrier: Retrier
    workflows: WorkflowManager

    def drain(self) -> None:
        drain(self.retrier)

    def later(self, delta: timedelta | float) -> None:
        self.clock.advance(delta)
        self.drain()

    def count(self, table: Any, **where: Any) -> int:
        stmt = select(func.count()).select_from(table)
        for column, value in where.items():
            stmt = stmt.where(table.c[column] == value)
        with self.retrier.engine.connect() as conn:
            return int(conn.execute(stmt).scalar() or 0)


@pytest.fixture
def app(make_retrier: MakeRetrier) -> App:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    pool = Workpool(retrier, "steps", max_parallelism=4)
    return App(clock, retrier, WorkflowManager(pool))


# -- progress and log lines ---------------------------------------------------------------


def test_progress_and_log_lines_survive_replays_once_each(app: App) -> None:
    r, wf = app.retrier, app.workflows

    @r.action
    def fetch(n: int) -> int:
        return n * 10

    @wf.define
    async def job(ctx: WorkflowContext) -> int:
        ctx.log.info("starting %d items", 2)
        ctx.set_progress({"done": 0, "of": 2})
        a = await ctx.step("fetch", fetch, {"n": 1})
        ctx.set_progress({"done": 1, "of": 2})
        ctx.log.warning("half way: %s", a)
        await ctx.sleep("nap", timedelta(hours=1))
        b = await ctx.step("fetch", fetch, {"n": 2})
        ctx.set_progress({"done": 2, "of": 2})
        ctx.log.error("done")
        return int(a + b)

    wf_id = wf.start(job)
    app.drain()
    status = wf.status(wf_id)
    assert status == InProgress()
    assert isinstance(status, InProgress) and status.progress == {"done": 1, "of": 2}
    assert wf.progress(wf_id) == {"done": 1, "of": 2}
    assert [(x.seq, x.level, x.message, x.step) for x in wf.logs(wf_id)] == [
        (1, "info", "starting 2 items", None),
        (2, "warning", "half way: 10", "fetch[0]"),
    ]
    app.later(timedelta(hours=1))  # the replay logs and reports the first lines again
    assert wf.status(wf_id) == Completed(Success(30))
    assert wf.progress(wf_id) == {"done": 2, "of": 2}
    assert wf.get(wf_id).progress == {"done": 2, "of": 2}
    lines = wf.logs(wf_id)
    assert [(x.seq, x.message, x.step) for x in lines] == [
        (1, "starting 2 items", None),
        (2, "half way: 10", "fetch[0]"),
        (3, "done", "fetch[1]"),
    ]
    assert app.count(logs_t, workflow_id=wf_id) == 3
    by_step = {s.name: [x.message for x in s.logs] for s in wf.steps(wf_id)}
    assert by_step == {"fetch[0]": ["half way: 10"], "nap[0]": [], "fetch[1]": ["done"]}
    assert [x.message for x in wf.logs(wf_id, after=2)] == ["done"]


def test_a_replays_earlier_progress_never_overwrites_a_later_one(app: App) -> None:
    wf = app.workflows

    @wf.define
    async def idle(ctx: WorkflowContext) -> None:
        await ctx.wait_for_event("go", "go")

    wf_id = wf.start(idle)
    progress = wf._journal.progress
    assert progress.set_progress(wf_id, 2, "second")
    assert not progress.set_progress(wf_id, 1, "first, replayed")
    assert wf.progress(wf_id) == "second"
    assert progress.set_progress(wf_id, 3, "third")
    assert wf.progress(wf_id) == "third"


def test_a_restarted_workflow_can_forget_its_log_lines_and_progress_order(app: App) -> None:
    wf = app.workflows

    @wf.define
    async def idle(ctx: WorkflowContext) -> None:
        await ctx.wait_for_event("go", "go")

    wf_id = wf.start(idle)
    progress = wf._journal.progress
    progress.set_progress(wf_id, 5, "old run")
    line = {"workflow_id": wf_id, "seq": 1, "step": None, "level": "info",
            "message": "old", "created_ms": 0}
    assert progress.add_logs(wf_id, [line]) == 1
    with wf._journal.dialect.write() as conn:
        progress.forget(conn, wf_id)
    assert wf.progress(wf_id) == "old run" and wf.logs(wf_id) == []
    assert progress.set_progress(wf_id, 1, "new run")
    assert progress.add_logs(wf_id, [{**line, "message": "new"}]) == 1
    assert [x.message for x in wf.logs(wf_id)] == ["new"]


def test_progress_must_be_json_and_small(app: App) -> None:
    wf = app.workflows

    @wf.define
    async def bad_type(ctx: WorkflowContext) -> None:
        ctx.set_progress({"at": object()})

    @wf.define
    async def too_big(ctx: WorkflowContext) -> None:
        ctx.set_progress("x" * (MAX_PROGRESS + 1))

    a, b = wf.start(bad_type), wf.start(too_big)
    app.drain()
    failed_a = wf.status(a)
    assert isinstance(failed_a, Completed) and "InvalidArguments" in str(failed_a.result)
    failed_b = wf.status(b)
    assert isinstance(failed_b, Completed)
    assert "ValueTooLarge: the progress is 64 KiB" in str(failed_b.result)
    assert wf.progress(b) is None


def test_long_log_lines_are_cut(app: App) -> None:
    wf = app.workflows

    @wf.define
    async def chatty(ctx: WorkflowContext) -> None:
        ctx.log.info("y" * 100_000)

    wf_id = wf.start(chatty)
    app.drain()
    (line,) = wf.logs(wf_id)
    assert len(line.message.encode()) < 8300 and line.message.endswith("[cut: 100000 bytes]")


# -- size limits ----------------------------------------------------------------------------


def test_too_large_arguments_and_events_are_refused_before_anything_is_written(
    app: App,
) -> None:
    wf = app.workflows

    @wf.define
    async def takes(ctx: WorkflowContext, blob: str) -> None:
        return None

    too_big = r"the arguments of workflow .*takes.* over the limit of 1 MiB"
    with pytest.raises(ValueTooLarge, match=too_big) as info:
        wf.start(takes, {"blob": "z" * MiB})
    assert isinstance(info.value, InvalidArguments) and info.value.limit == MiB
    with pytest.raises(ValueTooLarge, match="the data of event 'big'"):
        wf.send_event("big", {"blob": "z" * MiB})
    assert app.count(workflows_t) == 0 and app.count(events_t) == 0


def test_a_step_result_over_the_limit_fails_the_step_with_a_clear_error(app: App) -> None:
    r, wf = app.retrier, app.workflows

    @r.action
    def huge() -> str:
        return "h" * (MAX_RESULT + 1)

    @wf.define
    async def job(ctx: WorkflowContext) -> str:
        try:
            await ctx.step("huge", huge)
        except StepFailed as exc:
            return str(exc)
        return "no error"

    wf_id = wf.start(job)
    app.drain()
    status = wf.status(wf_id)
    assert isinstance(status, Completed) and isinstance(status.result, Success)
    assert "ValueTooLarge: the result of step 'huge[0]' is 4 MiB" in status.result.value
    assert "over the limit of 4 MiB" in status.result.value


def test_large_step_results_live_apart_and_load_only_on_replay(app: App) -> None:
    r, wf = app.retrier, app.workflows
    big = {"rows": ["r" * 100] * 2000}  # about 200 KiB

    @r.action
    def load() -> dict[str, Any]:
        return big

    @wf.define
    async def job(ctx: WorkflowContext) -> int:
        data = await ctx.step("load", load)
        await ctx.sleep("nap", 60)
        return len(data["rows"])

    wf_id = wf.start(job)
    app.drain()
    with app.retrier.engine.connect() as conn:
        row = conn.execute(
            select(steps_t.c.result, steps_t.c.result_size).where(steps_t.c.name == "load[0]")
        ).one()
    assert row.result is None and row.result_size > INLINE_RESULT
    assert app.count(results_t, workflow_id=wf_id) == 1
    loaded = wf._journal.load(wf_id)
    assert loaded is not None and loaded.entries["load[0]"].result is None
    assert [s.result for s in wf.steps(wf_id) if s.name == "load[0]"] == [big]
    app.later(60)  # the replay reads the result from the side table
    assert wf.status(wf_id) == Completed(Success(2000))
    wf.cleanup(wf_id)
    assert app.count(results_t) == 0 and app.count(logs_t) == 0


def test_a_large_child_result_lives_apart_in_the_parents_journal(app: App) -> None:
    wf = app.workflows
    big = "c" * (INLINE_RESULT * 2)

    @wf.define
    async def child(ctx: WorkflowContext) -> str:
        return big

    @wf.define
    async def parent(ctx: WorkflowContext) -> int:
        value = await ctx.invoke("child", child)
        await ctx.sleep("nap", 60)
        return len(value)

    wf_id = wf.start(parent)
    app.drain()
    assert app.count(results_t, workflow_id=wf_id, name="child[0]") == 1
    assert [s.result for s in wf.steps(wf_id) if s.kind == "invoke"] == [big]
    app.later(60)
    assert wf.status(wf_id) == Completed(Success(len(big)))


# -- retention -----------------------------------------------------------------------------


def test_retention_deletes_old_finished_workflows_journals_and_events(app: App) -> None:
    r, wf = app.retrier, app.workflows

    @r.action
    def big() -> str:
        return "b" * (INLINE_RESULT + 10)

    @wf.define
    async def old(ctx: WorkflowContext) -> None:
        ctx.log.info("hello")
        ctx.set_progress(1)
        await ctx.step("big", big)

    @wf.define
    async def waits(ctx: WorkflowContext) -> None:
        await ctx.wait_for_event("go", "never")

    done = [wf.start(old) for _ in range(3)]
    running = wf.start(waits)
    wf.send_event("noise", {"n": 1})
    app.drain()
    assert app.count(steps_t) == 4 and app.count(logs_t) == 3 and app.count(results_t) == 3
    app.clock.advance(8 * DAY)
    recent = wf.start(old)
    wf.send_event("noise", {"n": 2})
    app.drain()

    removed = r.store.purge(int((7 * DAY).total_seconds() * 1000))
    assert removed["workflows"] == 3 and removed["workflow events"] == 1
    for wf_id in done:
        with pytest.raises(WorkflowNotFound):
            wf.get(wf_id)
    assert {w.id for w in wf.list()} == {running, recent}
    assert app.count(steps_t) == 2  # the waiting one's wait, the recent one's step
    assert app.count(logs_t) == 1 and app.count(results_t) == 1
    assert app.count(events_t) == 1
    assert wf.progress(recent) == 1


def test_retention_runs_in_batches(app: App) -> None:
    from workflow._retention import purge_events, purge_workflows

    wf = app.workflows

    @wf.define
    async def quick(ctx: WorkflowContext) -> None:
        return None

    for _ in range(5):
        wf.start(quick)
        wf.send_event("e", {})
    app.drain()
    app.clock.advance(2 * DAY)
    assert purge_workflows(wf._journal, 1000, batch=2) == 5
    assert purge_events(wf._journal, 1000, batch=2) == 5
    assert app.count(workflows_t) == 0 and app.count(events_t) == 0


def test_the_workers_daily_job_runs_the_tiers_retention(app: App) -> None:
    from retrier._worker import Worker

    wf = app.workflows

    @wf.define
    async def quick(ctx: WorkflowContext) -> None:
        return None

    wf_id = wf.start(quick)
    app.drain()
    app.clock.advance(8 * DAY)
    failing = {"n": 0}

    def broken(_older_than_ms: int) -> int:
        failing["n"] += 1
        raise RuntimeError("boom")

    app.retrier.store.add_retention("broken", broken)
    worker = Worker(app.retrier.store, app.retrier.registry)
    worker.jobs.purge()  # one part failing does not stop the others
    assert failing["n"] == 1
    with pytest.raises(WorkflowNotFound):
        wf.get(wf_id)


# -- watch ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_watch_streams_status_steps_logs_and_progress_until_the_end(
    make_retrier: MakeRetrier,
) -> None:
    retrier = make_retrier()
    wf = WorkflowManager(Workpool(retrier, "watched", max_parallelism=2))

    @retrier.action
    async def work(n: int) -> int:
        return n + 1

    @wf.define
    async def job(ctx: WorkflowContext) -> int:
        ctx.log.info("begin")
        a = await ctx.step("work", work, {"n": 1})
        ctx.set_progress({"pct": 50})
        await ctx.wait_for_event("go", "go")
        ctx.set_progress({"pct": 100})
        return int(a)

    seen: list[WatchEvent] = []
    async with retrier:
        wf_id = await wf.start_async(job)
        with anyio.fail_after(15):
            async for event in wf.watch(wf_id):
                seen.append(event)
                if isinstance(event, ProgressChanged) and event.progress == {"pct": 50}:
                    await wf.send_event_async("go", {})
    assert isinstance(seen[0], StatusChanged) and seen[0].state == "running"
    last = seen[-1]
    assert isinstance(last, StatusChanged) and last.finished and last.state == "completed"
    assert last.result == 2
    assert [e.progress for e in seen if isinstance(e, ProgressChanged)][-1] == {"pct": 100}
    assert [e.line.message for e in seen if isinstance(e, LogAdded)] == ["begin"]
    final = {e.name: e.state for e in seen if isinstance(e, StepChanged)}
    assert final == {"work[0]": "completed", "go[0]": "completed"}
    assert all(isinstance(e.to_json(), dict) for e in seen)


@pytest.mark.anyio
async def test_watch_sees_another_processs_change_quickly(app: App) -> None:
    """On PostgreSQL by notification (well under the 2 s safety poll), on SQLite by
    its 150 ms poll; the change is made from another thread, as another process would."""
    wf = app.workflows

    @wf.define
    async def idle(ctx: WorkflowContext) -> None:
        await ctx.wait_for_event("go", "go")

    wf_id = wf.start(idle)
    await anyio.to_thread.run_sync(app.drain)
    events = wf.watch(wf_id)
    first = await events.__anext__()
    assert isinstance(first, StatusChanged) and first.state == "running"
    while not isinstance(await events.__anext__(), StepChanged):
        pass
    changed = threading.Timer(
        0.3, lambda: wf._journal.progress.set_progress(wf_id, 1, "from elsewhere")
    )
    changed.start()
    try:
        with anyio.fail_after(1.5):
            event = await events.__anext__()
    finally:
        changed.join()
        await events.aclose()  # type: ignore[attr-defined]
    assert event == ProgressChanged(wf_id, "from elsewhere")


@pytest.mark.anyio
async def test_watch_of_an_unknown_workflow_raises(app: App) -> None:
    with pytest.raises(WorkflowNotFound):
        async for _ in app.workflows.watch("nope"):
            pass


@pytest.mark.anyio
async def test_watch_of_a_finished_workflow_gives_its_picture_and_ends(app: App) -> None:
    wf = app.workflows

    @wf.define
    async def quick(ctx: WorkflowContext) -> str:
        ctx.set_progress("all done")
        return "ok"

    wf_id = wf.start(quick)
    await anyio.to_thread.run_sync(app.drain)
    with anyio.fail_after(5):
        seen = [e async for e in wf.watch(wf_id)]
    assert seen == [
        ProgressChanged(wf_id, "all done"),
        StatusChanged(wf_id, "completed", "ok", None),
    ]


# -- command line ----------------------------------------------------------------------------


def test_cli_shows_progress_and_log_lines_watches_and_cleans_up(app: App, db_url: str) -> None:
    import json

    from click.testing import CliRunner

    from retrier._cli import main

    wf = app.workflows

    @wf.define
    async def reporting(ctx: WorkflowContext) -> str:
        ctx.log.warning("disk at %d%%", 91)
        ctx.set_progress({"pct": 40})
        return "ok"

    wf_id = wf.start(reporting)
    app.drain()
    runner = CliRunner()
    shown = runner.invoke(main, ["--db", db_url, "workflows", "show", wf_id], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert '{"pct": 40}' in shown.output and "disk at 91%" in shown.output
    assert "warning" in shown.output
    watched = runner.invoke(main, ["--db", db_url, "workflows", "watch", wf_id])
    assert watched.exit_code == 0, watched.output
    events = [json.loads(line) for line in watched.output.splitlines()]
    assert [e["kind"] for e in events] == ["log", "progress", "status"]
    assert events[-1]["state"] == "completed" and events[-1]["result"] == "ok"
    # The command's clock is the real one, years after the test's fake clock.
    kept = runner.invoke(main, ["--db", db_url, "workflows", "cleanup", "--older-than", "36500"])
    assert kept.exit_code == 0 and "deleted 0 workflow(s)" in kept.output
    cleaned = runner.invoke(main, ["--db", db_url, "workflows", "cleanup", "--older-than", "1"])
    assert cleaned.exit_code == 0 and "deleted 1 workflow(s)" in cleaned.output, cleaned.output
    assert app.count(workflows_t) == 0 and app.count(logs_t) == 0


def test_a_too_large_step_argument_fails_the_workflow_before_the_step_runs(app: App) -> None:
    r, wf = app.retrier, app.workflows
    ran: list[int] = []

    @r.action
    def take(blob: str) -> None:
        ran.append(len(blob))

    @wf.define
    async def job(ctx: WorkflowContext) -> None:
        await ctx.step("take", take, {"blob": "q" * (MiB + 1)})

    wf_id = wf.start(job)
    app.drain()
    status = wf.status(wf_id)
    assert isinstance(status, Completed)
    assert "ValueTooLarge: the arguments of step 'take'" in str(status.result)
    assert ran == [] and wf.steps(wf_id) == []


def test_the_docs_progress_example_runs_as_written(tmp_path: Any) -> None:
    import os
    import subprocess
    import sys

    doc = (ROOT / "docs" / "workflow.md").read_text()
    snippet = doc.split("## Progress, log lines and watching")[1].split("```python")[1]
    (tmp_path / "demo.py").write_text(snippet.split("```")[0])
    done = subprocess.run(
        [sys.executable, "demo.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "TIERS_LOG_LEVEL": "WARNING"}, check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("status {") and "'state': 'running'" in lines[0]
    assert lines[-2].startswith("status {") and "'result': 300" in lines[-2]
    assert "progress {" in done.stdout and "batch 2 imported (300 rows so far)" in lines[-1]


@pytest.mark.anyio
async def test_watch_sees_a_cancel_from_elsewhere_by_its_row_lock(app: App) -> None:
    wf = app.workflows

    @wf.define
    async def idle(ctx: WorkflowContext) -> None:
        await ctx.wait_for_event("go", "go")

    wf_id = wf.start(idle)
    await anyio.to_thread.run_sync(app.drain)
    events = wf.watch(wf_id)
    while not isinstance(await events.__anext__(), StepChanged):
        pass
    canceling = threading.Timer(0.3, lambda: wf.cancel(wf_id))
    canceling.start()
    try:
        with anyio.fail_after(1.5):  # on PostgreSQL: under the 2 s safety poll
            seen = [await events.__anext__()]
            while not isinstance(seen[-1], StatusChanged):
                seen.append(await events.__anext__())
    finally:
        canceling.join()
        await events.aclose()  # type: ignore[attr-defined]
    assert seen[-1] == StatusChanged(wf_id, "canceled")


def test_only_watched_workflows_send_notifications(app: App) -> None:
    from workflow._journal import TOPIC

    wf = app.workflows
    journal = wf._journal

    @wf.define
    async def idle(ctx: WorkflowContext) -> None:
        await ctx.wait_for_event("go", "go")

    quiet, watched = wf.start(idle), wf.start(idle)
    app.drain()
    got: list[str] = []
    arrived = threading.Event()

    def collect(payload: str) -> None:
        got.append(payload)
        arrived.set()

    subscription = journal.dialect.subscribe(TOPIC, collect)
    try:
        if not journal.dialect.topics_notify:  # SQLite: watchers poll
            assert journal._notice is None and not arrived.wait(0.3)
            return
        assert arrived.wait(5) and got == [""]  # listening
        arrived.clear()
        journal.progress.set_progress(quiet, 1, "no one looks")
        wf.cancel(quiet)
        assert not arrived.wait(0.7), got
        journal.watching(watched, app.clock.now_ms() + 30_000)
        journal.progress.set_progress(watched, 1, "someone looks")
        assert arrived.wait(5)
        arrived.clear()
        wf.cancel(watched)  # announced with the lock of its row
        assert arrived.wait(5)
        assert got == ["", watched, watched]
    finally:
        subscription.close()


@pytest.mark.processes
@pytest.mark.timeout(120)
@pytest.mark.anyio
async def test_watch_follows_a_workflow_run_by_a_worker_process(db_url: str) -> None:
    import importlib
    import os
    import sys

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    workflows = importlib.import_module("tests.progress_app").build(db_url)
    env = {**os.environ, "TIERS_WF_TEST_DB": db_url, "TIERS_LOG_LEVEL": "ERROR"}
    worker = await anyio.open_process(
        [sys.executable, "-m", "retrier", "worker", "tests.progress_app:workflows"],
        cwd=ROOT, env=env, stdout=None, stderr=None,
    )
    seen: list[WatchEvent] = []
    try:
        wf_id = await workflows.start_async("reporting", {"steps": 3})
        with anyio.fail_after(60):
            async for event in workflows.watch(wf_id):
                seen.append(event)
                if isinstance(event, ProgressChanged) and event.progress["done"] == 3:
                    await workflows.send_event_async("release", {})
    finally:
        worker.terminate()
        with anyio.fail_after(30):
            await worker.wait()
        workflows.retrier.close()
    assert seen[-1] == StatusChanged(wf_id, "completed", 3)
    assert [e.line.message for e in seen if isinstance(e, LogAdded)] == [
        "step 0 done", "step 1 done", "step 2 done",
    ]
    progress = [e.progress["done"] for e in seen if isinstance(e, ProgressChanged)]
    assert progress == sorted(progress) and progress[-1] == 3


def test_a_restart_stores_the_new_runs_progress_and_log_lines(app: App) -> None:
    r, wf = app.retrier, app.workflows
    fail = {"save": True}

    @r.action
    def load() -> str:
        return "d" * (INLINE_RESULT + 1)

    @r.action
    def save() -> None:
        if fail["save"]:
            raise RuntimeError("disk full")

    @wf.define
    async def job(ctx: WorkflowContext) -> str:
        ctx.log.info("run %s", "one" if fail["save"] else "two")  # the code was fixed
        await ctx.step("load", load)
        ctx.set_progress("loaded")
        await ctx.step("save", save)
        ctx.set_progress("saved")
        ctx.log.info("saved")
        return "ok"

    wf_id = wf.start(job)
    app.drain()
    assert wf.progress(wf_id) == "loaded"
    fail["save"] = False
    wf.restart(wf_id, "load")
    app.drain()
    assert wf.status(wf_id) == Completed(Success("ok"))
    assert wf.progress(wf_id) == "saved"
    assert [x.message for x in wf.logs(wf_id)] == ["run two", "saved"]
    assert app.count(results_t, workflow_id=wf_id) == 1
