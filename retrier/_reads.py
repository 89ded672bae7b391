"""Reading runs, their attempts and queues: what status, waits and the command
line show. Nothing here writes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select

from ._dialects import Dialect, reconnecting
from ._errors import RunNotFound
from ._models import PENDING, RUNNING, AttemptRow, RunRow
from ._run_types import QueueLimits
from ._tables import attempts_t, chunks, in_state, limits_of, queues_t, runs, workers_t


@dataclass(slots=True)
class Gauges:
    """What the metrics' gauges show, read in one transaction."""

    pending: dict[str, int] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)
    oldest_due_age_ms: dict[str, int] = field(default_factory=dict)
    max_parallelism: dict[str, int] = field(default_factory=dict)
    live_workers: int = 0


@dataclass(frozen=True, slots=True)
class WorkersSeen:
    """Workers alive now, and the last heartbeat of any worker still on record."""

    live: int
    last_heartbeat_ms: int | None


class Reads:
    """Reads of runs, attempts and queues for status, waits, listings and tools:
    short read transactions, each tried once more on a fresh connection."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect

    def unfinished(self, *conditions: Any, limit: int | None = None) -> list[str]:
        """Ids of pending and running runs matching `conditions`, running ones first
        (they hold slots), at most `limit`."""
        stmt = (
            select(runs.c.id)
            .where(in_state(PENDING, RUNNING), *conditions)
            .order_by(runs.c.state.desc())
        )
        if limit is not None:
            stmt = stmt.limit(limit)
        with self.dialect.read() as conn:
            return list(conn.execute(stmt).scalars())

    def get(self, run_id: str) -> RunRow:
        rows = self.get_many([run_id])
        if run_id not in rows:
            raise RunNotFound(run_id)
        return rows[run_id]

    @reconnecting
    def get_many(self, run_ids: Iterable[str]) -> dict[str, RunRow]:
        ids = list(run_ids)
        found: dict[str, RunRow] = {}
        with self.dialect.read() as conn:
            for chunk in chunks(ids, 500):
                for row in conn.execute(select(runs).where(runs.c.id.in_(chunk))).mappings():
                    found[row["id"]] = RunRow.model_validate(dict(row))
        return found

    @reconnecting
    def states(self, run_ids: Iterable[str]) -> dict[str, str]:
        """Just the state of each run; cheap enough to poll."""
        ids = list(run_ids)
        out: dict[str, str] = {}
        with self.dialect.read() as conn:
            for chunk in chunks(ids, 500):
                stmt = select(runs.c.id, runs.c.state).where(runs.c.id.in_(chunk))
                out.update({r.id: r.state for r in conn.execute(stmt)})
        return out

    @reconnecting
    def attempts(self, run_id: str) -> list[AttemptRow]:
        with self.dialect.read() as conn:
            rows = conn.execute(
                select(attempts_t)
                .where(attempts_t.c.run_id == run_id)
                .order_by(attempts_t.c.number, attempts_t.c.id)
            ).mappings()
            return [AttemptRow.model_validate(dict(r)) for r in rows]

    @reconnecting
    def list_runs(
        self,
        *,
        state: str | None = None,
        fn: str | None = None,
        queue: str | None = None,
        owner: str | None = None,
        limit: int = 50,
    ) -> list[RunRow]:
        stmt = select(runs).order_by(runs.c.created_ms.desc()).limit(limit)
        if state is not None:
            stmt = stmt.where(runs.c.state == state)
        if fn is not None:
            stmt = stmt.where(runs.c.fn == fn)
        if queue is not None:
            stmt = stmt.where(runs.c.queue == queue)
        if owner is not None:
            stmt = stmt.where(runs.c.owner == owner)
        with self.dialect.read() as conn:
            return [RunRow.model_validate(dict(r)) for r in conn.execute(stmt).mappings()]

    @reconnecting
    def get_queue(self, name: str) -> QueueLimits | None:
        with self.dialect.read() as conn:
            row = conn.execute(select(queues_t).where(queues_t.c.name == name)).first()
        return limits_of(row) if row is not None else None

    @reconnecting
    def list_queues(self) -> list[QueueLimits]:
        with self.dialect.read() as conn:
            rows = conn.execute(select(queues_t).order_by(queues_t.c.name)).all()
        return [limits_of(r) for r in rows]

    @reconnecting
    def queue_counts(self, name: str, since_ms: int) -> dict[str, int]:
        """Running, pending and recently failed counts of one queue."""
        with self.dialect.read() as conn:
            by_state: dict[str, int] = dict(
                conn.execute(
                    select(runs.c.state, func.count())
                    .where(runs.c.queue == name, in_state(PENDING, RUNNING))
                    .group_by(runs.c.state)
                ).all()
            )
            failed = conn.execute(
                select(func.count()).where(
                    attempts_t.c.queue == name,
                    attempts_t.c.outcome.in_(("failed", "lost")),
                    attempts_t.c.finished_ms >= since_ms,
                )
            ).scalar()
        return {
            "running": int(by_state.get(RUNNING, 0)),
            "pending": int(by_state.get(PENDING, 0)),
            "failed": int(failed or 0),
        }

    @reconnecting
    def gauges(self, now: int) -> Gauges:
        """Per queue: pending and running runs, the age of the oldest due run not
        started, pools' caps; and how many workers are alive."""
        out = Gauges()
        with self.dialect.read() as conn:
            for queue, state, n in conn.execute(
                select(runs.c.queue, runs.c.state, func.count())
                .where(in_state(PENDING, RUNNING))
                .group_by(runs.c.queue, runs.c.state)
            ):
                (out.pending if state == PENDING else out.running)[queue or ""] = int(n)
            for queue, due in conn.execute(
                select(runs.c.queue, func.min(runs.c.due_ms))
                .where(in_state(PENDING), runs.c.due_ms <= now)
                .group_by(runs.c.queue)
            ):
                out.oldest_due_age_ms[queue or ""] = max(0, now - int(due))
            for name, cap in conn.execute(
                select(queues_t.c.name, queues_t.c.max_parallelism).where(
                    queues_t.c.max_parallelism.is_not(None)
                )
            ):
                out.max_parallelism[name] = int(cap)
            out.live_workers = self._live(conn, now)
        return out

    @reconnecting
    def workers_seen(self, now: int) -> WorkersSeen:
        with self.dialect.read() as conn:
            last = conn.execute(select(func.max(workers_t.c.heartbeat_ms))).scalar()
            return WorkersSeen(self._live(conn, now), None if last is None else int(last))

    def _live(self, conn: Any, now: int) -> int:
        return int(
            conn.execute(
                select(func.count()).where(
                    workers_t.c.heartbeat_ms + 3 * workers_t.c.lease_ms >= now
                )
            ).scalar()
            or 0
        )
