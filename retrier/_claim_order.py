"""Claim order within one queue, and across queues.

Within a queue that sets `priority_aging_ms` (every workpool does), due runs start by
priority, higher first, with one exception that keeps low priorities from starving:
a run due for longer than the aging threshold starts before every run due after it,
in due order. So the order is: the aged runs (due <= now - aging) by due time, then
the rest by priority, then due time. A queue without it starts its runs in due order
(priority breaks ties).

Each part is read from an index in claim order (`ix_tiers_runs_queue_due` for the
aged runs, `ix_tiers_runs_queue_priority` for one priority level at a time, its
levels found by a loose scan): a claim's reads grow with the distinct priorities it
visits, not with the size of the queue.

Across queues, each queue's runs keep their order and the queues are merged by due
time (`merge_key`): the claim's `limit` goes to the runs due first, as it always did.
The PostgreSQL claim (`_pg_claim`) follows the same rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, Row, and_, bindparam, func, not_, select

from ._dialects import Dialect
from ._models import PENDING
from ._run_types import QueueLimits
from ._tables import CLAIM_COLUMNS, runs

MergeKey = tuple[int, int, int]


def merge_key_rows(ordinal: int, rows: Iterable[Row[Any]]) -> list[tuple[MergeKey, Row[Any]]]:
    """Each row of one queue (`ordinal`: its place among the queues) with the key that
    merges it with other queues' rows: (the latest due time up to and including it in
    its queue's order, the queue's ordinal, its position). Sorting by it is the merge
    of the queues' lists by the due time of their heads, which keeps each list's order."""
    keyed: list[tuple[MergeKey, Row[Any]]] = []
    latest: int | None = None
    for position, row in enumerate(rows):
        latest = row.due_ms if latest is None else max(latest, row.due_ms)
        keyed.append(((latest, ordinal, position), row))
    return keyed


def aging_of(limits: QueueLimits | None) -> int | None:
    """The aging threshold a queue's claim order uses (None or 0: due order)."""
    return limits.priority_aging_ms if limits is not None else None


class QueueOrder:
    """Reads one queue's due pending runs in claim order, locked as a claim locks them."""

    def __init__(self, dialect: Dialect, runnable: Any) -> None:
        self.dialect = dialect
        self._runnable = runnable  # the claim's filter of runs a worker can run

    def fetch(
        self,
        conn: Connection,
        queue: str,
        aging_ms: int | None,
        n: int,
        params: dict[str, Any],
        full_keys: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> list[Row[Any]]:
        """Up to `n` due pending runs of `queue` in claim order, leaving out runs of
        `full_keys` and the runs `exclude` names. `params`: now and the runnable filter."""
        where = [
            runs.c.queue == bindparam("queue"),
            runs.c.state == PENDING,
            runs.c.due_ms <= bindparam("now"),
            self._runnable,
        ]
        if full_keys:
            where.append(not_(and_(runs.c.key.is_not(None), runs.c.key.in_(list(full_keys)))))
        if exclude:
            where.append(runs.c.id.not_in(list(exclude)))
        base = select(*CLAIM_COLUMNS).where(*where)
        bound = {"queue": queue, **params}
        if not aging_ms:
            stmt = base.order_by(runs.c.due_ms, runs.c.priority.desc()).limit(n)
            return list(conn.execute(self.dialect.lock_for_claim(stmt), bound))
        aged_by = params["now"] - aging_ms
        aged = base.where(runs.c.due_ms <= aged_by)
        stmt = aged.order_by(runs.c.due_ms, runs.c.priority.desc()).limit(n)
        rows = list(conn.execute(self.dialect.lock_for_claim(stmt), bound))
        younger = base.where(runs.c.due_ms > aged_by)
        below: int | None = None
        while len(rows) < n:
            level = self._next_level(conn, queue, below)
            if level is None:
                break
            stmt = younger.where(runs.c.priority == level).order_by(runs.c.due_ms)
            stmt = stmt.limit(n - len(rows))
            rows.extend(conn.execute(self.dialect.lock_for_claim(stmt), bound))
            below = level
        return rows

    @staticmethod
    def _next_level(conn: Connection, queue: str, below: int | None) -> int | None:
        """The highest priority of the queue's pending runs, under `below` if given."""
        stmt = select(func.max(runs.c.priority)).where(
            runs.c.queue == queue, runs.c.state == PENDING
        )
        if below is not None:
            stmt = stmt.where(runs.c.priority < below)
        level = conn.execute(stmt).scalar()
        return None if level is None else int(level)
