"""Upgrade: a database written by release 94c3053, the last before versioned
migrations, is opened by the current code and everything in it completes.

The fixture (`tests/fixtures/db-94c3053/`, made by `tests/fixtures/make_94c3053.py`
with the old code) holds retrier runs, work items and workflows in every state the
old code could leave them in, dead workers' leases included. This test loads it,
upgrades the schema with the Alembic migrations (`upgrade`), sends the events the waiting
workflows need, then moves a FakeClock past every due time and lease and reaps and
drains until nothing is left to do, and checks that each one ended as
`tests/fixtures/load_94c3053.EXPECTED` says, with its on_complete delivered exactly
once, and that the pools kept their settings.

Each stage is a function of its own, for reuse by other upgrade tests.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, create_engine, inspect, select, text

from retrier import Canceled, Completed, FakeClock, InProgress, Retrier, RunStatus
from retrier._migrations import Migrations
from retrier._models import ENGINE_TABLES
from retrier.engine import QueueLimits, Store
from tests.fixtures import app_94c3053 as fx
from tests.fixtures.load_94c3053 import (
    EVENTS_IN_DUMP,
    EVENTS_TO_SEND,
    KEYED_WORKFLOW,
    UNCHECKED,
    Expected,
    Manifest,
    expected_outcomes,
    load,
    manifest,
)
from tests.support import drain
from workflow._models import TABLES as WORKFLOW_TABLES
from workpool import Finished

EXPECTED_LIMITS = {
    fx.POOL: QueueLimits(
        name=fx.POOL,
        max_parallelism=fx.POOL_MAX_PARALLELISM,
        rate_limit=fx.POOL_RATE_LIMIT[0],
        rate_period_ms=int(fx.POOL_RATE_LIMIT[1] / timedelta(milliseconds=1)),
        max_per_key=fx.POOL_MAX_PER_KEY,
        max_per_worker=fx.POOL_MAX_PER_WORKER,
    ),
    fx.WF_POOL: QueueLimits(name=fx.WF_POOL, max_parallelism=fx.WF_POOL_MAX_PARALLELISM),
}
"""The limits the fixture's pools were stored with by the old code."""

OLD_TABLES = {
    "tiers_meta", "tiers_runs", "tiers_attempts", "tiers_queues", "tiers_workflows",
    "tiers_workflow_steps", "tiers_workflow_events", "fx_effects",
}
"""The tables of a 94c3053 database with the fixture app's."""

MAX_ROUNDS = 30
"""Rounds of (reap, drain, a minute later) allowed to finish everything."""


def backend_of(db_url: str) -> str:
    return "sqlite" if db_url.startswith("sqlite") else "postgresql"


# -- stages ------------------------------------------------------------------------------------


def assert_as_dumped(db_url: str) -> None:
    """The loaded database has the schema of 94c3053: its tables, without what came
    later (the table tiers_workers, the columns tiers_attempts.traceback and
    tiers_workflows.unrunnable_since_ms)."""
    engine = create_engine(db_url)
    try:
        found = inspect(engine)
        assert set(found.get_table_names()) == OLD_TABLES
        assert "traceback" not in {c["name"] for c in found.get_columns("tiers_attempts")}
        assert "unrunnable_since_ms" not in {
            c["name"] for c in found.get_columns("tiers_workflows")
        }
    finally:
        engine.dispose()


def upgrade(db_url: str, clock: FakeClock) -> None:
    """Bring the loaded database's schema up to the current code's, as `tiers db
    upgrade` does: the Alembic migrations of every branch. The database predates
    migrations, so they first stamp it with the baseline revisions (what 94c3053
    created), then apply what came since."""
    store = Store(db_url, clock)
    try:
        migrations = Migrations()
        applied = store.migrate(migrations, list(migrations.branches))
        assert applied == [
            "engine_0002", "engine_0003", "engine_0004", "engine_0006", "engine_0007",
            "engine_0008", "engine_0009", "engine_0010", "workflow_0002", "workflow_0003",
            "workflow_0004", "workflow_0005", "workflow_0006", "workflow_0007",
            "workflow_0008",
        ], applied
        with store.dialect.read() as conn:
            assert migrations.current(conn) == {"engine_0010", "workflow_0008"}
    finally:
        store.dispose()


