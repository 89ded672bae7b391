"""Queue settings stored as data: a queue's limits (`tiers_queues`), keys' own caps
(`tiers_key_limits`) and pool groups (`tiers_queue_groups`), each write waking the
workers so they apply it at their next claim.

A group's guarantees never add up to more than its cap: declaring a member, or
changing a cap, checks that under the group's row lock (the lock every claim of a
member takes), and raises `InvalidSettings` before writing anything. Locks are taken
in the order claims take them, the queue's row before its group's, so a declaration
and a claim never wait for each other in a cycle.
"""

from __future__ import annotations

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update

from ._clock import Clock
from ._dialects import WAKE, Dialect, reconnecting
from ._errors import InvalidSettings
from ._limits import stored_limits
from ._models import RUNNING
from ._run_types import GroupMember, QueueGroup, QueueLimits
from ._tables import groups_t, in_state, key_limits_t, queues_t, runs

_ONE_GROUP = select(groups_t.c.max_parallelism).where(groups_t.c.name == bindparam("group"))
_QUEUE_ROW = select(queues_t.c.name).where(queues_t.c.name == bindparam("queue"))
# The members' guarantees, together, but one's (the one being declared again).
_GUARANTEED = select(func.coalesce(func.sum(queues_t.c.guaranteed), 0)).where(
    queues_t.c.group_name == bindparam("group"), queues_t.c.name != bindparam("queue")
)
_MEMBERS = (
    select(
        queues_t.c.name,
        queues_t.c.guaranteed,
        queues_t.c.max_parallelism,
        select(func.count())
        .where(in_state(RUNNING), runs.c.queue == queues_t.c.name)
        .scalar_subquery(),
    )
    .where(queues_t.c.group_name == bindparam("group"))
    .order_by(queues_t.c.name)
)


class QueueSettings:
    """Writing and reading queues' stored settings (the store's part for them)."""

    def __init__(self, dialect: Dialect, clock: Clock) -> None:
        self.dialect = dialect
        self.clock = clock
        self._lock_group = dialect.lock_rows(_ONE_GROUP)
        self._lock_queue = dialect.lock_rows(_QUEUE_ROW)

    @reconnecting
    def set_queue(self, limits: QueueLimits) -> None:
        """Store a queue's limits (the last writer wins) and wake the workers. A member
        of a group: raises `InvalidSettings`, writing nothing, if the group is not
        stored or its members' guarantees would exceed its cap."""
        values = {**stored_limits(limits), "updated_ms": self.clock.now_ms()}
        with self.dialect.write() as conn:
            if limits.group_name is not None:
                conn.execute(self._lock_queue, {"queue": limits.name})
                self._check_member(conn, limits)
            changed = conn.execute(
                update(queues_t).where(queues_t.c.name == limits.name).values(**values)
            ).rowcount
            if not changed:
                conn.execute(insert(queues_t).values(name=limits.name, **values))
            self.dialect.notify(conn, WAKE)

    def _check_member(self, conn: Connection, limits: QueueLimits) -> None:
        group = limits.group_name
        cap = conn.execute(self._lock_group, {"group": group}).scalar()
        if cap is None:
            raise InvalidSettings(
                f"pool {limits.name!r}: no pool group {group!r}; declare it first with "
                f"PoolGroup(retrier, {group!r}, max_parallelism=...)"
            )
        params = {"group": group, "queue": limits.name}
        others = int(conn.execute(_GUARANTEED, params).scalar() or 0)
        if others + (limits.guaranteed or 0) > cap:
            raise InvalidSettings(
                f"pool {limits.name!r}: guaranteed={limits.guaranteed} and the other members' "
                f"{others} add up to more than group {group!r}'s max_parallelism={cap}"
            )

    @reconnecting
    def set_group(self, name: str, max_parallelism: int) -> None:
        """Store pool group `name`'s cap (declaring the group if new) and wake the
        workers. Raises `InvalidSettings`, writing nothing, if its members' guarantees
        add up to more than the new cap."""
        values = {"max_parallelism": max_parallelism, "updated_ms": self.clock.now_ms()}
        with self.dialect.write() as conn:
            # A new group (two processes declaring it at once: one row, then both check).
            conn.execute(self.dialect.insert_ignoring(groups_t).values(name=name, **values))
            conn.execute(self._lock_group, {"group": name})
            guaranteed = int(conn.execute(_GUARANTEED, {"group": name, "queue": ""}).scalar() or 0)
            if guaranteed > max_parallelism:
                raise InvalidSettings(
                    f"group {name!r}: its members are guaranteed {guaranteed} slot(s) "
                    f"together, more than max_parallelism={max_parallelism}; lower their "
                    f"guarantees first"
                )
            conn.execute(update(groups_t).where(groups_t.c.name == name).values(**values))
            self.dialect.notify(conn, WAKE)

    @reconnecting
    def get_group(self, name: str) -> QueueGroup | None:
        """Pool group `name` with its members as stored now (None: no such group)."""
        with self.dialect.read() as conn:
            cap = conn.execute(_ONE_GROUP, {"group": name}).scalar()
            if cap is None:
                return None
            members = tuple(
                GroupMember(queue, int(guaranteed or 0), own_cap, int(running))
                for queue, guaranteed, own_cap, running in conn.execute(
                    _MEMBERS, {"group": name}
                )
            )
        return QueueGroup(name, int(cap), members)

    @reconnecting
    def list_groups(self) -> list[str]:
        """The names of every stored pool group."""
        with self.dialect.read() as conn:
            return list(conn.execute(select(groups_t.c.name).order_by(groups_t.c.name)).scalars())

    def set_key_limit(
        self, queue: str, key: str, max_parallelism: int | None, conn: Connection | None = None
    ) -> None:
        """Give `key` of `queue` a cap of its own (None: remove it, back to the queue's
        `max_per_key`), in `conn`'s transaction if given; wakes the workers."""
        if conn is not None:
            self._set_key_limit(conn, queue, key, max_parallelism)
            return
        with self.dialect.write() as own:
            self._set_key_limit(own, queue, key, max_parallelism)

    def _set_key_limit(
        self, conn: Connection, queue: str, key: str, max_parallelism: int | None
    ) -> None:
        where = (key_limits_t.c.queue == queue) & (key_limits_t.c.key == key)
        if max_parallelism is None:
            conn.execute(delete(key_limits_t).where(where))
        else:
            values = {"max_parallelism": max_parallelism, "updated_ms": self.clock.now_ms()}
            if not conn.execute(update(key_limits_t).where(where).values(**values)).rowcount:
                conn.execute(insert(key_limits_t).values(queue=queue, key=key, **values))
        self.dialect.notify(conn, WAKE)

    @reconnecting
    def key_limits(self, queue: str) -> dict[str, int]:
        """The keys of `queue` that have a cap of their own, and their caps."""
        stmt = select(key_limits_t.c.key, key_limits_t.c.max_parallelism).where(
            key_limits_t.c.queue == queue
        )
        with self.dialect.read() as conn:
            return {key: int(cap) for key, cap in conn.execute(stmt.order_by(key_limits_t.c.key))}
