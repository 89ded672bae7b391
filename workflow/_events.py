"""Events: sent once and kept, so that a workflow that starts waiting later (but
started before the event) still gets it; waits resolved against them, with a
timeout, under a lock per event name so a wait and a send never miss each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, func, insert, select, update

from ._models import COMPLETED, EVENT, WAITING, WorkflowRow, events_t, steps_t

if TYPE_CHECKING:
    from ._journal import Journal

_INSERT_STEP = steps_t.insert()


class Events:
    """The events of one database, and the waits for them (a part of `Journal`)."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal

    def try_event(
        self,
        workflow: WorkflowRow,
        entry: dict[str, Any],
        timeout_ms: int | None,
    ) -> tuple[bool, Any]:
        """Resolve an event wait: (True, data) on a match, (True, None) on timeout, or
        (False, None) when the workflow must wait (the wait is journaled)."""
        event_name: str = entry["event_name"]
        match: dict[str, Any] = entry["match"]
        with self._journal.write() as conn:
            self._event_lock(conn, event_name)
            self._journal.lock_running(conn, workflow.id)
            now = self._journal.clock.now_ms()
            current = conn.execute(
                select(steps_t.c.state, steps_t.c.wake_ms, steps_t.c.result).where(
                    steps_t.c.workflow_id == workflow.id, steps_t.c.name == entry["name"]
                )
            ).first()
            if current is not None and current.state == COMPLETED:
                return True, current.result
            last = conn.execute(
                select(func.max(steps_t.c.event_id)).where(
                    steps_t.c.workflow_id == workflow.id, steps_t.c.event_name == event_name
                )
            ).scalar()
            found = self._first_event(conn, event_name, workflow.created_ms, last or 0, match)
            done = {"state": COMPLETED, "finished_ms": now}
            if found is not None:
                done.update(result=found[1], event_id=found[0])
            elif current is not None and current.wake_ms is not None and now >= current.wake_ms:
                done.update(result=None)
            elif current is None:
                wake_ms = None if timeout_ms is None else now + timeout_ms
                conn.execute(_INSERT_STEP, [{**entry, "state": WAITING, "wake_ms": wake_ms}])
                if wake_ms is not None:
                    self._journal.wake(conn, workflow.id, wake_ms)
                return False, None
            else:
                # Still waiting, and this driver came early: keep one due at the timeout.
                if current.wake_ms is not None:
                    self._journal.wake(conn, workflow.id, current.wake_ms)
                return False, None
            if current is None:
                conn.execute(_INSERT_STEP, [{**entry, **done}])
            else:
                conn.execute(
                    update(steps_t)
                    .where(steps_t.c.workflow_id == workflow.id, steps_t.c.name == entry["name"])
                    .values(**done)
                )
            return True, done["result"]

    def _first_event(
        self, conn: Connection, name: str, since_ms: int, after_id: int, match: dict[str, Any]
    ) -> tuple[int, Any] | None:
        while True:
            rows = conn.execute(
                select(events_t.c.id, events_t.c.data, events_t.c.created_ms)
                .where(events_t.c.name == name, events_t.c.id > after_id)
                .order_by(events_t.c.id)
                .limit(500)
            ).all()
            for r in rows:
                if r.created_ms >= since_ms and matches(match, r.data):
                    return int(r.id), r.data
            if len(rows) < 500:
                return None
            after_id = rows[-1].id

    def send_event(self, conn: Connection, name: str, data: dict[str, Any]) -> int:
        """Store an event and wake every workflow waiting for one like it."""
        self._event_lock(conn, name)
        now = self._journal.clock.now_ms()
        event_id = conn.execute(
            insert(events_t).values(name=name, data=data, created_ms=now)
        ).inserted_primary_key
        assert event_id is not None
        waiting = conn.execute(
            select(steps_t.c.workflow_id, steps_t.c.match).where(
                steps_t.c.event_name == name,
                steps_t.c.state == WAITING,
                steps_t.c.kind == EVENT,
            )
        ).all()
        # In id order: each wake locks its workflow's row.
        for w in sorted({r.workflow_id for r in waiting if matches(r.match or {}, data)}):
            self._journal.wake(conn, w, now)
        return int(event_id[0])

    def send_event_alone(self, name: str, data: dict[str, Any]) -> int:
        with self._journal.write() as conn:
            return self.send_event(conn, name, data)

    def _event_lock(self, conn: Connection, name: str) -> None:
        # Serializes a wait's check-then-journal with send_event's insert-then-scan, so
        # neither can miss the other.
        self._journal.dialect.lock_key(conn, f"tiers.event:{name}")


def matches(match: dict[str, Any], data: Any) -> bool:
    """Whether event `data` has every key of `match` with an equal value."""
    return isinstance(data, dict) and all(k in data and data[k] == v for k, v in match.items())
