"""Claiming: leasing due runs to a worker, honouring every queue's limits.

A claim locks the limited queues' rows, reads in one statement what their budget
needs (`_Survey`), then fetches each open queue's first due runs and leases them.
Only runs of functions the worker has registered are claimed (`Runnable`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Boolean,
    Connection,
    Row,
    String,
    and_,
    bindparam,
    func,
    or_,
    select,
    text,
    update,
)

from ._claim_order import KeyTurns, MergeKey, QueueOrder, aging_of, merge_key_rows
from ._clock import Clock, SystemClock
from ._compiled import CompiledQuery, on_cursor
from ._dialects import Dialect, reconnecting
from ._group_budget import GROUP_ROWS
from ._limits import COUNTED_IN_QUEUE, LIMITED_QUEUES, ONE_QUEUE, Counted, QueueBudget
from ._models import CLAIMABLE, DELIVERING, FINISHING, PENDING, RUNNING
from ._run_types import ANYTHING, Claimed, Runnable
from ._tables import CLAIM_COLUMNS, IDS, in_state, runs

# Fetch rounds of one claim; each round after the first follows a queue running out.
_CLAIM_ROUNDS = 4


# The claimable runs a worker can run: pending runs of its functions, deliveries of
# its handlers (parameters from `Runnable.params`; `any_fn` lifts the filter).
_RUNNABLE = or_(
    bindparam("any_fn", type_=Boolean),
    and_(runs.c.state == PENDING, runs.c.fn.in_(bindparam("fns", expanding=True))),
    and_(
        runs.c.state == FINISHING,
        runs.c.on_complete.in_(bindparam("handlers", expanding=True)),
    ),
)


_RUNNABLE_SQL = (
    "(:any_fn OR (state = 'pending' AND fn IN :fns)"
    " OR (state = 'finishing' AND on_complete IN :handlers))"
)


_DUE_ORDERED = (
    select(*CLAIM_COLUMNS)
    .where(in_state(*CLAIMABLE), runs.c.due_ms <= bindparam("now"), _RUNNABLE)
    .order_by(runs.c.due_ms, runs.c.priority.desc())
)


_DUE_CANDIDATES = _DUE_ORDERED.limit(bindparam("limit"))


# Due deliveries of every queue (index ix_tiers_runs_finishing).
_DUE_DELIVERIES = (
    select(*CLAIM_COLUMNS)
    .where(in_state(FINISHING), runs.c.due_ms <= bindparam("now"), _RUNNABLE)
    .order_by(runs.c.due_ms)
    .limit(bindparam("limit"))
)


# What a claim of limited queues reads once it holds their rows' locks, in one round
# trip: the queues that have claimable runs (a loose index scan: one seek per queue),
# each limited queue's running count (and how many of those the claiming worker
# holds), the limited queues where some key has a cap of its own, whether any
# delivery is due, and the earliest claimable run due after now.
_CLAIM_SURVEY = text(
    "WITH RECURSIVE q(name) AS ("
    " SELECT (SELECT min(queue) FROM tiers_runs WHERE state IN ('pending', 'finishing'))"
    " UNION ALL"
    " SELECT (SELECT min(r.queue) FROM tiers_runs r"
    "         WHERE r.state IN ('pending', 'finishing') AND r.queue > q.name)"
    " FROM q WHERE q.name IS NOT NULL"
    ") SELECT 'queue' AS kind, name, 0 AS n, 0 AS mine FROM q WHERE name IS NOT NULL"
    " UNION ALL"
    " SELECT 'running', queue, count(*),"
    "  sum(CASE WHEN lease_owner = :worker THEN 1 ELSE 0 END) FROM tiers_runs"
    "  WHERE state = 'running' AND queue IN :names GROUP BY queue"
    " UNION ALL"
    " SELECT 'own', queue, 0, 0 FROM tiers_key_limits WHERE queue IN :names GROUP BY queue"
    " UNION ALL"
    " SELECT 'deliveries', '', count(*), 0 FROM (SELECT 1 AS one FROM tiers_runs"
    f"  WHERE state = 'finishing' AND due_ms <= :now AND {_RUNNABLE_SQL} LIMIT 1) AS due"
    " UNION ALL"
    " SELECT 'next', '', min(due_ms), 0 FROM tiers_runs"
    f"  WHERE state IN ('pending', 'finishing') AND due_ms > :now AND {_RUNNABLE_SQL}"
).bindparams(
    # Typed: an empty list renders as an empty set of that type.
    bindparam("names", expanding=True, type_=String),
    bindparam("fns", expanding=True, type_=String),
    bindparam("handlers", expanding=True, type_=String),
    bindparam("any_fn", type_=Boolean),
)


_NEXT_DUE_AFTER = select(func.min(runs.c.due_ms)).where(
    in_state(*CLAIMABLE), runs.c.due_ms > bindparam("now"), _RUNNABLE
)


_NEXT_DUE = select(func.min(runs.c.due_ms)).where(in_state(*CLAIMABLE), _RUNNABLE)


_START_RUNS = (
    update(runs)
    .where(runs.c.id.in_(IDS))
    .values(
        state=RUNNING,
        fence=runs.c.fence + 1,
        attempts=runs.c.attempts + 1,
        lease_owner=bindparam("worker"),
        lease_until_ms=bindparam("until"),
        started_ms=bindparam("now"),
    )
)


_START_DELIVERIES = (
    update(runs)
    .where(runs.c.id.in_(IDS))
    .values(
        state=DELIVERING,
        fence=runs.c.fence + 1,
        lease_owner=bindparam("worker"),
        lease_until_ms=bindparam("until"),
    )
)


# The claim as one server-side call, where the dialect has one (PostgreSQL); run with
# the driver's own parameters (no SQLAlchemy compilation on the hot path).
_SERVER_CLAIM = (
    "SELECT * FROM tiers_claim_v6(%(worker)s, %(limit)s, %(lease_ms)s, %(now)s, %(any_fn)s,"
    " %(fns)s::text[], %(handlers)s::text[], %(wall_clock)s)"
)


@dataclass(frozen=True, slots=True)
class _Survey:
    """What a claim of limited queues reads in one statement (`_CLAIM_SURVEY`) once it
    holds their locks."""

    queues: list[str]  # the queues that have claimable runs, due now or later
    counted: dict[str, Counted]  # each limited queue's running runs (of those that have)
    overridden: set[str]  # the limited queues where some key has a cap of its own
    deliveries: bool  # whether an on_complete delivery is due now
    next_due_ms: int | None  # the earliest claimable run due after now

    @classmethod
    def read(
        cls, conn: Connection, limited: list[str], worker: str, now: int, can_run: dict[str, Any]
    ) -> _Survey:
        queues: list[str] = []
        counted: dict[str, Counted] = {}
        overridden: set[str] = set()
        deliveries, next_due = False, None
        params = {"names": limited, "worker": worker, "now": now, **can_run}
        for kind, name, n, held in conn.execute(_CLAIM_SURVEY, params):
            if kind == "queue":
                queues.append(name)
            elif kind == "running":
                counted[name] = Counted(int(n), int(held))
            elif kind == "own":
                overridden.add(name)
            elif kind == "deliveries":
                deliveries = bool(n)
            elif n is not None:
                next_due = int(n)
        return cls(queues, counted, overridden, deliveries, next_due)


@dataclass(frozen=True, slots=True)
class _PlainClaim:
    """The statements of a claim, compiled for the driver (`CompiledQuery`)."""

    limited_queues: CompiledQuery
    due: CompiledQuery
    start_runs: CompiledQuery
    start_deliveries: CompiledQuery
    next_due_after: CompiledQuery


class Claims:
    """Claiming: leasing due runs to a worker, within every queue's limits."""

    def __init__(self, dialect: Dialect, clock: Clock) -> None:
        self.dialect = dialect
        self.clock = clock
        self._due_candidates = dialect.lock_for_claim(_DUE_CANDIDATES)
        self._order = QueueOrder(dialect, _RUNNABLE)
        self._turns = KeyTurns(dialect, _RUNNABLE)
        self._due_deliveries = dialect.lock_for_claim(_DUE_DELIVERIES)
        self._limited_queues = dialect.lock_rows(LIMITED_QUEUES)
        self._locked_groups = dialect.lock_rows(GROUP_ROWS)
        # A claim with no limited queue, as SQLite makes it every time it claims or
        # refills: on the driver, its statements' lists expanded once per size
        # (through SQLAlchemy, parameter work measured half of such a claim's CPU).
        sa_dialect = dialect.engine.dialect
        # An inline start's slot (`queue_has_room`), taken the same way.
        self._one_queue = CompiledQuery(dialect.lock_rows(ONE_QUEUE), sa_dialect)
        self._counted_in_queue = CompiledQuery(COUNTED_IN_QUEUE, sa_dialect)
        self._plain = _PlainClaim(
            limited_queues=CompiledQuery(self._limited_queues, sa_dialect),
            due=CompiledQuery(self._due_candidates, sa_dialect),
            start_runs=CompiledQuery(_START_RUNS, sa_dialect),
            start_deliveries=CompiledQuery(_START_DELIVERIES, sa_dialect),
            next_due_after=CompiledQuery(_NEXT_DUE_AFTER, sa_dialect),
        )

    def claim(
        self,
        worker: str,
        limit: int,
        lease_ms: int,
        runnable: Runnable = ANYTHING,
        *,
        at_ms: int | None = None,
    ) -> tuple[list[Claimed], int | None]:
        """Lease up to `limit` due runs that `runnable` covers, honouring every
        queue's limits.

        Returns the claimed runs and, if fewer than `limit` could start now, when
        the worker should look again: the next due time, or the moment a rate
        limit lets more start (None: only new work or freed slots can help).

        `at_ms`, a moment a few milliseconds ahead, makes the claim the one that
        would happen then (what is due by then, leases and starts stamped then): a
        worker that claims just before a backoff ends starts the run on time, and
        waits for `started_ms` before starting it.
        """
        if limit <= 0:
            return [], None
        if self.dialect.server_claim:  # one statement: no transaction to open and close
            with self.dialect.write_internal_one() as conn:
                return self._server_claim(conn, worker, limit, lease_ms, runnable, at_ms)
        with self.dialect.write_internal() as conn:
            return self.claim_in(conn, worker, limit, lease_ms, runnable, at_ms=at_ms)

    def claim_in(
        self,
        conn: Connection,
        worker: str,
        limit: int,
        lease_ms: int,
        runnable: Runnable,
        *,
        at_ms: int | None = None,
    ) -> tuple[list[Claimed], int | None]:
        """`claim`, inside the caller's write transaction."""
        if self.dialect.server_claim:
            return self._server_claim(conn, worker, limit, lease_ms, runnable, at_ms)
        plain = self._plain
        limits, now = QueueBudget.lock(conn, plain.limited_queues, clock=self.clock)
        now = now if at_ms is None else max(now, at_ms)
        survey: _Survey | None = None
        rate_retry_ms: int | None = None
        can_run = runnable.params()
        if limits:
            survey = _Survey.read(conn, list(limits), worker, now, can_run)
            budget = QueueBudget.build(
                conn, limits, survey.counted, survey.overridden, now, self._locked_groups
            )
            chosen = self._choose_limited(conn, budget, survey, limit, can_run)
            rate_retry_ms = budget.rate_retry_ms
            budget.log_key_starts(conn, [(r.queue, r.key) for r in chosen if r.state == PENDING])
        else:
            chosen = plain.due.rows(conn, {"now": now, "limit": limit, **can_run})
        until = now + lease_ms
        to_run = [r.id for r in chosen if r.state == PENDING]
        to_deliver = [r.id for r in chosen if r.state == FINISHING]
        lease = {"worker": worker, "until": until, "now": now}
        if to_run:
            plain.start_runs.execute(conn, {"ids": to_run, **lease})
        if to_deliver:
            plain.start_deliveries.execute(conn, {"ids": to_deliver, **lease})
        wake_at = rate_retry_ms
        if len(chosen) < limit:
            later = (
                survey.next_due_ms
                if survey is not None
                else plain.next_due_after.rows(conn, {"now": now, **can_run})[0][0]
            )
            if later is not None:
                wake_at = min(int(later), wake_at or int(later))
        claimed = [
            Claimed(
                id=r.id,
                fn=r.fn,
                args=r.args,
                state=RUNNING if r.state == PENDING else DELIVERING,
                fence=r.fence + 1,
                attempts=r.attempts + (1 if r.state == PENDING else 0),
                failures=r.failures,
                queue=r.queue,
                owner=r.owner,
                on_complete=r.on_complete,
                context=r.context,
                outcome=r.outcome,
                result=r.result,
                error=r.error,
                started_ms=now,
                trace=r.trace,
                due_ms=r.due_ms,
                timeout_ms=r.timeout_ms,
            )
            for r in chosen
        ]
        return claimed, wake_at

    def _server_claim(
        self,
        conn: Connection,
        worker: str,
        limit: int,
        lease_ms: int,
        runnable: Runnable,
        at_ms: int | None = None,
    ) -> tuple[list[Claimed], int | None]:
        """The same claim, as one call of the server's `tiers_claim_v6` (see `_pg_claim`)."""
        now = self.clock.now_ms()
        params = {
            "worker": worker,
            "limit": limit,
            "lease_ms": lease_ms,
            "now": now if at_ms is None else max(now, at_ms),
            "wall_clock": isinstance(self.clock, SystemClock),
            **runnable.params(),
        }
        claimed: list[Claimed] = []
        wake_at: int | None = None
        # On the driver's cursor: psycopg decodes every column (JSON included), and
        # SQLAlchemy's result would only wrap the rows (a third of the call's CPU).
        _, rows = on_cursor(conn, _SERVER_CLAIM, [params], conn.dialect, fetch=True)
        for (kind, run_id, fn, args, state, fence, attempts, failures, queue, owner,
             on_complete, context, outcome, result, error, wake_ms, trace, due_ms,
             timeout_ms) in rows:
            if kind == "wake":
                wake_at = wake_ms
                continue
            claimed.append(
                Claimed(
                    id=run_id,
                    fn=fn,
                    args=args,
                    state=state,
                    fence=fence,
                    attempts=attempts,
                    failures=failures,
                    queue=queue,
                    owner=owner,
                    on_complete=on_complete,
                    context=context,
                    outcome=outcome,
                    result=result,
                    error=error,
                    started_ms=wake_ms,
                    trace=trace,
                    due_ms=due_ms,
                    timeout_ms=timeout_ms,
                )
            )
        return claimed, wake_at

    def _choose_limited(
        self,
        conn: Connection,
        budget: QueueBudget,
        survey: _Survey,
        limit: int,
        can_run: dict[str, Any],
    ) -> list[Row[Any]]:
        """Due runs to claim when some queues have limits; uses `budget`'s slots.

        Each open queue gives its first due runs in its claim order (`_claim_order`),
        up to its free slots; the due deliveries come from their own fetch; the
        lists are merged by due time and the first `limit` claimed. Reading queue by
        queue, rather than `queue NOT IN (blocked)` on one index, does not read past
        every waiting run of the queues at their limit on every claim.
        """
        params = {"now": budget.now, **can_run}
        picked: list[tuple[MergeKey, Row[Any]]] = []
        if survey.deliveries:
            deliveries = conn.execute(self._due_deliveries, {"limit": limit, **params})
            picked.extend(merge_key_rows(0, deliveries))
        for ordinal, queue in enumerate(survey.queues, 1):
            if queue not in budget.blocked:
                rows = self._take_from(conn, budget, queue, limit, params)
                budget.started(queue, len(rows))
                picked.extend(merge_key_rows(ordinal, rows))
        picked.sort(key=lambda keyed: keyed[0])
        return [row for _, row in picked[:limit]]

    def _take_from(
        self,
        conn: Connection,
        budget: QueueBudget,
        queue: str,
        limit: int,
        params: dict[str, Any],
    ) -> list[Row[Any]]:
        """The runs of `queue` a claim of `limit` would take, in its claim order, within
        its slots. A key at its limit takes nothing more: its runs are left out of the
        fetch, fetched again (a few rounds) while keys fill up and slots remain."""
        lim = budget.limits.get(queue)
        want = limit if lim is None else min(budget.room(queue), limit)
        aging = aging_of(lim)
        if want <= 0:
            return []
        if lim is not None and lim.round_robin:
            return self._turns.take(conn, budget, queue, want, params)
        if not budget.keyed(queue):
            return self._order.fetch(conn, queue, aging, want, params)
        chosen: list[Row[Any]] = []
        for _ in range(_CLAIM_ROUNDS):
            over = want * 2 + 8
            full = budget.full_keys.get(queue, [])
            taken = [r.id for r in chosen]
            rows = self._order.fetch(conn, queue, aging, over, params, full, taken)
            for r in rows:
                if want <= 0:
                    break
                if budget.take(queue, r.key):
                    chosen.append(r)
                    want -= 1
            if want <= 0 or len(rows) < want * 2 + 8:
                break
        return chosen

    @reconnecting
    def next_due_ms(self, runnable: Runnable = ANYTHING) -> int | None:
        """The earliest due time of any claimable run that `runnable` covers."""
        with self.dialect.read() as conn:
            value = conn.execute(_NEXT_DUE, runnable.params()).scalar()
        return int(value) if value is not None else None

    def covers(self, conn: Connection, run_id: str, runnable: Runnable) -> bool:
        """Whether a claim by a worker that can run `runnable` would consider the run
        (its own filter, `_RUNNABLE`; for `explain`)."""
        stmt = select(runs.c.id).where(runs.c.id == bindparam("id"), _RUNNABLE)
        return conn.execute(stmt, {"id": run_id, **runnable.params()}).first() is not None

    def budget_of(self, conn: Connection, queue: str) -> QueueBudget:
        """The budget a claim would count for `queue` now, read without its lock (for
        `explain`: what a claim would find, not a promise)."""
        return QueueBudget.load(conn, (ONE_QUEUE, {"queue": queue}), self.clock, worker="")

    def queue_has_room(self, conn: Connection, queue: str, key: str | None, worker: str) -> bool:
        """Take a slot of `queue` (and of its `key`) for `worker`, if one is free now."""
        # Locks the queue's row as a claim does, so the two cannot both take its last slot
        # (a claim that may take this queue's runs locks its row), then its
        # group's row, as a claim does too: the group's members take its slots in turn.
        locked = (self._one_queue, {"queue": queue})
        # The run it starts is not stored yet: counted as due in its group's budget.
        budget = QueueBudget.load(
            conn, locked, self.clock, worker, self._locked_groups, arriving=queue,
            counted_in_queue=self._counted_in_queue,
        )
        if not budget.take(queue, key):
            return False
        budget.log_key_starts(conn, [(queue, key)])
        return True
