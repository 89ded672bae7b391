"""What the retrier's pages read: counts, activity over the last hour, workers, runs
by filter. Read-only, short transactions; cheap enough to poll every 2 s (the counts
of finished runs cover the last hour only, through the retention index)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Integer, func, literal_column, not_, or_, select

from .._models import (
    CANCELED,
    COMPLETED,
    DELIVERING,
    ENGINE_TABLES,
    FAILED,
    FINISHING,
    PENDING,
    RUNNING,
    SUCCESS,
    RunRow,
    WorkerRow,
)
from .._store import Store
from .._tables import attempts_t, runs

HOUR_MS = 3_600_000
MINUTE_MS = 60_000

workers_t = next(t for t in ENGINE_TABLES if t.name == "tiers_workers")

# The runs page's state filter: the run states, and the outcomes of finished runs.
STATE_FILTERS: dict[str, ColumnElement[bool]] = {
    PENDING: runs.c.state == PENDING,
    RUNNING: runs.c.state == RUNNING,
    DELIVERING: runs.c.state.in_((DELIVERING, FINISHING)),
    COMPLETED: runs.c.state == COMPLETED,
    "succeeded": runs.c.outcome == SUCCESS,
    FAILED: runs.c.outcome == FAILED,
    CANCELED: or_(runs.c.outcome == CANCELED, runs.c.cancel_requested),
}


@dataclass(frozen=True, slots=True)
class Minute:
    """One minute of the last hour: runs that succeeded, attempts that failed."""

    start_ms: int
    succeeded: int
    failed: int


@dataclass(frozen=True, slots=True)
class Overview:
    unfinished: dict[str, int]  # pending (due / scheduled), running, delivering
    last_hour: dict[str, int]  # succeeded, failed, canceled (runs finished)
    oldest_due_ms: int | None  # the due time of the oldest run waiting to start
    minutes: list[Minute]


def _bucket(column: ColumnElement[int], since_ms: int) -> ColumnElement[Any]:
    """The minute of the last hour a time falls in (0-59), by integer division."""
    since = literal_column(str(int(since_ms)), BigInteger)
    return (column - since) // literal_column(str(MINUTE_MS), Integer)


def visible(hidden_prefixes: Sequence[str]) -> ColumnElement[bool] | None:
    """Runs not of the tiers' own machinery (None: no condition)."""
    if not hidden_prefixes:
        return None
    return not_(or_(*[runs.c.fn.startswith(p, autoescape=True) for p in hidden_prefixes]))


class Queries:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.dialect = store.dialect

    def overview(self, now_ms: int, hidden_prefixes: Sequence[str]) -> Overview:
        since = now_ms - HOUR_MS
        done_bucket = _bucket(runs.c.finished_ms, since)
        failed_bucket = _bucket(attempts_t.c.finished_ms, since)
        shown = [c for c in (visible(hidden_prefixes),) if c is not None]
        with self.dialect.read() as conn:
            unfinished = {PENDING: 0, "scheduled": 0, RUNNING: 0, DELIVERING: 0}
            # Inlined integers (not bound parameters), so that PostgreSQL sees the
            # grouped expression and the selected one as the same.
            due = runs.c.due_ms <= literal_column(str(int(now_ms)))
            for state, is_due, count in conn.execute(
                select(runs.c.state, due, func.count())
                .where(runs.c.state.in_((PENDING, RUNNING, DELIVERING, FINISHING)), *shown)
                .group_by(runs.c.state, due)
            ).all():
                if state == PENDING:
                    unfinished[PENDING if is_due else "scheduled"] += int(count)
                elif state == RUNNING:
                    unfinished[RUNNING] += int(count)
                else:
                    unfinished[DELIVERING] += int(count)
            last_hour = {"succeeded": 0, FAILED: 0, CANCELED: 0}
            for outcome, count in conn.execute(
                select(runs.c.outcome, func.count())
                .where(runs.c.state == COMPLETED, runs.c.finished_ms >= since, *shown)
                .group_by(runs.c.outcome)
            ).all():
                key = "succeeded" if outcome == SUCCESS else outcome
                if key in last_hour:
                    last_hour[key] += int(count)
            oldest = conn.execute(
                select(func.min(runs.c.due_ms)).where(runs.c.state == PENDING, due, *shown)
            ).scalar()
            done = conn.execute(
                select(done_bucket, func.count())
                .where(
                    runs.c.state == COMPLETED,
                    runs.c.finished_ms >= since,
                    runs.c.outcome == SUCCESS,
                    *shown,
                )
                .group_by(done_bucket)
            ).all()
            failed = conn.execute(
                select(failed_bucket, func.count())
                .where(
                    attempts_t.c.finished_ms >= since,
                    attempts_t.c.outcome.in_((FAILED, "lost")),
                )
                .group_by(failed_bucket)
            ).all()
        per_done = {int(b): int(c) for b, c in done}
        per_failed = {int(b): int(c) for b, c in failed}
        minutes = [
            Minute(since + i * MINUTE_MS, per_done.get(i, 0), per_failed.get(i, 0))
            for i in range(60)
        ]
        return Overview(unfinished, last_hour, None if oldest is None else int(oldest), minutes)

    def workers(self) -> list[WorkerRow]:
        with self.dialect.read() as conn:
            rows = conn.execute(
                select(workers_t).order_by(workers_t.c.host, workers_t.c.pid)
            ).mappings()
            return [WorkerRow.model_validate(dict(r)) for r in rows]

    def runs(
        self,
        *,
        state: str | None = None,
        fn: str | None = None,
        queue: str | None = None,
        hidden_prefixes: Sequence[str] = (),
        before_ms: int | None = None,
        limit: int = 100,
    ) -> list[RunRow]:
        conditions: list[Any] = []
        if state:
            conditions.append(STATE_FILTERS[state])
        if fn:
            conditions.append(runs.c.fn == fn)
        if queue is not None:
            conditions.append(runs.c.queue == queue)
        if (shown := visible(hidden_prefixes)) is not None:
            conditions.append(shown)
        if before_ms is not None:
            conditions.append(runs.c.created_ms < before_ms)
        stmt = (
            select(runs)
            .where(*conditions)
            .order_by(runs.c.created_ms.desc(), runs.c.id)
            .limit(limit)
        )
        with self.dialect.read() as conn:
            return [RunRow.model_validate(dict(r)) for r in conn.execute(stmt).mappings()]
