"""Workflow lifecycle (issue #14, parts 1 and 2), on SQLite and PostgreSQL: restart from
a step, patching, divergence detected before anything new runs, and `workflows check`.

Time is a FakeClock; `drain` runs everything due now in a worker without timers.
"""

from __future__ import annotations

import json
import sys
import types
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from retrier import Canceled, Completed, Failed, FakeClock, InProgress, Retrier, Success
from retrier._cli import main
from tests.support import Calls
from tests.test_workflow import App
from workflow import (
    CannotRestart,
    CheckReport,
    StepNotFound,
    WorkflowContext,
    WorkflowNotFound,
)
from workpool import RetryBehavior, Workpool

MakeRetrier = Callable[..., Retrier]


@pytest.fixture
def app(make_retrier: MakeRetrier) -> App:
    from workflow import WorkflowManager

    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    pool = Workpool(
        retrier,
        "steps",
        max_parallelism=4,
        retry_actions_by_default=True,
        default_retry_behavior=RetryBehavior(max_attempts=2, initial_backoff_ms=100, base=2),
    )
    return App(clock, retrier, pool, WorkflowManager(pool))


def _failed(status: Any) -> str:
    assert isinstance(status, Completed) and isinstance(status.result, Failed), status
    return status.result.error


# -- restart -------------------------------------------------------------------------------


def test_restart_from_save_after_a_fix_does_not_charge_or_email_again(app: App) -> None:
    """The seed scenario: charge and email ran, save failed for good; after a fix,
    restart from save: the charge and email do not run again."""
    r, wf = app.retrier, app.workflows
    calls = Calls()
    outcomes = Calls()
    fixed = {"v": False}

    @r.action
    def charge(order: str) -> str:
        calls.add("charge")
        return f"ch_{order}"

    @r.action
    def email(order: str) -> None:
        calls.add("email")

    @r.action
    def save(order: str, charge_id: str) -> str:
        calls.add("save")
        if not fixed["v"]:
            raise RuntimeError("column 'charge_id' does not exist")
        return f"saved {charge_id}"

    @r.on_complete
    def done(run_id: str, result: Any, context: Any) -> None:
        outcomes.add(result)

    @wf.define
    async def order_flow(ctx: WorkflowContext, order: str) -> str:
        charge_id = await ctx.step("charge", charge, {"order": order})
        await ctx.step("email", email, {"order": order})
        return await ctx.step("save-order", save, {"order": order, "charge_id": charge_id})

    wf_id = wf.start(order_flow, {"order": "o1"}, on_complete=done)
    app.drain()
    app.later(0.1)  # the retry of save
    assert "column 'charge_id' does not exist" in _failed(wf.status(wf_id))
    assert Counter(calls.items) == {"charge": 1, "email": 1, "save": 2}
    before = {s.name: s for s in wf.steps(wf_id)}

    fixed["v"] = True
    wf.restart(wf_id, from_step="save-order")
    assert wf.status(wf_id) == InProgress()
    app.drain()
    assert wf.wait(wf_id, timeout=5) == Completed(Success("saved ch_o1"))
    assert Counter(calls.items) == {"charge": 1, "email": 1, "save": 3}, "charge, email once"
    after = {s.name: s for s in wf.steps(wf_id)}
    assert list(after) == ["charge[0]", "email[0]", "save-order[0]"]
    assert after["charge[0]"] == before["charge[0]"], "kept as it was"
    assert after["save-order[0]"].state == "completed"
    assert after["save-order[0]"].run_id != before["save-order[0]"].run_id
    first, second = outcomes.items  # on_complete is delivered again for the new outcome
    assert isinstance(first, Failed) and "charge_id" in first.error
    assert second == Success("saved ch_o1")


def test_restart_a_canceled_workflow_from_a_sleep(app: App) -> None:
    r, wf = app.retrier, app.workflows
    calls = Calls()
    outcomes = Calls()

    @r.action
    def step(i: int) -> int:
        calls.add(i)
        return i

    @r.on_complete
    def done(run_id: str, result: Any, context: Any) -> None:
        outcomes.add(result)

    @wf.define
    async def job(ctx: WorkflowContext) -> int:
        one = await ctx.step("one", step, {"i": 1})
        await ctx.sleep("nap", 60)
        return one + await ctx.step("two", step, {"i": 2})

    wf_id = wf.start(job, on_complete=done)
    app.drain()
    wf.cancel(wf_id)
    app.drain()
    assert outcomes.items == [Canceled()]
    wf.restart(wf_id, "nap[0]")
    app.drain()
    assert wf.status(wf_id) == InProgress(), "asleep again, for a full minute"
    app.later(60)
    assert wf.wait(wf_id, timeout=5) == Completed(Success(3))
    assert calls.items == [1, 2]
    assert outcomes.items == [Canceled(), Success(3)]
    assert app.count_runs(state="pending") == 0