def check_as_left(db_url: str, clock: FakeClock, m: Manifest) -> None:
    """What the current code reads in the old database before anything runs: every
    entity's state and status, and the pools' limits (read before `build` constructs
    the pools, which would rewrite limits that differ)."""
    retrier = Retrier(db_url, clock=clock)
    try:
        store = retrier.store
        for name, e in expected_outcomes().items():
            entity_id = m.id(name)
            if e.tier == "workflow":
                state = _workflow_state(store, entity_id)
            else:
                state = store.get(entity_id).state
                assert_status_as_left(name, e, retrier.status(entity_id))
            assert state == e.dump_state, f"{name}: state {state!r}, expected {e.dump_state!r}"
        limits = {n: store.get_queue(n) for n in EXPECTED_LIMITS}
        assert limits == EXPECTED_LIMITS, f"pool limits as read: {limits}"
    finally:
        retrier.close()


def assert_status_as_left(name: str, e: Expected, status: RunStatus) -> None:
    """A run whose outcome is stored reads as that outcome (even while its on_complete
    waits); a cancel request reads as canceled at once; the rest are in progress."""
    if e.dump_state in ("pending", "running"):
        want: RunStatus = InProgress()
        if name == "r_cancel_requested":
            want = Completed(Canceled())
        assert status == want, f"{name}: {status}"
    else:
        assert isinstance(status, Completed), f"{name}: {status}"
        assert status.result.kind == e.kind, f"{name}: {status}"


def complete_everything(app: fx.App, clock: FakeClock) -> int:
    """Send the events the waiting workflows need, then move the clock a day (past
    every due time, timeout and lease) and reap and drain, a minute at a time, until
    nothing is left to do; returns how many rounds that took."""
    for name, data in EVENTS_TO_SEND:
        app.workflows.send_event(name, data)
    drain(app.retrier)  # what is due at the dump's time
    clock.advance(timedelta(days=1))
    for rounds in range(1, MAX_ROUNDS + 1):
        app.retrier.store.reap()
        drain(app.retrier)
        if not unfinished(app.retrier.engine):
            return rounds
        clock.advance(timedelta(minutes=1))
    left = unfinished(app.retrier.engine)
    raise AssertionError(f"not finished after {MAX_ROUNDS} rounds: {left}")


def assert_keyed_start(app: fx.App, m: Manifest) -> None:
    """A start with the key of a workflow the old code started returns that workflow."""
    name, key = KEYED_WORKFLOW
    again = app.workflows.start(
        "fx.wf.sleeper", {"order_id": "o-keyed", "minutes": 10}, idempotency_key=key
    )
    assert again == m.id(name)


def unfinished(engine: Engine) -> dict[str, int]:
    """Runs not completed, by state, and workflows still running."""
    with engine.connect() as conn:
        counts = {
            f"runs {state}": int(n)
            for state, n in conn.execute(
                text("SELECT state, count(*) FROM tiers_runs WHERE state <> 'completed'"
                     " GROUP BY state")
            )
        }
        running = conn.execute(
            text("SELECT count(*) FROM tiers_workflows WHERE state = 'running'")
        ).scalar()
    if running:
        counts["workflows running"] = int(running)
    return counts


def assert_outcomes(app: fx.App, m: Manifest, effects_in_dump: list[str]) -> None:
    """Every entity ended as expected; every on_complete ran exactly once; nothing is
    left leased or running; the pools kept their limits; the events are all kept."""
    expected = expected_outcomes()
    for name, e in expected.items():
        assert_outcome(app, name, e, m.id(name))
    assert_effects(app, m, effects_in_dump)
    want_notified = Counter(
        (m.id(n), e.kind, n) for n, e in expected.items()
        if e.handler == "fx.notify" and not e.delivered_in_dump
    )
    assert Counter(app.notified.snapshot()) == want_notified
    assert unfinished(app.retrier.engine) == {}
    with app.retrier.engine.connect() as conn:
        leased = conn.execute(
            text("SELECT count(*) FROM tiers_runs WHERE lease_owner IS NOT NULL")
        ).scalar()
        events = conn.execute(text("SELECT name, data FROM tiers_workflow_events ORDER BY id"))
        sent = [(r.name, _json(r.data)) for r in events]
    assert leased == 0
    assert sent[: len(EVENTS_IN_DUMP)] == list(EVENTS_IN_DUMP)
    assert sent[len(EVENTS_IN_DUMP):] == list(EVENTS_TO_SEND)
    limits = {n: app.retrier.store.get_queue(n) for n in EXPECTED_LIMITS}
    # The app constructed its pools again: they now start items by priority, with the
    # new release's default aging; every other limit is as the old code stored it.
    aged = {n: replace(lim, priority_aging_ms=60_000) for n, lim in EXPECTED_LIMITS.items()}
    assert limits == aged, f"pool limits at the end: {limits}"


