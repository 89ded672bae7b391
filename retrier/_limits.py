"""Queue limits: how many more runs each limited queue (a pool) may start, within one
claim (or one inline start), counted under the lock of the queues' rows.

Where a new limit goes: a field of `QueueLimits` (and its column in `QueueRow`, by a
migration), then, for a limit on the whole queue, one `Rule` in `QUEUE_RULES`; the
locking query, the stored values and the budget all follow from those.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Select, bindparam, case, func, or_, select

from ._clock import Clock
from ._models import RUNNING
from ._run_types import QueueLimits
from ._tables import attempts_t, in_state, limits_of, queues_t, runs

LIMIT_FIELDS = tuple(f.name for f in dataclasses.fields(QueueLimits) if f.name != "name")
"""The settings of a queue, as stored in `tiers_queues`."""

# One queue's limits, to lock its row (its budget is then counted in statements of
# their own, see QueueBudget.lock).
ONE_QUEUE = select(queues_t).where(queues_t.c.name == bindparam("queue"))
# Every queue with any limit set: what a claim locks.
LIMITED_QUEUES = (
    select(queues_t)
    .where(or_(*(queues_t.c[name].is_not(None) for name in LIMIT_FIELDS)))
    .order_by(queues_t.c.name)
)
# Each queue's running runs, and how many of them the worker `worker` holds.
RUNNING_PER_QUEUE = (
    select(
        runs.c.queue,
        func.count(),
        func.sum(case((runs.c.lease_owner == bindparam("worker"), 1), else_=0)),
    )
    .where(in_state(RUNNING), runs.c.queue.in_(bindparam("names", expanding=True)))
    .group_by(runs.c.queue)
)


@dataclass(frozen=True, slots=True)
class Counted:
    """What a queue's slots are counted from, read under its lock."""

    running: int  # its running runs
    mine: int  # how many of those the claiming worker holds


@dataclass(frozen=True, slots=True)
class Rule:
    """A limit on a whole queue: `free` gives the slots it leaves (None where it is
    not set); `name` says which limit holds a queue that has none left (`explain`)."""

    name: str
    free: Callable[[QueueBudget, Connection, QueueLimits, Counted], int | None]


def _parallelism(_b: QueueBudget, _c: Connection, lim: QueueLimits, n: Counted) -> int | None:
    return None if lim.max_parallelism is None else lim.max_parallelism - n.running


def _per_worker(_b: QueueBudget, _c: Connection, lim: QueueLimits, n: Counted) -> int | None:
    return None if lim.max_per_worker is None else lim.max_per_worker - n.mine


def _rate(budget: QueueBudget, conn: Connection, lim: QueueLimits, _n: Counted) -> int | None:
    return budget.rate_slots(conn, lim)


QUEUE_RULES: tuple[Rule, ...] = (
    Rule("max_parallelism", _parallelism),
    Rule("max_per_worker", _per_worker),
    Rule("rate_limit", _rate),
)
"""The limits on a whole queue. (`max_per_key` limits each key of a queue, and is
applied run by run in `QueueBudget.take`.)"""


def stored_limits(limits: QueueLimits) -> dict[str, Any]:
    """The column values of `tiers_queues` for `limits` (all but the name)."""
    return {name: getattr(limits, name) for name in LIMIT_FIELDS}