def test_restart_from_a_later_occurrence_and_again(app: App) -> None:
    r, wf = app.retrier, app.workflows
    calls = Calls()

    @r.action
    def fetch(i: int) -> int:
        calls.add(i)
        return i

    @wf.define
    async def loop(ctx: WorkflowContext) -> int:
        total = 0
        for i in range(3):
            total += await ctx.step("fetch", fetch, {"i": i})
        return total

    wf_id = wf.start(loop)
    app.drain()
    assert wf.status(wf_id) == Completed(Success(3))
    wf.restart(wf_id, "fetch[2]")
    app.drain()
    assert wf.status(wf_id) == Completed(Success(3))
    assert calls.items == [0, 1, 2, 2]
    wf.restart(wf_id, "fetch")  # its first call
    app.drain()
    assert calls.items == [0, 1, 2, 2, 0, 1, 2]
    assert [s.name for s in wf.steps(wf_id)] == ["fetch[0]", "fetch[1]", "fetch[2]"]


def test_restart_refuses_running_workflows_and_unknown_steps_writing_nothing(app: App) -> None:
    r, wf = app.retrier, app.workflows

    @r.action
    def noop() -> None: ...

    @wf.define
    async def job(ctx: WorkflowContext) -> None:
        await ctx.step("noop", noop)
        await ctx.sleep("nap", 60)

    wf_id = wf.start(job)
    app.drain()
    with pytest.raises(CannotRestart, match="is running; cancel it"):
        wf.restart(wf_id, "noop")
    app.later(60)
    before = wf.steps(wf_id)
    with pytest.raises(StepNotFound, match=r"no journaled step 'save'; its steps: 'noop\[0\]'"):
        wf.restart(wf_id, "save")
    with pytest.raises(StepNotFound):
        wf.restart(wf_id, "noop[1]")
    with pytest.raises(WorkflowNotFound):
        wf.restart("nope", "noop")
    assert wf.steps(wf_id) == before
    assert wf.status(wf_id) == Completed(Success(None))


def test_restart_runs_a_new_child_and_cancels_a_running_one(app: App) -> None:
    r, wf = app.retrier, app.workflows
    broken = {"v": True}

    @r.action
    def boom() -> str:
        if broken["v"]:
            raise RuntimeError("boom")
        return "fine"

    @wf.define(name="child")
    async def child(ctx: WorkflowContext, n: int) -> int:
        await ctx.sleep("nap", 60)
        return n

    @wf.define
    async def parent(ctx: WorkflowContext) -> list[Any]:
        kid = ctx.invoke("kid", child, {"n": 1})  # under way while boom runs
        done = await ctx.step("boom", boom, retry=False)
        return [await kid, done]

    wf_id = wf.start(parent)
    app.drain()
    assert "boom" in _failed(wf.status(wf_id))
    (old_kid,) = [w.id for w in wf.list(name="child")]
    assert wf.status(old_kid) == InProgress(), "a failed parent leaves its child"
    broken["v"] = False
    wf.restart(wf_id, "kid")
    assert wf.status(old_kid) == Completed(Canceled()), "the dropped invoke's child"
    app.drain()
    app.later(60)
    assert wf.status(wf_id) == Completed(Success([1, "fine"]))
    kids = {w.id: w.state for w in wf.list(name="child")}
    assert sorted(kids.values()) == ["canceled", "completed"]


def test_restart_cli(app: App, cli_app: str) -> None:
    r, wf = app.retrier, app.workflows
    flaky = {"fail": True}

    @r.action
    def save() -> str:
        if flaky["fail"]:
            raise RuntimeError("down")
        return "ok"

    @wf.define
    async def job(ctx: WorkflowContext) -> str:
        return await ctx.step("save", save, retry=False)

    wf_id = wf.start(job)
    app.drain()
    runner = CliRunner()
    flaky["fail"] = False
    bad = runner.invoke(main, ["--app", cli_app, "workflows", "restart", wf_id, "--from", "x"])
    assert bad.exit_code == 1 and "no journaled step 'x'" in bad.output
    ok = runner.invoke(main, ["--app", cli_app, "workflows", "restart", wf_id, "--from", "save"])
    assert ok.exit_code == 0, ok.output
    app.drain()
    assert wf.status(wf_id) == Completed(Success("ok"))


