"""Pool groups in a claim's budget: how many of a group's shared slots each member
queue may take now, counted once per claim under the group's row lock.

The rule (docs/workpool.md, "Pool groups"): a member may start a run while the group
runs fewer than its cap, and either the member runs fewer than its guarantee or the
group's free slots exceed what the other members' guarantees still reserve. A member's
reserve is its unmet guarantee (its guarantee, at most its own cap, less what it
runs), at most its due pending runs: an idle member reserves nothing, so its slots
are lent, and they come back as borrowed runs finish (nothing is preempted).

Counted once, from the locked state: `free` (the cap less the members' running runs),
each member's `reserved` slots, and `borrow`, the free slots beyond every reserve.
A member takes its reserve first, then borrows. Every claim of every member (and
every inline start) holds the group's row lock while it counts and takes, so the
cap holds across processes; `_pg_claim` counts the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Select, bindparam, func, select

from ._models import PENDING, RUNNING
from ._run_types import QueueLimits
from ._tables import groups_t, in_state, queues_t, runs

# The rows of some groups, in name order (locked by claims: `Dialect.lock_rows`).
GROUP_ROWS = (
    select(groups_t.c.name, groups_t.c.max_parallelism)
    .where(groups_t.c.name.in_(bindparam("groups", expanding=True)))
    .order_by(groups_t.c.name)
)

# The members of some groups, with their running runs (read after the groups' lock).
_MEMBERS = select(
    queues_t.c.name,
    queues_t.c.group_name,
    queues_t.c.guaranteed,
    queues_t.c.max_parallelism,
    select(func.count())
    .where(in_state(RUNNING), runs.c.queue == queues_t.c.name)
    .scalar_subquery()
    .label("running"),
).where(queues_t.c.group_name.in_(bindparam("groups", expanding=True)))

# A member's due pending runs, up to :n (an index range of ix_tiers_runs_queue_due,
# never the whole backlog): what its reserve may hold at most.
_DUE = select(func.count()).select_from(
    select(runs.c.id)
    .where(runs.c.queue == bindparam("queue"), in_state(PENDING), runs.c.due_ms <= bindparam("now"))
    .limit(bindparam("n"))
    .subquery()
)

GROUP_FULL = "group_full"
GROUP_RESERVED = "group_reserved"


@dataclass(frozen=True, slots=True)
class Member:
    """A member queue as the budget counted it."""

    guaranteed: int
    running: int
    reserve: int  # what its guarantee reserves now (unmet, at most its due runs)


@dataclass
class GroupBudget:
    """One group's shared slots within one claim (see the module's rule)."""

    name: str
    cap: int
    running: int
    free: int  # cap less running, less what this claim has taken
    borrow: int  # free slots beyond every member's reserve, less what was borrowed
    members: dict[str, Member]
    reserved: dict[str, int] = field(default_factory=dict)  # each member's reserve left

    def room(self, queue: str) -> int:
        """How many runs `queue` may start now: its reserve left, then the borrowable
        slots, within the group's free slots."""
        return max(0, min(self.free, self.reserved.get(queue, 0) + self.borrow))

    def use(self, queue: str, n: int) -> None:
        """Count `n` runs started in `queue` (within `room`): its reserve first."""
        own = min(n, self.reserved.get(queue, 0))
        if queue in self.reserved:
            self.reserved[queue] -= own
        self.borrow -= n - own
        self.free -= n

    def held_by(self, queue: str) -> str | None:
        """What leaves `queue` no room: the group's cap (`GROUP_FULL`), or the other
        members' reserves (`GROUP_RESERVED`); None when it has room."""
        if self.free <= 0:
            return GROUP_FULL
        return GROUP_RESERVED if self.room(queue) <= 0 else None

    def reserved_by_others(self, queue: str) -> dict[str, int]:
        """The other members' reserves left (for `explain`)."""
        return {q: n for q, n in self.reserved.items() if q != queue and n > 0}


def load_groups(
    conn: Connection,
    limits: dict[str, QueueLimits],
    now: int,
    rows: Select[Any],
    arriving: str | None = None,
) -> dict[str, GroupBudget]:
    """Lock the rows of the groups of `limits`' queues (`rows`: `GROUP_ROWS`, locked
    as the dialect locks rows, or not, for `explain`) and count their budgets.
    `arriving`: a queue about to start a run that is not stored yet (an inline start),
    counted as one more due run of that queue.

    Read after the lock, in statements of their own (on PostgreSQL a statement that
    waited for a lock reads from the snapshot it took before the wait)."""
    names = sorted({lim.group_name for lim in limits.values() if lim.group_name})
    if not names:
        return {}
    caps = {name: int(cap) for name, cap in conn.execute(rows, {"groups": names})}
    budgets: dict[str, GroupBudget] = {}
    members: dict[str, dict[str, Member]] = {name: {} for name in caps}
    for queue, group, guaranteed, own_cap, running in conn.execute(
        _MEMBERS, {"groups": list(caps)}
    ):
        goal = min(guaranteed or 0, own_cap if own_cap is not None else 1 << 30)
        unmet = max(0, goal - int(running))
        due = 0 if unmet == 0 else int(
            conn.execute(_DUE, {"queue": queue, "now": now, "n": unmet}).scalar() or 0
        ) + (queue == arriving)
        members[group][queue] = Member(guaranteed or 0, int(running), min(unmet, due))
    for name, cap in caps.items():
        running = sum(m.running for m in members[name].values())
        reserved = {q: m.reserve for q, m in members[name].items()}
        free = cap - running
        budgets[name] = GroupBudget(
            name, cap, running, free, max(0, free - sum(reserved.values())),
            members[name], reserved,
        )
    return budgets
