"""Steps' starts and workflows' ends that a worker's drivers make in the same moment go
to PostgreSQL in one call (`workflow._batched_calls`, `ServerCalls.many`,
`tiers_batch_v1`): each is answered as if it had been made alone, one the call refuses
undoes only its own writes, and the lanes send what waits together, a few calls at a
time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DataError

from retrier import Completed, Retrier, Success
from retrier._tables import runs
from retrier.engine import RUNNING, NewRun
from tests.support import drain, shapes_app
from workflow import WorkflowManager
from workflow._batched_calls import MOST_CALLS, BatchedCalls
from workflow._journal_signals import Conflict, NotRunning
from workflow._models import steps_t, workflows_t
from workflow._server_calls import (
    MOST_PER_CALL,
    NotSimple,
    Previous,
    ServerCalls,
    StepStart,
    TryAlone,
)

MakeRetrier = Callable[..., Retrier]
on_postgresql = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


@pytest.fixture
def batch_sizes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[str]]]:
    """The items of each `many` call: "step" or "end" each."""
    sizes: list[list[str]] = []
    many = ServerCalls.many

    def counted(self: ServerCalls, items: list[Any]) -> str:
        sizes.append(["step" if isinstance(i, StepStart) else "end" for i in items])
        return many(self, items)

    monkeypatch.setattr(ServerCalls, "many", counted)
    yield sizes


def _build(make_retrier: MakeRetrier, *, batches: bool) -> tuple[Retrier, WorkflowManager]:
    return shapes_app(make_retrier, server=batches, concurrency=40, max_parallelism=100)


def _journal_and_runs(retrier: Retrier, wf_ids: list[str]) -> list[Any]:
    """Each workflow's row, journal entries and step runs, without ids and times."""
    found = []
    with retrier.engine.connect() as conn:
        for wf_id in wf_ids:
            workflow = conn.execute(
                select(workflows_t.c.state, workflows_t.c.result, workflows_t.c.error)
                .where(workflows_t.c.id == wf_id)
            ).one()
            entries = conn.execute(
                select(steps_t.c.name, steps_t.c.position, steps_t.c.state, steps_t.c.result,
                       steps_t.c.attempts)
                .where(steps_t.c.workflow_id == wf_id).order_by(steps_t.c.position)
            ).all()
            step_runs = conn.execute(
                select(runs.c.fn, runs.c.args, runs.c.state, runs.c.outcome, runs.c.result,
                       runs.c.attempts, runs.c.queue)
                .where(runs.c.owner == wf_id, runs.c.fn.like("%shape%"))
                .order_by(runs.c.created_ms, runs.c.id)
            ).all()
            attempts = conn.execute(
                text("SELECT count(*) FROM tiers_attempts WHERE run_id IN "
                     "(SELECT id FROM tiers_runs WHERE owner = :wf AND fn LIKE '%shape%')"),
                {"wf": wf_id},
            ).scalar_one()
            found.append((tuple(workflow), [tuple(e) for e in entries],
                          sorted((tuple(r) for r in step_runs), key=repr), attempts))
    return found


@on_postgresql
def test_steps_started_together_write_what_each_started_alone_writes(
    make_retrier: MakeRetrier, batch_sizes: list[list[str]]
) -> None:
    stored = []
    for batches in (True, False):
        retrier, workflows = _build(make_retrier, batches=batches)
        wf_ids = [workflows.start("steps", {"n": 5, "k": k}) for k in range(30)]
        drain(retrier)
        for k, wf_id in enumerate(wf_ids):
            expected = [[None, "text", {"i": i, "nested": [1.5, True, None]}, i][i % 4]
                        for i in range(k, k + 5)]
            assert workflows.status(wf_id) == Completed(Success(expected))
        stored.append(_journal_and_runs(retrier, wf_ids))
        if batches:
            # The drivers moved in step: their starts, and their ends, went together.
            sizes = [len(items) for items in batch_sizes]
            assert max(sizes) > 1 and sum(sizes) > 30 and max(sizes) <= MOST_PER_CALL, sizes
            ends = [items.count("end") for items in batch_sizes]
            assert max(ends) > 1 and sum(ends) <= 30, batch_sizes
    assert stored[0] == stored[1]


