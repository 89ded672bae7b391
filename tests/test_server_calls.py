"""A step's start and a workflow's end on PostgreSQL as one server-side call each
(`workflow._server_calls`, `tiers_step_v1`, `tiers_finish_v1`): they write what the
general path writes, and leave to it, having written nothing, every case they do not
take."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import select, text, update

from retrier import Completed, Retrier, Success
from retrier._tables import new_row, runs
from retrier.engine import RUNNING, NewRun, running_values
from tests.support import drain, shapes_app
from workflow import WorkflowContext, WorkflowManager
from workflow._models import steps_t, workflows_t
from workflow._server_calls import ServerCalls
from workflow.migrations.versions import workflow_0005_step_function as step_v1
from workflow.migrations.versions import workflow_0007_step_handoff as step_v2

MakeRetrier = Callable[..., Retrier]
on_postgresql = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The outcome of each server-side call: 'took', 'pending' or the error's name."""
    seen: list[str] = []
    call = ServerCalls._call

    def counted(self: ServerCalls, *args: Any, **kwargs: Any) -> bool:
        try:
            took = call(self, *args, **kwargs)
        except Exception as exc:
            seen.append(type(exc).__name__)
            raise
        seen.append(("ended" if args[0].startswith("SELECT tiers_finish") else "took")
                    if took else "pending")
        return took

    monkeypatch.setattr(ServerCalls, "_call", counted)
    yield seen


def _build(
    make_retrier: MakeRetrier, *, server: bool, **pool_options: Any
) -> tuple[Retrier, WorkflowManager]:
    return shapes_app(make_retrier, server=server, **pool_options)


_VOLATILE_RUN = {"id", "owner", "created_ms", "started_ms", "finished_ms", "due_ms", "trace"}
_VOLATILE_STEP = {"id", "workflow_id", "run_id", "started_ms", "finished_ms"}


_VOLATILE_WORKFLOW = {"id", "created_ms", "finished_ms"}


def _stored(retrier: Retrier, wf_id: str) -> tuple[Any, ...]:
    """The row, step runs and journal entries of a workflow, without ids and times,
    in call order."""
    with retrier.engine.connect() as conn:
        workflow = {
            k: v
            for k, v in conn.execute(select(workflows_t).where(workflows_t.c.id == wf_id))
            .mappings()
            .one()
            .items()
            if k not in _VOLATILE_WORKFLOW
        }
        step_runs = [
            {k: v for k, v in r.items() if k not in _VOLATILE_RUN}
            | {"context": {**r["context"], "wf": "..."}}
            for r in conn.execute(
                select(runs).where(runs.c.owner == wf_id, runs.c.fn.like("%shape%"))
            ).mappings()
        ]
        step_runs.sort(key=lambda r: r["args"]["i"])
        entries = [
            {k: v for k, v in r.items() if k not in _VOLATILE_STEP}
            for r in conn.execute(
                select(steps_t).where(steps_t.c.workflow_id == wf_id)
                .order_by(steps_t.c.position)
            ).mappings()
        ]
        attempts = conn.execute(
            text(
                "SELECT number, queue, outcome FROM tiers_attempts WHERE run_id IN "
                "(SELECT id FROM tiers_runs WHERE owner = :wf AND fn LIKE '%shape%') "
                "ORDER BY started_ms, id"
            ),
            {"wf": wf_id},
        ).all()
    assert len(attempts) == len(step_runs)
    assert all(tuple(a) == (1, "steps", "success") for a in attempts), attempts
    return workflow, step_runs, entries


@on_postgresql
def test_the_server_start_writes_what_the_general_path_writes(
    make_retrier: MakeRetrier, calls: list[str]
) -> None:
    stored = []
    for server in (True, False):
        retrier, workflows = _build(make_retrier, server=server)
        wf_id = workflows.start("steps", {"n": 6})
        drain(retrier)
        assert workflows.status(wf_id) == Completed(
            Success([None, "text", {"i": 2, "nested": [1.5, True, None]}, 3, None, "text"])
        )
        stored.append(_stored(retrier, wf_id))
        # The general path's run calls no function.
        assert calls == ["took"] * 6 + ["ended"], calls
    assert stored[0] == stored[1]


