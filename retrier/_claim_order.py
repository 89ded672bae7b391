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
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Row, String, and_, bindparam, not_, select, update

from ._dialects import Dialect
from ._models import CLAIMABLE, PENDING
from ._run_types import QueueLimits
from ._tables import CLAIM_COLUMNS, in_state, queues_t, runs

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


@dataclass(frozen=True, slots=True)
class _Reads:
    """The statements of one queue's claim order, built once (SQLAlchemy then skips
    construction and cache-key work on the hot path)."""

    due: Any  # in due order, then priority
    aged: Any  # due at or before :aged_by, in due order
    level: Any  # of priority :level, due after :aged_by, in due order


# Seeks written as ORDER BY ... LIMIT 1 on an index's columns (not min/max), so the
# plan is a seek whatever the table's statistics say.
_TOP_LEVEL = (
    select(runs.c.priority)
    .where(runs.c.queue == bindparam("queue"), in_state(PENDING))
    .order_by(runs.c.priority.desc(), runs.c.due_ms)
    .limit(1)
)
_LEVEL_BELOW = _TOP_LEVEL.where(runs.c.priority < bindparam("below"))


class QueueOrder:
    """Reads one queue's due pending runs in claim order, locked as a claim locks them."""

    def __init__(self, dialect: Dialect, runnable: Any) -> None:
        self.dialect = dialect
        self._runnable = runnable  # the claim's filter of runs a worker can run
        self._plain = self._reads(filtered=False)
        self._filtered = self._reads(filtered=True)

    def _reads(self, filtered: bool) -> _Reads:
        # State predicates as literals, matching the partial indexes' own (`in_state`).
        where = [
            runs.c.queue == bindparam("queue"),
            in_state(PENDING),
            runs.c.due_ms <= bindparam("now"),
            self._runnable,
        ]
        if filtered:  # leaving out full keys' runs and runs already taken
            full = runs.c.key.in_(bindparam("full", expanding=True, type_=String))
            where.append(not_(and_(runs.c.key.is_not(None), full)))
            where.append(runs.c.id.not_in(bindparam("exclude", expanding=True, type_=String)))
        base = select(*CLAIM_COLUMNS).where(*where)
        # In due order: ix_tiers_runs_queue_due, whose predicate this one must name.
        by_due = base.where(in_state(*CLAIMABLE)).order_by(
            runs.c.due_ms, runs.c.priority.desc()
        )
        level = base.where(
            runs.c.due_ms > bindparam("aged_by"), runs.c.priority == bindparam("level")
        ).order_by(runs.c.due_ms)
        lock = self.dialect.lock_for_claim
        n: Any = bindparam("n")
        return _Reads(
            due=lock(by_due.limit(n)),
            aged=lock(by_due.where(runs.c.due_ms <= bindparam("aged_by")).limit(n)),
            level=lock(level.limit(n)),
        )

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
        bound = {"queue": queue, "n": n, **params}
        reads = self._plain
        if full_keys or exclude:
            reads = self._filtered
            bound.update(full=list(full_keys), exclude=list(exclude))
        if not aging_ms:
            return list(conn.execute(reads.due, bound))
        bound["aged_by"] = params["now"] - aging_ms
        rows = list(conn.execute(reads.aged, bound))
        below: int | None = None
        while len(rows) < n:
            level = self._next_level(conn, queue, below)
            if level is None:
                break
            bound.update(level=level, n=n - len(rows))
            rows.extend(conn.execute(reads.level, bound))
            below = level
        return rows

    @staticmethod
    def _next_level(conn: Connection, queue: str, below: int | None) -> int | None:
        """The highest priority of the queue's pending runs, under `below` if given."""
        if below is None:
            level = conn.execute(_TOP_LEVEL, {"queue": queue}).scalar()
        else:
            level = conn.execute(_LEVEL_BELOW, {"queue": queue, "below": below}).scalar()
        return None if level is None else int(level)


NO_KEY = ""
"""The group of a round-robin queue's runs without a key (no key is empty)."""