def assert_outcome(app: fx.App, name: str, e: Expected, entity_id: str) -> None:
    """One run, item or workflow ended as `e` says."""
    if e.tier == "workflow":
        status = app.workflows.status(entity_id)
    else:
        status = app.retrier.status(entity_id)
    assert isinstance(status, Completed), f"{name}: {status}"
    result = status.result
    assert result.kind == e.kind, f"{name}: {result}"
    if e.value is not UNCHECKED:
        assert getattr(result, "value", None) == e.value, f"{name}: {result}"
    if e.error is not None:
        assert e.error in getattr(result, "error", ""), f"{name}: {result}"
    if e.tier == "item":
        assert app.pool.status(entity_id) == Finished(), name
    if e.attempts is not None:
        outcomes = tuple(a.outcome for a in app.retrier.store.attempts(entity_id))
        assert outcomes == e.attempts, f"{name}: attempts {outcomes}"


def assert_effects(app: fx.App, m: Manifest, effects_in_dump: list[str]) -> None:
    """fx.effect wrote one row per delivery it was given, exactly once, with the
    outcome; those the old code delivered were in the dump already."""
    expected = {m.id(n): (n, e) for n, e in expected_outcomes().items() if e.handler == "fx.effect"}
    with app.retrier.engine.connect() as conn:
        rows = conn.execute(select(app.effects)).all()
    assert Counter(r.subject for r in rows) == Counter(expected.keys()), "one per delivery"
    for row in rows:
        name, e = expected[row.subject]
        assert (row.label, row.kind) == (name, e.kind), row
        if e.kind == "success" and e.value is not UNCHECKED:
            assert row.value == json.dumps(e.value, sort_keys=True), row
        if e.error is not None:
            assert e.error in (row.value or ""), row
    in_dump = {s for s, (_, e) in expected.items() if e.delivered_in_dump}
    assert sorted(effects_in_dump) == sorted(in_dump)


def assert_schema_upgraded(engine: Engine) -> None:
    """Every table, column and index of the current models is in the database (the
    94c3053 schema lacks tiers_workers, tiers_attempts.traceback and
    tiers_workflows.unrunnable_since_ms, among what this checks)."""
    found = inspect(engine)
    names = set(found.get_table_names())
    for table in (*ENGINE_TABLES, *WORKFLOW_TABLES):
        assert table.name in names, f"no table {table.name}"
        columns = {c["name"] for c in found.get_columns(table.name)}
        missing = {c.name for c in table.columns} - columns
        assert not missing, f"{table.name} lacks {sorted(missing)}"
        indexes = {i["name"] for i in found.get_indexes(table.name)}
        missing = {str(i.name) for i in table.indexes} - indexes
        assert not missing, f"{table.name} lacks the indexes {sorted(missing)}"


def effect_subjects(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return [str(s) for s in conn.execute(text("SELECT subject FROM fx_effects")).scalars()]


def _workflow_state(store: Store, workflow_id: str) -> str:
    with store.engine.connect() as conn:
        state = conn.execute(
            text("SELECT state FROM tiers_workflows WHERE id = :id"), {"id": workflow_id}
        ).scalar()
    assert state is not None, f"no workflow {workflow_id}"
    return str(state)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


# -- the test ------------------------------------------------------------------------------------


def test_a_94c3053_database_upgrades_and_everything_in_it_completes(db_url: str) -> None:
    m = manifest()
    load(db_url, backend_of(db_url))
    assert_as_dumped(db_url)
    clock = FakeClock(m.clock_end_ms)
    upgrade(db_url, clock)
    check_as_left(db_url, clock, m)
    app = fx.build(db_url, clock)
    try:
        assert_schema_upgraded(app.retrier.engine)
        effects_in_dump = effect_subjects(app.retrier.engine)
        assert_keyed_start(app, m)
        complete_everything(app, clock)
        assert_outcomes(app, m, effects_in_dump)
        assert app.retrier.store.checked_out() == 0
    finally:
        app.close()