@dataclass
class QueueBudget:
    """How many more runs each limited queue may start now, within one claim."""

    limits: dict[str, QueueLimits]
    slots: dict[str, int]
    key_running: dict[tuple[str, str], int]
    blocked: set[str]
    full_keys: dict[str, list[str]]
    rate_retry_ms: int | None
    now: int
    running: dict[str, int] = dataclasses.field(default_factory=dict)
    """Each queue's running runs, as counted under its lock."""
    held_by: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    """The rules that leave each blocked queue no slot (by `Rule.name`)."""

    @classmethod
    def load(
        cls,
        conn: Connection,
        queues: tuple[Select[Any], dict[str, Any]],
        clock: Clock,
        worker: str,
    ) -> QueueBudget:
        """Lock the rows of `queues` (a locking statement and its parameters) and
        count their slots for `worker` (see `lock`)."""
        limits, now = cls.lock(conn, *queues, clock=clock)
        if not limits:
            return cls.build(conn, limits, {}, now)
        rows = conn.execute(RUNNING_PER_QUEUE, {"names": list(limits), "worker": worker}).all()
        counted = {q: Counted(int(n), int(held)) for q, n, held in rows}
        return cls.build(conn, limits, counted, now)

    @staticmethod
    def lock(
        conn: Connection,
        queues: Select[Any],
        params: dict[str, Any] | None = None,
        *,
        clock: Clock,
    ) -> tuple[dict[str, QueueLimits], int]:
        """Lock the rows `queues` selects (`LIMITED_QUEUES` or one queue, as the
        dialect locks rows); return their limits and the time, read after the lock.

        The clock is read after the lock: a claim that waited for another claim's
        locks must not stamp its runs as started before that claim committed. What
        the queues' slots are counted from must be read after it too, in statements
        of their own: on PostgreSQL a statement that waits for a lock reads from the
        snapshot it took before the wait.
        """
        rows = conn.execute(queues, params or {}).all()
        return {r.name: limits_of(r) for r in rows}, clock.now_ms()

    @classmethod
    def build(
        cls,
        conn: Connection,
        limits: dict[str, QueueLimits],
        counted: dict[str, Counted],
        now: int,
    ) -> QueueBudget:
        """The budget of the locked `limits`, given what each queue's slots are
        `counted` from (a queue missing there has nothing running); the rules that
        need more (rate, per key) read it here."""
        budget = cls(limits, {}, {}, set(), {}, None, now)
        nothing = Counted(0, 0)
        for name, lim in limits.items():
            budget.running[name] = counted.get(name, nothing).running
            slots = 1 << 30
            for rule in QUEUE_RULES:
                free = rule.free(budget, conn, lim, counted.get(name, nothing))
                if free is not None:
                    slots = min(slots, free)
                    if free <= 0:
                        budget.held_by.setdefault(name, []).append(rule.name)
            budget.slots[name] = slots
            if slots <= 0:
                budget.blocked.add(name)
        budget._count_keys(conn)
        return budget

    def _count_keys(self, conn: Connection) -> None:
        keyed = [n for n, lim in self.limits.items() if lim.max_per_key is not None]
        if not keyed:
            return
        for queue, key, count in conn.execute(
            select(runs.c.queue, runs.c.key, func.count())
            .where(in_state(RUNNING), runs.c.queue.in_(keyed), runs.c.key.is_not(None))
            .group_by(runs.c.queue, runs.c.key)
        ).all():
            self.key_running[(queue, key)] = int(count)
            max_per_key = self.limits[queue].max_per_key
            if max_per_key is not None and count >= max_per_key:
                self.full_keys.setdefault(queue, []).append(key)

    def rate_slots(self, conn: Connection, lim: QueueLimits) -> int | None:
        """The starts a rate limit still allows in its window (None: no rate limit);
        when none, notes when the window lets the next one start."""
        if lim.rate_limit is None or not lim.rate_period_ms:
            return None
        since = self.now - lim.rate_period_ms
        # One statement, so one snapshot: with two, on PostgreSQL (READ COMMITTED) an
        # attempt recorded between them was in neither, and let one more start through.
        finished = select(attempts_t.c.started_ms).where(
            attempts_t.c.queue == lim.name,
            attempts_t.c.started_ms > since,
            attempts_t.c.outcome != "released",
        )
        current = select(runs.c.started_ms).where(
            runs.c.queue == lim.name, in_state(RUNNING), runs.c.started_ms > since
        )
        starts = sorted(conn.execute(finished.union_all(current)).scalars())
        free = lim.rate_limit - len(starts)
        if free <= 0:
            # The window (now - period, now] lets one more start once the limit-th
            # newest start falls out of it, at exactly that start + period.
            retry = starts[-lim.rate_limit] + lim.rate_period_ms
            self.rate_retry_ms = min(self.rate_retry_ms or retry, retry)
        return free

    def take(self, queue: str, key: str | None) -> bool:
        """Use one slot of `queue` (and of its `key`) if one is free."""
        lim = self.limits.get(queue)
        if lim is None:
            return True
        if self.slots.get(queue, 0) <= 0:
            return False
        if lim.max_per_key is not None and key is not None:
            used = self.key_running.get((queue, key), 0)
            if used >= lim.max_per_key:
                return False
            self.key_running[(queue, key)] = used + 1
            if used + 1 >= lim.max_per_key:
                self.full_keys.setdefault(queue, []).append(key)
        self.slots[queue] -= 1
        if self.slots[queue] <= 0:
            self.blocked.add(queue)
        return True