# -- divergence before anything new runs -------------------------------------------------------


def test_an_inserted_step_diverges_before_it_runs(app: App) -> None:
    r, wf = app.retrier, app.workflows
    calls = Calls()
    v = {"v": 1}

    @r.action
    def act(label: str) -> str:
        calls.add(label)
        return label

    @wf.define
    async def job(ctx: WorkflowContext) -> None:
        await ctx.step("a", act, {"label": "a"})
        if v["v"] == 2:
            await ctx.step("audit", act, {"label": "audit"})  # inserted
        await ctx.step("b", act, {"label": "b"})
        await ctx.sleep("nap", 60)

    wf_id = wf.start(job)
    app.drain()
    v["v"] = 2
    app.later(60)
    error = _failed(wf.status(wf_id))
    assert "the journal has step 'b[0]' (" in error and "new step 'audit[0]'" in error
    assert calls.items == ["a", "b"], "the inserted step never ran"


def test_a_removed_step_diverges(app: App) -> None:
    r, wf = app.retrier, app.workflows
    v = {"v": 1}

    @r.action
    def act() -> None: ...

    @wf.define
    async def job(ctx: WorkflowContext) -> None:
        await ctx.step("a", act)
        if v["v"] == 1:
            await ctx.step("b", act)
        await ctx.sleep("nap", 60)

    wf_id = wf.start(job)
    app.drain()
    v["v"] = 2
    app.later(60)
    assert "which this code no longer calls" in _failed(wf.status(wf_id))


def test_an_ending_before_the_journal_does_diverges(app: App) -> None:
    r, wf = app.retrier, app.workflows
    v = {"v": 1}

    @r.action
    def act() -> None: ...

    @wf.define
    async def job(ctx: WorkflowContext) -> None:
        await ctx.sleep("nap", 60)
        if v["v"] == 2:
            return
        await ctx.step("a", act)
        await ctx.sleep("nap-2", 60)

    wf_id = wf.start(job)
    app.drain()
    app.later(60)
    v["v"] = 2
    app.later(60)
    assert "the workflow ended before reaching step 'a[0]'" in _failed(wf.status(wf_id))


def test_renaming_a_journaled_step_diverges_without_running_it(app: App) -> None:
    r, wf = app.retrier, app.workflows
    calls = Calls()
    name = {"v": "charge"}

    @r.action
    def charge() -> str:
        calls.add("charge")
        return "ok"

    @wf.define
    async def job(ctx: WorkflowContext) -> None:
        await ctx.sleep("nap", 60)
        await ctx.step(name["v"], charge)
        await ctx.sleep("nap-again", 60)

    wf_id = wf.start(job)
    app.drain()
    app.later(60)
    name["v"] = "charge-v2"
    app.later(60)
    assert "new step 'charge-v2[0]'" in _failed(wf.status(wf_id))
    assert calls.items == ["charge"]


def test_steps_added_after_the_journal_run(app: App) -> None:
    r, wf = app.retrier, app.workflows
    calls = Calls()
    v = {"v": 1}

    @r.action
    def act(label: str) -> None:
        calls.add(label)

    @wf.define
    async def job(ctx: WorkflowContext) -> None:
        await ctx.step("a", act, {"label": "a"})
        await ctx.sleep("nap", 60)
        if v["v"] == 2:
            await ctx.step("b", act, {"label": "b"})

    wf_id = wf.start(job)
    app.drain()
    v["v"] = 2
    app.later(60)
    assert wf.status(wf_id) == Completed(Success(None))
    assert calls.items == ["a", "b"]


# -- patching ------------------------------------------------------------------------------