@on_postgresql
def test_a_full_pool_leaves_the_step_pending(
    make_retrier: MakeRetrier, calls: list[str]
) -> None:
    """The pool's slots, counted under its lock: no room, the run waits in the pool."""
    retrier, workflows = _build(make_retrier, server=True, max_parallelism=1)
    with retrier.engine.begin() as conn:  # another worker holds the pool's one slot
        row = new_row(_new_run("held", "elsewhere"), 0)
        conn.execute(runs.insert(), [{**row, **running_values("other", 60_000, 0)}])
    wf_id = workflows.start("steps", {"n": 2})
    drain(retrier)
    assert calls[:1] == ["pending"]
    with retrier.engine.begin() as conn:
        conn.execute(update(runs).where(runs.c.id == "held").values(state="completed"))
    drain(retrier)
    assert workflows.status(wf_id) == Completed(Success([None, "text"]))


@on_postgresql
def test_a_pool_with_other_limits_takes_the_general_path_once_told(
    make_retrier: MakeRetrier, calls: list[str]
) -> None:
    """A rate limit (like a group or a key) is the general path's: the call refuses
    having written nothing, and the pool is not sent to it again."""
    retrier, workflows = _build(make_retrier, server=True, rate_limit=(100, 60))
    wf_id = workflows.start("steps", {"n": 4})
    drain(retrier)
    assert workflows.status(wf_id) == Completed(
        Success([None, "text", {"i": 2, "nested": [1.5, True, None]}, 3])
    )
    assert calls == ["_General", "ended"]
    entries = _stored(retrier, wf_id)[2]
    assert [e["name"] for e in entries] == ["s[0]", "s[1]", "s[2]", "s[3]"]


class _PoolLockHolder:
    """Another transaction holding a pool's row locked (as a worker's claim does),
    from `hold()` until `release()` or 5 s."""

    def __init__(self, retrier: Retrier, pool: str) -> None:
        self.retrier, self.pool = retrier, pool
        self.locked, self.released = threading.Event(), threading.Event()
        self.timed_out = False
        self._thread = threading.Thread(target=self._hold, daemon=True)

    def hold(self) -> None:
        self._thread.start()
        assert self.locked.wait(5)

    def release(self) -> None:
        self.released.set()
        self._thread.join(10)

    def _hold(self) -> None:
        with self.retrier.engine.begin() as conn:
            conn.execute(
                text("SELECT 1 FROM tiers_queues WHERE name = :q FOR UPDATE"), {"q": self.pool}
            )
            self.locked.set()
            self.timed_out = not self.released.wait(5)


@on_postgresql
def test_a_step_after_an_inline_step_of_its_pool_takes_over_its_slot_unlocked(
    make_retrier: MakeRetrier, calls: list[str]
) -> None:
    """Completing the previous inline step frees the slot the next step takes in the
    same transaction (no count changes), so the next step's start does not wait for
    the pool's lock (`tiers_step_v2`): here it is held elsewhere from the first step
    to the workflow's end."""
    retrier, workflows = _build(make_retrier, server=True)
    holder = _PoolLockHolder(retrier, "steps")

    @retrier.action
    def lock_the_pool() -> str:
        holder.hold()
        return "locked"

    @workflows.define
    async def three(ctx: WorkflowContext) -> list[Any]:
        first = await ctx.step("first", lock_the_pool, {})
        return [first] + [await ctx.step("s", "shape", {"i": i}) for i in (1, 3)]

    wf_id = workflows.start("three", {})
    drain(retrier)
    ended_while_held = not holder.released.is_set() and not holder.timed_out
    holder.release()
    assert ended_while_held, "a step's start waited for the pool's lock"
    assert calls == ["took"] * 3 + ["ended"], calls
    assert workflows.status(wf_id) == Completed(Success(["locked", "text", 3]))


