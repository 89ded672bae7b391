"""Cron schedules in the database (`tiers_schedules`): declaring, firing, listing.

Firing a tick is one transaction: a compare-and-set moves the schedule's
`next_fire_ms` on (`UPDATE ... WHERE name = ? AND next_fire_ms = ?`) and inserts the
tick's run, whose id is derived from the schedule's name and the tick. Whoever wins
the compare-and-set fires; every other worker updates no row and inserts nothing. A
worker that dies mid-tick committed both or neither, so the tick fires once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import Connection, Row, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from ._clock import Clock
from ._cron import Cron, parse_cron, plan_ticks
from ._dialects import WAKE, Dialect, reconnecting
from ._errors import ScheduleNotFound, TiersError, first_line
from ._ids import new_id
from ._models import ScheduleRow
from ._run_types import NewRun
from ._tables import runs

log = logging.getLogger("tiers.schedules")

schedules_t = ScheduleRow.__table__  # type: ignore[attr-defined]

# The fields of a run that a schedule stores besides its function and arguments.
_RUN_OPTIONS = (
    "initial_backoff_ms",
    "base",
    "max_failures",
    "jitter",
    "max_backoff_ms",
    "queue",
    "key",
    "owner",
    "priority",
    "on_complete",
    "context",
    "timeout_ms",
)
_DUE = (
    select(schedules_t)
    .where(
        schedules_t.c.paused.is_(False),
        schedules_t.c.next_fire_ms <= bindparam("now"),
    )
    .order_by(schedules_t.c.next_fire_ms)
    .limit(100)
)
_NEXT_FIRE = select(func.min(schedules_t.c.next_fire_ms)).where(
    schedules_t.c.paused.is_(False)
)
_ONE = select(schedules_t).where(schedules_t.c.name == bindparam("name"))


@dataclass(frozen=True, slots=True)
class Schedule:
    """A stored schedule, as `Retrier.schedules()` lists it.

    `next_fire` and `last_fire` are in the schedule's time zone; `next_fire` is None
    for a schedule that will never fire again. `target` says what a tick starts: a
    `run` of an action, an item of the `pool` named `queue`, or a `workflow`.
    """

    name: str
    target: str
    fn: str
    args: Any
    queue: str
    cron: str
    timezone: str
    missed: str
    paused: bool
    next_fire: datetime | None
    last_fire: datetime | None
    last_run_id: str | None


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """What declaring a schedule stores: the run each tick starts (its id and due
    time are the tick's), the calendar, and what to do about missed ticks.
    `tick_arg` names an argument that receives the tick's time (epoch ms)."""

    name: str
    target: str
    run: NewRun
    cron: Cron
    missed: str
    tick_arg: str | None = None


@dataclass(frozen=True, slots=True)
class Fired:
    """One tick fired: the run it started."""

    name: str
    tick_ms: int
    run_id: str


def tick_run_id(name: str, tick_ms: int) -> str:
    """The id of the run a schedule's tick starts: the same in every process."""
    digest = hashlib.sha256(f"{name}\n{tick_ms}".encode()).hexdigest()
    return f"s{digest[:31]}"


class Schedules:
    """The store's part that reads and writes `tiers_schedules`."""

    def __init__(
        self,
        dialect: Dialect,
        clock: Clock,
        insert_runs: Callable[[Sequence[NewRun], Connection], None],
    ) -> None:
        self.dialect = dialect
        self.clock = clock
        self._insert_runs = insert_runs
        self._due = dialect.lock_for_claim(_DUE)
        self._lock_one = dialect.lock_rows(_ONE)
        self._crons: dict[tuple[str, str], Cron] = {}  # stored expressions, parsed

    def _cron(self, expr: str, timezone: str) -> Cron:
        """A stored schedule's expression (checked when it was declared), parsed once."""
        cron = self._crons.get((expr, timezone))
        if cron is None:
            cron = self._crons[expr, timezone] = parse_cron(expr, timezone, check_fires=False)
        return cron

    # -- declaring ----------------------------------------------------------------------

    def declare(self, spec: ScheduleSpec) -> Schedule:
        """Store a schedule, or update the stored one of that name. Its next tick is
        kept unless the expression or time zone changed; a paused one stays paused."""
        try:
            self._declare(spec)
        except IntegrityError:  # another process inserted it first: update it
            self._declare(spec)
        return self.get(spec.name)

    @reconnecting
    def _declare(self, spec: ScheduleSpec) -> None:
        now = self.clock.now_ms()
        values = _declared_values(spec)
        with self.dialect.write() as conn:
            row = conn.execute(self._lock_one, {"name": spec.name}).first()
            if row is None:
                conn.execute(
                    # A dict: `fn` is also the name of values()'s own argument.
                    insert(schedules_t).values(
                        {
                            "name": spec.name,
                            "next_fire_ms": spec.cron.next_after(now),
                            "paused": False,
                            "created_ms": now,
                            "updated_ms": now,
                            **values,
                        }
                    )
                )
                self.dialect.notify(conn, WAKE)
                return
            changed = {k: v for k, v in values.items() if getattr(row, k) != v}
            if not changed:
                return
            # A new calendar starts after now; so does one that had stopped (its row
            # could not be read, say).
            if {"cron", "timezone"} & changed.keys() or row.next_fire_ms is None:
                changed["next_fire_ms"] = spec.cron.next_after(now)
            conn.execute(
                update(schedules_t)
                .where(schedules_t.c.name == spec.name)
                .values({"updated_ms": now, **changed})
            )

    # -- firing ---------------------------------------------------------------------------

    def next_fire_ms(self) -> int | None:
        """The earliest next tick of any schedule not paused (epoch ms), or None."""
        with self.dialect.read() as conn:
            value = conn.execute(_NEXT_FIRE).scalar()
        return None if value is None else int(value)

    def fire_due(self) -> list[Fired]:
        """Fire every due tick of every schedule not paused, once across all workers."""
        fired: list[Fired] = []
        with self.dialect.write_internal() as conn:
            now = self.clock.now_ms()
            for row in conn.execute(self._due, {"now": now}).all():
                fired.extend(self._fire(conn, row, now))
            if fired:
                self.dialect.notify(conn, WAKE)
        return fired

    def _fire(self, conn: Connection, row: Row[Any], now: int) -> list[Fired]:
        try:
            cron = self._cron(row.cron, row.timezone)
            ticks, after = plan_ticks(cron, row.next_fire_ms, now, row.missed)
            new = [_tick_run(row, tick) for tick in ticks]
        except (TiersError, TypeError, ValueError, KeyError) as exc:
            # A row that cannot be read stops only itself, until it is declared again.
            log.error("schedule %s cannot fire: %s", row.name, first_line(exc))
            ticks, after, new = [], None, []
        moved = conn.execute(
            update(schedules_t)
            .where(
                schedules_t.c.name == row.name,
                schedules_t.c.next_fire_ms == row.next_fire_ms,
            )
            .values(
                next_fire_ms=after,
                last_fire_ms=ticks[-1] if ticks else row.last_fire_ms,
                last_run_id=new[-1].id if new else row.last_run_id,
            )
        ).rowcount
        if moved != 1:
            return []  # another worker fired it
        # The tick's run id is the unique key: a tick that fired already (before a
        # schedule was re-declared with the same calendar, say) does not fire again.
        if not new:
            return []
        ids = [r.id for r in new]
        stored = set(conn.execute(select(runs.c.id).where(runs.c.id.in_(ids))).scalars())
        if stored:
            log.warning("schedule %s: %d tick(s) had fired already", row.name, len(stored))
            new = [r for r in new if r.id not in stored]
        if new:
            self._insert_runs(new, conn)
        return [Fired(row.name, r.due_ms, r.id) for r in new]

    @reconnecting
    def trigger(self, name: str) -> str:
        """Start the schedule's run now, outside its ticks; returns the run id."""
        with self.dialect.write() as conn:
            row = conn.execute(_ONE, {"name": name}).first()
            if row is None:
                raise ScheduleNotFound(name)
            new = dataclasses.replace(
                _tick_run(row, self.clock.now_ms()), id=new_id()
            )
            self._insert_runs([new], conn)
            return new.id

    # -- managing -----------------------------------------------------------------------

    @reconnecting
    def set_paused(self, name: str, paused: bool) -> Schedule:
        """Pause or resume a schedule. Resuming skips the ticks that passed meanwhile:
        the next is the first one after now."""
        with self.dialect.write() as conn:
            row = conn.execute(self._lock_one, {"name": name}).first()
            if row is None:
                raise ScheduleNotFound(name)
            values: dict[str, Any] = {"paused": paused, "updated_ms": self.clock.now_ms()}
            if not paused and row.paused:
                cron = self._cron(row.cron, row.timezone)
                values["next_fire_ms"] = cron.next_after(self.clock.now_ms())
            conn.execute(update(schedules_t).where(schedules_t.c.name == name).values(**values))
            if not paused:
                self.dialect.notify(conn, WAKE)
        return self.get(name)

    @reconnecting
    def delete(self, name: str) -> bool:
        """Delete a schedule (its runs stay); False if there was none."""
        with self.dialect.write() as conn:
            gone = conn.execute(delete(schedules_t).where(schedules_t.c.name == name)).rowcount
        return bool(gone)

    def get(self, name: str) -> Schedule:
        with self.dialect.read() as conn:
            row = conn.execute(_ONE, {"name": name}).first()
        if row is None:
            raise ScheduleNotFound(name)
        return _schedule(row)

    def list(self) -> list[Schedule]:
        with self.dialect.read() as conn:
            rows = conn.execute(select(schedules_t).order_by(schedules_t.c.name)).all()
        return [_schedule(row) for row in rows]


def _declared_values(spec: ScheduleSpec) -> dict[str, Any]:
    run = spec.run
    options = {name: getattr(run, name) for name in _RUN_OPTIONS}
    if spec.tick_arg is not None:
        options["tick_arg"] = spec.tick_arg
    return {
        "target": spec.target,
        "fn": run.fn,
        "args": run.args,
        "options": options,
        "cron": spec.cron.expr,
        "timezone": spec.cron.timezone,
        "missed": spec.missed,
    }


def _tick_run(row: Row[Any], tick_ms: int) -> NewRun:
    options = dict(row.options)
    tick_arg = options.pop("tick_arg", None)
    args = dict(row.args)
    if tick_arg is not None:
        args[tick_arg] = tick_ms
    return NewRun(
        id=tick_run_id(row.name, tick_ms), fn=row.fn, args=args, due_ms=tick_ms, **options
    )


def _schedule(row: Row[Any]) -> Schedule:
    try:
        zone: tzinfo = ZoneInfo(row.timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # a row edited by hand
        zone = UTC

    def at(ms: int | None) -> datetime | None:
        return None if ms is None else datetime.fromtimestamp(ms / 1000, zone)

    options = row.options if isinstance(row.options, dict) else {}
    return Schedule(
        name=row.name,
        target=row.target,
        fn=row.fn,
        args=row.args,
        queue=options.get("queue", ""),
        cron=row.cron,
        timezone=row.timezone,
        missed=row.missed,
        paused=bool(row.paused),
        next_fire=at(row.next_fire_ms),
        last_fire=at(row.last_fire_ms),
        last_run_id=row.last_run_id,
    )