def test_patched_old_runs_replay_the_old_path_new_runs_take_the_new(app: App) -> None:
    r, wf = app.retrier, app.workflows
    calls = Calls()
    version = {"v": 1}

    @r.action
    def act(label: str) -> str:
        calls.add(label)
        return label

    @wf.define
    async def job(ctx: WorkflowContext, n: int) -> str:
        await ctx.step("a", act, {"label": f"a{n}"})
        if version["v"] == 1:
            saved = await ctx.step("save", act, {"label": f"save{n}"})
        elif version["v"] == 2:
            if ctx.patched("fix-42"):
                saved = await ctx.step("save-v2", act, {"label": f"save-v2-{n}"})
            else:
                saved = await ctx.step("save", act, {"label": f"save{n}"})
        else:
            ctx.deprecate_patch("fix-42")
            saved = await ctx.step("save-v2", act, {"label": f"save-v2-{n}"})
        await ctx.sleep("nap", 60)
        return saved

    old = wf.start(job, {"n": 1})
    app.drain()
    version["v"] = 2
    new = wf.start(job, {"n": 2})
    app.drain()
    assert [s.kind for s in wf.steps(new)] == ["step", "patch", "step", "sleep"]
    assert wf.check().ok
    version["v"] = 3
    report = wf.check()
    assert [(p.workflow_id, p.kind) for p in report.problems] == [(old, "diverged")], (
        "deprecating the patch breaks the run started before it"
    )
    version["v"] = 2
    newest = wf.start(job, {"n": 3})
    app.drain()
    app.later(60)
    assert wf.status(old) == Completed(Success("save1"))
    assert wf.status(new) == Completed(Success("save-v2-2"))
    assert wf.status(newest) == Completed(Success("save-v2-3"))
    assert sorted(calls.items) == sorted(["a1", "save1", "a2", "save-v2-2", "a3", "save-v2-3"])
    version["v"] = 3  # once no old run is left
    last = wf.start(job, {"n": 4})
    app.drain()
    assert [s.kind for s in wf.steps(last)] == ["step", "step", "sleep"]
    assert wf.check().ok


def test_a_patch_decided_at_the_frontier_is_kept_across_replays(app: App) -> None:
    r, wf = app.retrier, app.workflows
    seen = Calls()

    @r.action
    def act() -> None: ...

    @wf.define
    async def job(ctx: WorkflowContext) -> None:
        await ctx.step("a", act)
        first = ctx.patched("p")
        seen.add((first, ctx.patched("p")))
        await ctx.sleep("nap", 60)
        seen.add(("after", ctx.patched("p")))

    wf_id = wf.start(job)
    app.drain()
    app.later(60)
    assert wf.status(wf_id) == Completed(Success(None))
    assert seen.items == [(True, True), (True, True), ("after", True)]
    assert [s.name for s in wf.steps(wf_id)] == ["a[0]", "p@patch", "nap[0]"]


# -- workflows check ------------------------------------------------------------------------


def _order_app(app: App) -> dict[str, int]:
    r, wf = app.retrier, app.workflows
    version = {"v": 1}

    @r.action
    def act(label: str) -> str:
        return label

    @wf.define(name="ordered")
    async def ordered(ctx: WorkflowContext) -> None:
        if version["v"] == 2:  # a changed step order
            await ctx.step("email", act, {"label": "e"})
            await ctx.step("charge", act, {"label": "c"})
        else:
            await ctx.step("charge", act, {"label": "c"})
            if version["v"] == 3 and ctx.patched("audit"):  # an added patch
                await ctx.step("audit", act, {"label": "a"})
            await ctx.step("email", act, {"label": "e"})
        await ctx.sleep("nap", 60)

    return version


def test_check_reports_a_changed_order_and_accepts_an_added_patch(app: App) -> None:
    wf = app.workflows
    version = _order_app(app)
    ids = [wf.start("ordered") for _ in range(2)]
    app.drain()
    assert wf.check() == CheckReport(2, [])
    version["v"] = 2
    report = wf.check()
    assert not report.ok and report.checked == 2
    assert sorted(p.workflow_id for p in report.problems) == sorted(ids)
    p = report.problems[0]
    assert (p.kind, p.step) == ("diverged", "charge[0]")
    assert p.expected.startswith("step 'charge[0]' (") and p.found.startswith("step 'email[0]'")
    version["v"] = 3
    assert wf.check().ok
    assert all(wf.status(i) == InProgress() for i in ids), "check writes nothing"
    assert [s.name for s in wf.steps(ids[0])] == ["charge[0]", "email[0]", "nap[0]"]