# The ring's seeks, on ix_tiers_runs_queue_key_due (see _TOP_LEVEL for the form).
_IN_KEY_ORDER = (
    select(runs.c.key)
    .where(runs.c.queue == bindparam("queue"), in_state(PENDING))
    .order_by(runs.c.key, runs.c.due_ms)
    .limit(1)
)
_KEYLESS = _IN_KEY_ORDER.where(runs.c.key.is_(None))
_NEXT_KEY = _IN_KEY_ORDER.where(runs.c.key > bindparam("after"))


class KeyTurns:
    """A round-robin queue's claim: its keys take turns, one run per key per turn.

    The keys form a ring (the runs without a key first, then the keys in order); a
    claim goes round it from where the last claim stopped (`tiers_queues.rr_cursor`,
    written under the queue's lock), taking each key's first due run (due order,
    then priority) while it has slots, until a lap finds nothing more. Each visit is
    an index seek or two; a claim makes at most `2 * slots + 8` of them, then fills
    its remaining slots in due order (so many keys with nothing due cannot leave
    slots idle while runs wait).
    """

    def __init__(self, dialect: Dialect, runnable: Any) -> None:
        self.dialect = dialect
        self._runnable = runnable
        self._order = QueueOrder(dialect, runnable)

    def take(
        self, conn: Connection, budget: Any, queue: str, want: int, params: dict[str, Any]
    ) -> list[Row[Any]]:
        """Up to `want` runs of `queue`, taken from `budget` (a `QueueBudget`)."""
        cursor = conn.execute(
            select(queues_t.c.rr_cursor).where(queues_t.c.name == queue)
        ).scalar()
        chosen: list[Row[Any]] = []
        seen: set[str] = set()
        dry: set[str] = set()
        at: str | None = cursor
        visits = 0
        while want > 0 and visits < want * 2 + 8:
            group = self._next_group(conn, queue, at)
            if group is None:
                if at is None:
                    break  # no pending run at all
                at = None  # past the last key: round again
                continue
            at = group
            if group in seen and seen == dry:
                break  # a whole lap found nothing more
            seen.add(group)
            if group in dry:
                continue
            visits += 1
            head = self._head(conn, queue, group, [r.id for r in chosen], params)
            if head is None or not budget.take(queue, head.key):
                dry.add(group)
                continue
            chosen.append(head)
            want -= 1
        if at != cursor:
            conn.execute(update(queues_t).where(queues_t.c.name == queue).values(rr_cursor=at))
        if want > 0 and visits >= want * 2 + 8:
            chosen.extend(self._fill(conn, budget, queue, want, params, chosen))
        return chosen

    def _fill(
        self,
        conn: Connection,
        budget: Any,
        queue: str,
        want: int,
        params: dict[str, Any],
        chosen: list[Row[Any]],
    ) -> list[Row[Any]]:
        full = budget.full_keys.get(queue, [])
        rows = self._order.fetch(conn, queue, None, want, params, full, [r.id for r in chosen])
        return [r for r in rows if budget.take(queue, r.key)]

    @staticmethod
    def _next_group(conn: Connection, queue: str, after: str | None) -> str | None:
        """The group after `after` in the ring (None: the first), None past the last."""
        if after is None:
            if conn.execute(_KEYLESS, {"queue": queue}).first() is not None:
                return NO_KEY
            after = NO_KEY
        found = conn.execute(_NEXT_KEY, {"queue": queue, "after": after}).scalar()
        return None if found is None else str(found)

    def _head(
        self,
        conn: Connection,
        queue: str,
        group: str,
        exclude: list[str],
        params: dict[str, Any],
    ) -> Row[Any] | None:
        """The group's first due run (due order, then priority), locked."""
        of_group = runs.c.key.is_(None) if group == NO_KEY else runs.c.key == group
        stmt = select(*CLAIM_COLUMNS).where(
            runs.c.queue == queue,
            in_state(PENDING),
            of_group,
            runs.c.due_ms <= bindparam("now"),
            self._runnable,
        )
        if exclude:
            stmt = stmt.where(runs.c.id.not_in(exclude))
        stmt = stmt.order_by(runs.c.due_ms, runs.c.priority.desc()).limit(1)
        return conn.execute(self.dialect.lock_for_claim(stmt), params).first()