def _prepared(
    retrier: Retrier, server: ServerCalls, wf_id: str, *, name: str = "s[0]",
    previous: Previous | None = None, run_id: str | None = None,
) -> StepStart:
    new = NewRun(
        id=run_id or f"run-{wf_id[:8]}-{name}", fn="shape", args={"i": 1}, due_ms=0,
        initial_backoff_ms=250, base=2.0, max_failures=1, jitter=False,
        max_backoff_ms=60_000, queue="steps", owner=wf_id,
    )
    entry = {"name": name, "position": 0, "fn": "shape", "started_ms": 0}
    return server.prepare(wf_id, entry, new, "this-worker", 30_000, previous)


@on_postgresql
def test_an_item_refused_in_a_batch_undoes_only_its_own_writes(
    make_retrier: MakeRetrier,
) -> None:
    """Starts and ends in one call: a plain start; a start of a canceled workflow
    (TS002); one whose journal entry exists already (a conflict); one whose previous
    step's run does not stand as it says (TS001); one that fails with an error of its
    own (a run id too long for its column); a plain end; an end of a workflow that has
    ended (false); an end of a workflow with an on_complete (TS003). Only the plain
    start and end are written; each answer gives or raises what the item alone would
    have, and the erring one is made again alone, where its error is its own."""
    retrier, workflows = _build(make_retrier, batches=True)
    assert workflows._driver._batches is not None
    server = workflows._driver._batches.server
    plain, canceled, journaled, stale, bad, ending, ended, called_back = (
        workflows.start("steps", {"n": 1, "k": k}) for k in range(8)
    )
    workflows.cancel(canceled)
    workflows.cancel(ended)
    with retrier.engine.begin() as conn:
        conn.execute(steps_t.insert(), [{
            "workflow_id": journaled, "name": "s[0]", "position": 0, "kind": "step",
            "state": "running", "fn": "shape", "run_id": "elsewhere", "attempts": 0,
            "started_ms": 0,
        }])
        conn.execute(
            workflows_t.update().where(workflows_t.c.id == called_back)
            .values(on_complete="somebody")
        )
    items: list[Any] = [
        _prepared(retrier, server, plain),
        _prepared(retrier, server, canceled),
        _prepared(retrier, server, journaled),
        _prepared(retrier, server, stale, name="s[1]",
                  previous=Previous("no-such-run", 1, "x", 0, "s[0]")),
        _prepared(retrier, server, bad, run_id="x" * 41),
        server.prepare_end(ending, "completed", {"a": [1, None]}, None, "this-worker", None),
        server.prepare_end(ended, "completed", 1, None, "this-worker", None),
        server.prepare_end(called_back, "completed", 1, None, "this-worker", None),
    ]
    answers = server.many(items)
    assert answers == "r2c1etf3"
    claimed = server.answered(items[0], answers[0])
    assert claimed is not None and claimed.id == f"run-{plain[:8]}-s[0]"
    with pytest.raises(NotRunning):
        server.answered(items[1], answers[1])
    with pytest.raises(Conflict):
        server.answered(items[2], answers[2])
    with pytest.raises(NotSimple):
        server.answered(items[3], answers[3])
    with pytest.raises(TryAlone):
        server.answered(items[4], answers[4])
    with pytest.raises(DataError):
        server.one(items[4])
    assert server.answered(items[5], answers[5]) is True
    assert server.answered(items[6], answers[6]) is False
    with pytest.raises(NotSimple):
        server.answered(items[7], answers[7])
    with retrier.engine.connect() as conn:
        new_runs = conn.execute(
            select(runs.c.id, runs.c.state, runs.c.lease_owner).where(runs.c.fn == "shape")
        ).all()
        entries = conn.execute(
            select(steps_t.c.workflow_id, steps_t.c.name, steps_t.c.run_id)
        ).all()
        states = dict(conn.execute(select(workflows_t.c.id, workflows_t.c.state)).all())
        result = conn.execute(
            select(workflows_t.c.result).where(workflows_t.c.id == ending)
        ).scalar_one()
    assert new_runs == [(f"run-{plain[:8]}-s[0]", RUNNING, "this-worker")]
    assert sorted(entries) == sorted([
        (plain, "s[0]", f"run-{plain[:8]}-s[0]"), (journaled, "s[0]", "elsewhere"),
    ])
    assert states[ending] == "completed" and result == {"a": [1, None]}
    assert states[ended] == states[canceled] == "canceled"
    assert states[called_back] == states[plain] == "running"