def test_check_reports_an_undefined_workflow_and_a_failing_replay(
    app: App, make_retrier: MakeRetrier
) -> None:
    r, wf = app.retrier, app.workflows
    mode = {"v": "ok"}

    @r.action
    def act() -> int:
        return 1

    @wf.define(name="fragile")
    async def fragile(ctx: WorkflowContext) -> None:
        n = await ctx.step("a", act)
        if mode["v"] == "bug":
            raise KeyError(n)
        await ctx.sleep("nap", 60)

    wf_id = wf.start(fragile)
    app.drain()
    mode["v"] = "bug"
    (p,) = wf.check().problems
    assert (p.workflow_id, p.kind, p.detail) == (wf_id, "fails", "KeyError: 1")
    from workflow import WorkflowManager

    other = WorkflowManager(Workpool(make_retrier(), "steps"))  # defines nothing
    (p,) = other.check().problems
    assert (p.kind, p.found) == ("undefined", "not defined")


def test_check_cli_exit_codes(app: App, cli_app: str) -> None:
    wf = app.workflows
    version = _order_app(app)
    wf_id = wf.start("ordered")
    app.drain()
    runner = CliRunner()
    version["v"] = 3
    ok = runner.invoke(main, ["--app", cli_app, "workflows", "check"])
    assert ok.exit_code == 0, ok.output
    assert "1 unfinished workflow(s) checked, 0 problem(s)" in ok.output
    version["v"] = 2
    bad = runner.invoke(main, ["--app", cli_app, "workflows", "check"])
    assert bad.exit_code == 1, bad.output
    assert "1 problem(s)" in bad.output
    as_json = runner.invoke(main, ["--app", cli_app, "workflows", "check", "--json"])
    assert as_json.exit_code == 1
    body = json.loads(as_json.output)
    assert body["checked"] == 1
    assert body["problems"][0]["workflow_id"] == wf_id
    assert body["problems"][0]["step"] == "charge[0]"


@pytest.fixture
def cli_app(app: App) -> Iterator[str]:
    """A module the CLI's --app can import, holding this test's manager."""
    name = f"lifecycle_app_{id(app)}"
    module = types.ModuleType(name)
    module.workflows = app.workflows  # type: ignore[attr-defined]
    sys.modules[name] = module
    yield f"{name}:workflows"
    del sys.modules[name]


def test_restart_waits_for_a_driver_still_finishing_then_refuses(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy import update

    from retrier._tables import runs
    from workflow import _restart

    r, wf = app.retrier, app.workflows

    @r.action
    def noop() -> None: ...

    @wf.define
    async def job(ctx: WorkflowContext) -> None:
        await ctx.step("noop", noop)

    wf_id = wf.start(job)
    app.drain()
    assert wf.status(wf_id) == Completed(Success(None))
    drivers = (runs.c.owner == wf_id) & runs.c.fn.startswith("tiers.workflow.drive:")
    with r.engine.begin() as conn:  # as if its last pass were still being recorded
        conn.execute(update(runs).where(drivers).values(state="running"))
    monkeypatch.setattr(_restart, "_DRIVER_PATIENCE_S", 0.05)
    with pytest.raises(CannotRestart, match="still finishing its last pass"):
        wf.restart(wf_id, "noop")
    with r.engine.begin() as conn:
        conn.execute(update(runs).where(drivers).values(state="completed"))
    wf.restart(wf_id, "noop")
    app.drain()
    assert [s.state for s in wf.steps(wf_id)] == ["completed"]


def test_restart_cancels_the_pending_retry_of_a_dropped_step(app: App) -> None:
    r, wf = app.retrier, app.workflows
    slow_calls = Calls()
    broken = {"v": True}

    @r.action
    def slow() -> str:
        slow_calls.add(1)
        if len(slow_calls.items) == 1:
            raise RuntimeError("flaky")  # its retry waits 100 ms in the pool
        return "slow ok"

    @r.action
    def boom() -> str:
        if broken["v"]:
            raise RuntimeError("boom")
        return "boom ok"

    @wf.define
    async def job(ctx: WorkflowContext) -> list[str]:
        first = ctx.step("slow", slow)  # under way while boom runs
        second = await ctx.step("boom", boom, retry=False)
        return [await first, second]

    wf_id = wf.start(job)
    app.drain()
    assert "boom" in _failed(wf.status(wf_id))
    assert app.count_runs(state="pending", owner=wf_id) == 1, "slow's retry"
    broken["v"] = False
    wf.restart(wf_id, "slow")
    app.drain()
    app.later(0.1)
    assert wf.status(wf_id) == Completed(Success(["slow ok", "boom ok"]))
    assert len(slow_calls.items) == 2, "the dropped step's retry never ran"
    assert app.count_runs(state="pending") == 0