@on_postgresql
def test_a_slot_taken_over_still_respects_a_lowered_cap(
    make_retrier: MakeRetrier, calls: list[str]
) -> None:
    """A pool whose cap was lowered while a step ran inline: the next step's start
    frees the slot but finds no room (another worker's run fills the new cap), so its
    run waits in the pool, as a start that locked the pool would have left it."""
    retrier, workflows = _build(make_retrier, server=True, max_parallelism=4)

    @retrier.action
    def lower_the_cap() -> str:
        with retrier.engine.begin() as conn:
            row = new_row(_new_run("held", "elsewhere"), 0)
            conn.execute(runs.insert(), [{**row, **running_values("other", 60_000, 0)}])
            conn.execute(text("UPDATE tiers_queues SET max_parallelism = 1 WHERE name = 'steps'"))
        return "lowered"

    @workflows.define
    async def two(ctx: WorkflowContext) -> list[Any]:
        return [await ctx.step("first", lower_the_cap, {}), await ctx.step("s", "shape", {"i": 1})]

    wf_id = workflows.start("two", {})
    drain(retrier)
    assert calls[:2] == ["took", "pending"], calls
    with retrier.engine.begin() as conn:
        conn.execute(update(runs).where(runs.c.id == "held").values(state="completed"))
    drain(retrier)
    assert workflows.status(wf_id) == Completed(Success(["lowered", "text"]))


def _canceled_meanwhile(make_retrier: MakeRetrier, *, server: bool) -> tuple[Any, Any]:
    """A workflow whose first step's run is asked to cancel while it runs inline:
    its status and journal once drained."""
    retrier, workflows = _build(make_retrier, server=server)

    @retrier.action
    def canceled_meanwhile() -> str:
        with retrier.engine.begin() as conn:
            conn.execute(
                update(runs)
                .where(runs.c.fn.like("%canceled_meanwhile%"), runs.c.state == RUNNING)
                .values(cancel_requested=True)
            )
        return "done"

    @workflows.define
    async def two(ctx: WorkflowContext) -> str:
        await ctx.step("first", canceled_meanwhile, {})
        return str(await ctx.step("second", "shape", {"i": 1}))

    wf_id = workflows.start("two", {})
    drain(retrier)
    return workflows.status(wf_id), workflows.steps(wf_id)


@on_postgresql
def test_a_previous_outcome_that_cannot_simply_complete_goes_the_general_way(
    make_retrier: MakeRetrier, calls: list[str]
) -> None:
    """A cancel requested while an inline step ran: the call refuses (nothing
    written) and the general path records the cancel, as it would have alone."""
    results = [_canceled_meanwhile(make_retrier, server=server) for server in (True, False)]
    assert "NotSimple" in calls
    (status_server, steps_server), (status_general, steps_general) = results
    assert status_server == status_general
    assert [(s.name, s.state) for s in steps_server] == [(s.name, s.state) for s in steps_general]


def _new_run(run_id: str, fn: str) -> NewRun:
    return NewRun(
        id=run_id, fn=fn, args={}, due_ms=0, initial_backoff_ms=0, base=2.0, max_failures=0,
        jitter=False, max_backoff_ms=0, queue="steps",
    )


def test_the_function_inserts_every_column_of_a_new_run() -> None:
    """A column added to new runs must be added to the function (a new version)."""
    plain = new_row(_new_run("x", "f"), 0)
    for function in (step_v1.STEP_FUNCTION, step_v2.STEP_FUNCTION):
        inserted = re.search(r"INSERT INTO tiers_runs \(([^)]*)\)", function)
        assert inserted is not None
        columns = {c.strip() for c in inserted.group(1).split(",")}
        assert set(plain) | set(running_values("w", 1, 0)) == columns


@on_postgresql
def test_an_end_the_function_leaves_to_the_general_path_writes_the_same(
    make_retrier: MakeRetrier, calls: list[str]
) -> None:
    """A workflow with an on_complete (like one with a deadline or a parent) ends the
    general way; a failed one ends in the function: both as the Python path ends them."""
    stored = [_two_ends(make_retrier, server=server) for server in (True, False)]
    assert "_General" in calls and "ended" in calls
    assert stored[0] == stored[1]