class _FakeServer:
    """Answers starts at once ('r' each: the start's name), counting calls."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.under_way = 0
        self.most_under_way = 0
        self.fail: Exception | None = None

    def one(self, start: Any) -> Any:  # (the real one takes a StepStart or a WorkflowEnd)
        if self.fail is not None:
            raise self.fail
        return f"alone:{start}"

    def many(self, starts: list[Any]) -> str:
        if self.fail is not None:
            raise self.fail
        return "r" * len(starts)

    def answered(self, start: Any, answer: str) -> Any:
        if start.startswith("bad"):
            raise TryAlone  # an error of its own: made again alone
        return f"{answer}:{start}"


def _batches(fake: _FakeServer, gate: anyio.Event | None = None) -> BatchedCalls:
    async def call(fn: Callable[..., Any], sent: Any) -> Any:
        fake.calls.append(list(sent) if isinstance(sent, list) else [sent])
        fake.under_way += 1
        fake.most_under_way = max(fake.most_under_way, fake.under_way)
        try:
            if gate is not None:
                await gate.wait()
            await asyncio.sleep(0)
            return fn(sent)
        finally:
            fake.under_way -= 1

    return BatchedCalls(fake, call)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_starts_of_one_pass_go_as_one_call_and_a_lone_one_alone() -> None:
    fake = _FakeServer()
    batches = _batches(fake)
    got = await asyncio.gather(*(batches.make(f"s{i}") for i in range(5)))  # type: ignore[arg-type]
    assert got == [f"r:s{i}" for i in range(5)]
    assert fake.calls == [[f"s{i}" for i in range(5)]]
    assert await batches.make("lone") == "alone:lone"  # type: ignore[arg-type]
    assert fake.calls[-1] == ["lone"]


@pytest.mark.anyio
async def test_starts_asked_for_during_a_call_wait_for_it_and_go_together() -> None:
    """A call under way: the next starts wait for it (unless a full call's worth
    waits), so they go as one call; never more than MOST_CALLS calls at once."""
    fake = _FakeServer()
    gate = anyio.Event()
    batches = _batches(fake, gate)
    first = asyncio.ensure_future(batches.make("first"))  # type: ignore[arg-type]
    for _ in range(3):
        await asyncio.sleep(0)
    assert fake.under_way == 1
    rest = [asyncio.ensure_future(batches.make(f"s{i}")) for i in range(7)]  # type: ignore[arg-type]
    for _ in range(3):
        await asyncio.sleep(0)
    assert fake.calls == [["first"]]  # the seven wait for the call under way
    gate.set()
    assert await first == "alone:first"
    assert await asyncio.gather(*rest) == [f"r:s{i}" for i in range(7)]
    assert fake.calls[1] == [f"s{i}" for i in range(7)]

    fake.calls.clear()
    gate = anyio.Event()
    batches = _batches(fake, gate)
    many = [asyncio.ensure_future(batches.make(f"m{i}")) for i in range(MOST_PER_CALL * 6)]  # type: ignore[arg-type]
    for _ in range(5):
        await asyncio.sleep(0)
    assert fake.most_under_way == MOST_CALLS
    gate.set()
    await asyncio.gather(*many)
    assert all(len(c) <= MOST_PER_CALL for c in fake.calls)
    assert sum(len(c) for c in fake.calls) == MOST_PER_CALL * 6


@pytest.mark.anyio
async def test_a_start_with_an_error_of_its_own_is_made_again_alone() -> None:
    fake = _FakeServer()
    batches = _batches(fake)
    got = await asyncio.gather(*(batches.make(s) for s in ("s0", "bad", "s2")))  # type: ignore[arg-type]
    assert got == ["r:s0", "alone:bad", "r:s2"]
    assert fake.calls == [["s0", "bad", "s2"], ["bad"]]


@pytest.mark.anyio
async def test_a_failed_call_fails_each_of_its_starts() -> None:
    fake = _FakeServer()
    fake.fail = ConnectionError("the server went away")
    batches = _batches(fake)
    got = await asyncio.gather(
        *(batches.make(f"s{i}") for i in range(3)), return_exceptions=True  # type: ignore[arg-type]
    )
    assert [type(g) for g in got] == [ConnectionError] * 3


@pytest.mark.anyio
async def test_a_start_cancelled_while_its_call_is_under_way_waits_for_its_answer() -> None:
    fake = _FakeServer()
    gate = anyio.Event()
    batches = _batches(fake, gate)
    answer: list[Any] = []

    async def start() -> None:
        answer.append(await batches.make("s"))  # type: ignore[arg-type]

    async with anyio.create_task_group() as tg:
        tg.start_soon(start)
        for _ in range(3):
            await asyncio.sleep(0)
        tg.cancel_scope.cancel()
        gate.set()
    assert answer == ["alone:s"]  # its write is never left half-known
