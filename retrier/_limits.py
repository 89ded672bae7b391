"""Queue limits: how many more runs each limited queue (a pool) may start, within one
claim (or one inline start), counted under the lock of the queues' rows.

Where a new limit goes: a field of `QueueLimits` (and its column in `QueueRow`, by a
migration), then, for a limit on the whole queue, one `Rule` in `QUEUE_RULES`; the
locking query, the stored values and the budget all follow from those.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    CompoundSelect,
    Connection,
    Select,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    union_all,
)

from ._clock import Clock
from ._compiled import CompiledQuery
from ._group_budget import GROUP_FULL, GROUP_RESERVED, GROUP_ROWS, GroupBudget, load_groups
from ._models import RUNNING
from ._run_types import QueueLimits
from ._tables import (
    attempts_t,
    in_state,
    key_limits_t,
    key_starts_t,
    limits_of,
    queues_t,
    runs,
)

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


def _counted(queue_is: Callable[[ColumnElement[Any]], ColumnElement[bool]]) -> CompoundSelect[Any]:
    """Each queue's running runs and how many of them the worker `worker` holds
    ('running'), and the queues where some key has a cap of its own ('own'), for the
    queues `queue_is` selects: read after the lock, in one statement."""
    return union_all(
        select(
            literal("running"),
            runs.c.queue,
            func.count(),
            func.sum(case((runs.c.lease_owner == bindparam("worker"), 1), else_=0)),
        )
        .where(in_state(RUNNING), queue_is(runs.c.queue))
        .group_by(runs.c.queue),
        select(literal("own"), key_limits_t.c.queue, literal(0), literal(0))
        .where(queue_is(key_limits_t.c.queue))
        .group_by(key_limits_t.c.queue),
    )


_NAMES: BindParameter[Any] = bindparam("names", expanding=True)
COUNTED_PER_QUEUE = _counted(lambda queue: queue.in_(_NAMES))
# The same for one queue (`name`): no list to expand at each execution, so the
# statement's compiled form is reused whole (an inline start counts one queue).
_NAME: BindParameter[Any] = bindparam("name")
COUNTED_IN_QUEUE = _counted(lambda queue: queue == _NAME)


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


def _group_full(budget: QueueBudget, _c: Connection, lim: QueueLimits, _n: Counted) -> int | None:
    group = budget.group_of(lim.name)
    return None if group is None else group.free


def _group_reserved(
    budget: QueueBudget, _c: Connection, lim: QueueLimits, _n: Counted
) -> int | None:
    group = budget.group_of(lim.name)
    return None if group is None or group.free <= 0 else group.room(lim.name)


QUEUE_RULES: tuple[Rule, ...] = (
    Rule("max_parallelism", _parallelism),
    Rule("max_per_worker", _per_worker),
    Rule("rate_limit", _rate),
    Rule(GROUP_FULL, _group_full),
    Rule(GROUP_RESERVED, _group_reserved),
)
"""The limits on a whole queue. (`max_per_key`, and a key's own cap in
`tiers_key_limits`, limit each key of a queue, and are applied run by run in
`QueueBudget.take`.)"""


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
    overridden: set[str] = dataclasses.field(default_factory=set)
    """The queues where some key has a cap of its own (`tiers_key_limits`)."""
    own_caps: dict[tuple[str, str], int | None] = dataclasses.field(default_factory=dict)
    """Keys' own caps as looked up so far (None: the key has none)."""
    conn: Connection | None = None
    """The claim's connection, to look up the caps of keys met along the way."""
    key_rate_used: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    """Starts in each key's rate window as looked up, plus those taken since."""
    key_rate_oldest: dict[tuple[str, str], int | None] = dataclasses.field(
        default_factory=dict
    )
    """The oldest of those looked up (None: the window was empty)."""
    groups: dict[str, GroupBudget] = dataclasses.field(default_factory=dict)
    """The pool groups of the queues, by name, counted once (`_group_budget`)."""

    @classmethod
    def load(
        cls,
        conn: Connection,
        queues: tuple[Select[Any] | CompiledQuery, dict[str, Any]],
        clock: Clock,
        worker: str,
        group_rows: Select[Any] = GROUP_ROWS,
        arriving: str | None = None,
        counted_in_queue: CompiledQuery | None = None,
    ) -> QueueBudget:
        """Lock the rows of `queues` (a locking statement and its parameters), then
        those of their groups (`group_rows`), and count their slots for `worker` (see
        `lock`; `arriving`: see `load_groups`). `counted_in_queue`: COUNTED_IN_QUEUE
        compiled for the driver, to count a single queue with."""
        limits, now = cls.lock(conn, *queues, clock=clock)
        if not limits:
            return cls.build(conn, limits, {}, set(), now, group_rows, arriving)
        counted: dict[str, Counted] = {}
        overridden: set[str] = set()
        rows: Iterable[Any]
        if len(limits) == 1:
            params = {"name": next(iter(limits)), "worker": worker}
            rows = (
                conn.execute(COUNTED_IN_QUEUE, params) if counted_in_queue is None
                else counted_in_queue.rows(conn, params)
            )
        else:
            rows = conn.execute(COUNTED_PER_QUEUE, {"names": list(limits), "worker": worker})
        for kind, queue, n, held in rows:
            if kind == "own":
                overridden.add(queue)
            else:
                counted[queue] = Counted(int(n), int(held))
        return cls.build(conn, limits, counted, overridden, now, group_rows, arriving)

    @staticmethod
    def lock(
        conn: Connection,
        queues: Select[Any] | CompiledQuery,
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
        if isinstance(queues, CompiledQuery):
            rows: Sequence[Any] = queues.rows(conn, params or {})
        else:
            rows = conn.execute(queues, params or {}).all()
        return {r.name: limits_of(r) for r in rows}, clock.now_ms()

    @classmethod
    def build(
        cls,
        conn: Connection,
        limits: dict[str, QueueLimits],
        counted: dict[str, Counted],
        overridden: set[str],
        now: int,
        group_rows: Select[Any] = GROUP_ROWS,
        arriving: str | None = None,
    ) -> QueueBudget:
        """The budget of the locked `limits`, given what each queue's slots are
        `counted` from (a queue missing there has nothing running) and the queues
        where some key has a cap of its own (`overridden`, read with the counts); the
        rules that need more (rate, per key, groups: whose rows `group_rows` locks)
        read it here."""
        budget = cls(limits, {}, {}, set(), {}, None, now, overridden=overridden)
        budget.groups = load_groups(conn, limits, now, group_rows, arriving)
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
        keyed = [n for n in self.limits if self.keyed(n)]
        if not keyed:
            return
        self.conn = conn
        counts = conn.execute(
            select(runs.c.queue, runs.c.key, func.count())
            .where(in_state(RUNNING), runs.c.queue.in_(keyed), runs.c.key.is_not(None))
            .group_by(runs.c.queue, runs.c.key)
        ).all()
        self._learn_caps(conn, [(q, k) for q, k, _ in counts if q in self.overridden])
        for queue, key, count in counts:
            self.key_running[(queue, key)] = int(count)
            cap = self.key_cap(queue, key)
            if cap is not None and count >= cap:
                self.full_keys.setdefault(queue, []).append(key)

    def group_of(self, queue: str) -> GroupBudget | None:
        """The budget of `queue`'s pool group (None: it belongs to none)."""
        lim = self.limits.get(queue)
        return None if lim is None or not lim.group_name else self.groups.get(lim.group_name)

    def room(self, queue: str) -> int:
        """How many runs `queue` may start now: its slots, within its group's room
        (which the queues of the group taken before it in this claim have used)."""
        group = self.group_of(queue)
        slots = self.slots.get(queue, 0)
        return slots if group is None else min(slots, group.room(queue))

    def started(self, queue: str, n: int) -> None:
        """Count `n` runs of `queue` taken in this claim against its group's slots."""
        group = self.group_of(queue)
        if group is not None and n:
            group.use(queue, n)

    def keyed(self, queue: str) -> bool:
        """Whether the queue limits its keys (`max_per_key`, keys' own caps, or a rate
        limit per key)."""
        lim = self.limits.get(queue)
        return lim is not None and (
            lim.max_per_key is not None
            or queue in self.overridden
            or lim.key_rate_limit is not None
        )

    def key_rate_room(self, queue: str, key: str) -> bool:
        """Whether `key` may start one more run within its queue's rate per key; when
        not, as first looked up, notes when its window lets the next one start."""
        lim = self.limits[queue]
        if lim.key_rate_limit is None or not lim.key_rate_period_ms or self.conn is None:
            return True
        used = self.key_rate_used.get((queue, key))
        if used is None:
            since = self.now - lim.key_rate_period_ms
            starts = self.conn.execute(
                select(key_starts_t.c.started_ms)
                .where(
                    key_starts_t.c.queue == queue,
                    key_starts_t.c.key == key,
                    key_starts_t.c.started_ms > since,
                )
                .order_by(key_starts_t.c.started_ms.desc())
                .limit(lim.key_rate_limit)
            ).scalars().all()
            used = len(starts)
            self.key_rate_used[(queue, key)] = used
            self.key_rate_oldest[(queue, key)] = starts[-1] if starts else None
            if used >= lim.key_rate_limit:
                # One more may start once the limit-th newest start leaves the window.
                retry = starts[-1] + lim.key_rate_period_ms
                self.rate_retry_ms = min(self.rate_retry_ms or retry, retry)
        return used < lim.key_rate_limit

    def key_cap(self, queue: str, key: str) -> int | None:
        """The most runs `key` may run in `queue` at once: its own cap if it has one
        (`tiers_key_limits`), else the queue's `max_per_key` (None: no limit)."""
        lim = self.limits.get(queue)
        default = lim.max_per_key if lim is not None else None
        if queue not in self.overridden:
            return default
        if (queue, key) not in self.own_caps and self.conn is not None:
            self._learn_caps(self.conn, [(queue, key)])
        own = self.own_caps.get((queue, key))
        return default if own is None else own

    def _learn_caps(self, conn: Connection, pairs: list[tuple[str, str]]) -> None:
        for queue in {q for q, _ in pairs}:
            keys = [k for q, k in pairs if q == queue]
            for key in keys:
                self.own_caps[(queue, key)] = None
            stmt = select(key_limits_t.c.key, key_limits_t.c.max_parallelism).where(
                key_limits_t.c.queue == queue, key_limits_t.c.key.in_(keys)
            )
            for key, cap in conn.execute(stmt).all():
                self.own_caps[(queue, key)] = int(cap)

    def _count_key_start(self, queue: str, key: str) -> None:
        """Count a start taken in the key's rate window; once that fills it, note a
        time to look again no later than when it lets the next one start (the oldest
        start looked up, or now, plus the period: early at worst)."""
        used = self.key_rate_used[(queue, key)] + 1
        self.key_rate_used[(queue, key)] = used
        lim = self.limits[queue]
        if lim.key_rate_limit is not None and used >= lim.key_rate_limit:
            oldest = self.key_rate_oldest.get((queue, key))
            retry = (self.now if oldest is None else oldest) + (lim.key_rate_period_ms or 0)
            self.rate_retry_ms = min(self.rate_retry_ms or retry, retry)

    def log_key_starts(self, conn: Connection, started: list[tuple[str, str | None]]) -> None:
        """Log the starts of runs (queue, key) in queues with a rate limit per key, for
        their windows; a key's starts out of its window are deleted as it starts more."""
        logged: list[tuple[str, str]] = []
        for queue, key in started:
            lim = self.limits.get(queue)
            if key is not None and lim is not None and lim.key_rate_limit is not None:
                logged.append((queue, key))
        if not logged:
            return
        conn.execute(
            insert(key_starts_t),
            [{"queue": q, "key": k, "started_ms": self.now} for q, k in logged],
        )
        for queue, key in sorted(set(logged)):
            since = self.now - (self.limits[queue].key_rate_period_ms or 0)
            conn.execute(
                delete(key_starts_t).where(
                    key_starts_t.c.queue == queue,
                    key_starts_t.c.key == key,
                    key_starts_t.c.started_ms <= since,
                )
            )

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
        if key is not None and self.keyed(queue):
            cap = self.key_cap(queue, key)
            used = self.key_running.get((queue, key), 0)
            full = self.full_keys.setdefault(queue, [])
            if (cap is not None and used >= cap) or not self.key_rate_room(queue, key):
                if key not in full:
                    full.append(key)
                return False
            if cap is not None and used + 1 >= cap:
                full.append(key)
            self.key_running[(queue, key)] = used + 1
            if (queue, key) in self.key_rate_used:
                self._count_key_start(queue, key)
        self.slots[queue] -= 1
        if self.slots[queue] <= 0:
            self.blocked.add(queue)
        return True