def _two_ends(make_retrier: MakeRetrier, *, server: bool) -> tuple[Any, ...]:
    """A workflow with an on_complete and one that fails, run to their ends: what
    they stored."""
    retrier, workflows = _build(make_retrier, server=server)
    handled: list[str] = []

    @retrier.on_complete
    def done(run_id: str, result: Any, context: Any) -> None:
        handled.append(run_id)

    @retrier.action
    def broken() -> None:
        raise ValueError("always")

    @workflows.define
    async def failing(ctx: WorkflowContext) -> None:
        await ctx.step("s", "shape", {"i": 1})
        await ctx.step("broken", broken, retry=False)

    with_handler = workflows.start("steps", {"n": 2}, on_complete=done)
    failed = workflows.start("failing")
    drain(retrier)
    assert handled == [with_handler]
    assert workflows.status(with_handler) == Completed(Success([None, "text"]))
    status = workflows.status(failed)
    assert isinstance(status, Completed) and "always" in str(status.result)
    return _stored(retrier, with_handler), _row(retrier, failed)


def _row(retrier: Retrier, wf_id: str) -> dict[str, Any]:
    with retrier.engine.connect() as conn:
        row = conn.execute(select(workflows_t).where(workflows_t.c.id == wf_id)).mappings().one()
    return {k: v for k, v in row.items() if k not in _VOLATILE_WORKFLOW}


@on_postgresql
def test_the_server_functions_plan_their_statements_once_per_session(
    make_retrier: MakeRetrier,
) -> None:
    """The claim (created at start-up) and the workflow entry points (workflow_0006)
    run with generic plans: under `auto` PL/pgSQL planned their statements anew at
    every call."""
    retrier, _ = _build(make_retrier, server=True)
    with retrier.store.dialect.read() as conn:
        settings = dict(
            conn.execute(
                text(
                    "SELECT p.proname, p.proconfig FROM pg_proc p"
                    " WHERE p.proname IN ('tiers_claim_v6', 'tiers_step_v1', 'tiers_step_v2',"
                    " 'tiers_finish_v1')"
                    " AND p.pronamespace = current_schema()::regnamespace"
                )
            ).all()
        )
    generic = ["plan_cache_mode=force_generic_plan"]
    assert settings == {
        # The claim also never scans tiers_runs whole, nor collects and sorts every
        # due run (`_pg_claim`).
        "tiers_claim_v6": [*generic, "enable_seqscan=off", "enable_bitmapscan=off", "jit=off"],
        **{name: generic for name in ("tiers_step_v1", "tiers_step_v2", "tiers_finish_v1")},
    }


@on_postgresql
def test_a_claim_planned_beside_an_empty_table_takes_a_backlog_in_due_order_by_index(
    make_retrier: MakeRetrier, db_url: str
) -> None:
    """A worker's session plans the claim once, at its first claim, often beside an
    empty table. With bitmap scans allowed that plan collected every due run and
    sorted them, at every later claim of the session (5.6 ms for 16 of 20,000)."""
    import psycopg

    retrier = make_retrier()

    @retrier.action
    def noop() -> None:
        pass

    claim = (
        "SELECT kind, id FROM tiers_claim_v6('w', 16, 30000, %s, true, '{}'::text[],"
        " '{}'::text[], true)"
    )
    with psycopg.connect(db_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        assert conn.execute(claim, (retrier.clock.now_ms(),)).fetchall() == [("wake", None)]
        conn.commit()
        with retrier.session() as session:
            ids = [retrier.run("noop", session=session) for _ in range(300)]
            session.commit()
        plans: list[str] = []
        conn.add_notice_handler(lambda notice: plans.append(notice.message_primary or ""))
        conn.execute("LOAD 'auto_explain'")
        for setting in ("log_min_duration = 0", "log_nested_statements = on",
                        "log_level = notice"):
            conn.execute(f"SET auto_explain.{setting}")
        claimed = conn.execute(claim, (retrier.clock.now_ms(),)).fetchall()
        conn.rollback()
    assert [run_id for kind, run_id in claimed if kind == "run"] == ids[:16]
    plan = "\n".join(plans)
    assert "Index Scan using ix_tiers_runs_claim" in plan, plan
    assert "Bitmap Heap Scan on tiers_runs" not in plan, plan
