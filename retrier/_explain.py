"""Why is this run not running? `Retrier.explain` answers from what a claim would find.

Each answer comes from the claim's own code, not a second copy of its rules: whether a
live worker's claim would consider the run at all is the claim's filter
(`Claims.covers`), and whether its queue has a free slot is the budget a claim counts
(`Claims.budget_of`: the same `QueueBudget` and `QUEUE_RULES`, read without the lock).
The answer describes one moment; the next claim may already have changed it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select

from ._claims import Claims
from ._clock import Clock, ms_to_datetime
from ._dialects import Dialect, reconnecting
from ._errors import RunNotFound
from ._limits import QueueBudget
from ._models import CANCELED, COMPLETED, DELIVERING, FINISHING, PENDING, RUNNING, SUCCESS
from ._run_types import QueueLimits, Runnable
from ._tables import LIVE_WORKERS, in_state, names_in, queues_t, runs

# The reasons `Why.reason` takes, in the order they are checked.
FINISHED = "finished"  # completed (succeeded or failed) and its on_complete is done
CANCELED_ = "canceled"
HELD = "held"  # running: leased by a worker until its lease ends
DELIVERING_ = "delivering"  # its on_complete runs on a worker now
NO_WORKERS = "no_live_worker"  # no worker is alive at all
NOT_REGISTERED = "not_registered"  # live workers, none registers its function (handler)
DUE_LATER = "due_later"  # waits for its due time: a backoff, or run_at / run_after
PAUSED = "pool_paused"  # its pool's max_parallelism is 0
POOL_FULL = "pool_full"  # its pool runs max_parallelism runs already
RATE_LIMITED = "rate_limited"  # its pool's rate window is used up until a time
GROUP_FULL = "group_full"  # its pool's group runs its cap already (PoolGroup)
GROUP_RESERVED = "group_reserved"  # the group's free slots are other pools' guarantees
KEY_FULL = "key_full"  # its key runs max_per_key runs already
KEY_LIMIT = "key_limit"  # its key runs as many as its own cap (set_key_limit), or is paused
KEY_RATE_LIMITED = "key_rate_limited"  # its key's rate window is used up until a time
CLAIMABLE = "claimable"  # due, room: the next claim of a worker that can run it takes it


@dataclass(frozen=True)
class Why:
    """Why a run is where it is: a `reason` (one of the constants above), a sentence
    for people, and where it applies the time it lasts until and the worker."""

    run_id: str
    state: str
    reason: str
    message: str
    until: datetime | None = None
    worker: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


_COLUMNS = (
    runs.c.id,
    runs.c.fn,
    runs.c.state,
    runs.c.outcome,
    runs.c.attempts,
    runs.c.failures,
    runs.c.due_ms,
    runs.c.priority,
    runs.c.queue,
    runs.c.key,
    runs.c.lease_owner,
    runs.c.lease_until_ms,
    runs.c.on_complete,
    runs.c.finished_ms,
)


class Explainer:
    """Answers `explain` for the runs of one database."""

    def __init__(self, dialect: Dialect, clock: Clock, claims: Claims) -> None:
        self.dialect = dialect
        self.clock = clock
        self._claims = claims

    @reconnecting
    def explain(self, run_id: str) -> Why:
        with self.dialect.read() as conn:
            row = conn.execute(select(*_COLUMNS).where(runs.c.id == run_id)).first()
            if row is None:
                raise RunNotFound(run_id)
            return self._why(conn, row, self.clock.now_ms())

    def _why(self, conn: Connection, row: Any, now: int) -> Why:
        def why(reason: str, message: str, **more: Any) -> Why:
            return Why(row.id, row.state, reason, message, **more)

        if row.state == COMPLETED and row.outcome == CANCELED:
            return why(CANCELED_, f"canceled at {_at(row.finished_ms)}")
        if row.state == COMPLETED:
            outcome = "succeeded" if row.outcome == SUCCESS else "failed"
            return why(FINISHED, f"finished: it {outcome} at {_at(row.finished_ms)}")
        if row.state in (RUNNING, DELIVERING):
            until = ms_to_datetime(row.lease_until_ms) if row.lease_until_ms else None
            what = (
                f"running (attempt {row.attempts})"
                if row.state == RUNNING
                else f"delivering its on_complete {row.on_complete!r}"
            )
            return why(
                HELD if row.state == RUNNING else DELIVERING_,
                f"{what} on worker {row.lease_owner}, leased until {_at(row.lease_until_ms)}; "
                f"if that worker dies, any worker takes it again then",
                until=until,
                worker=row.lease_owner,
            )
        live = conn.execute(LIVE_WORKERS, {"now": now}).all()
        if row.due_ms > now:
            cause = "its retry backoff" if row.failures else "its run_at / run_after time"
            alone = "" if live else "; no worker is alive now to run it then"
            return why(
                DUE_LATER,
                f"due at {_at(row.due_ms)} ({cause}){alone}",
                until=ms_to_datetime(row.due_ms),
            )
        if not live:
            return why(
                NO_WORKERS,
                "no live worker: start one (`tiers worker --app ...`, or `with retrier:`)",
            )
        takers = [
            w.id
            for w in live
            if self._claims.covers(
                conn,
                row.id,
                Runnable(frozenset(names_in(w.functions)), frozenset(names_in(w.handlers))),
            )
        ]
        if not takers:
            name = row.fn if row.state == PENDING else row.on_complete
            kind = "function" if row.state == PENDING else "on_complete handler"
            return why(
                NOT_REGISTERED,
                f"none of the {len(live)} live worker(s) registers its {kind} {name!r}; "
                f"it waits for a worker that does (after unregistered_grace it fails)",
                details={"live_workers": len(live)},
            )
        if row.state == FINISHING:
            return why(
                CLAIMABLE,
                f"its on_complete {row.on_complete!r} is due; the next claim of one of "
                f"{len(takers)} live worker(s) that can run it takes it",
                details={"workers": takers},
            )
        held = self._held_by_queue(conn, row)
        if held is not None:
            return held
        ahead = self._ahead(conn, row, now)
        return why(
            CLAIMABLE,
            f"due and its queue has room: {ahead} run(s) ahead of it in claim order; the "
            f"next claim of one of {len(takers)} live worker(s) that can run it takes it",
            details={"ahead": ahead, "workers": takers},
        )

    def _held_by_queue(self, conn: Connection, row: Any) -> Why | None:
        """Why the run's queue (or key) leaves it no slot now, if it does."""
        if not row.queue:
            return None
        budget = self._claims.budget_of(conn, row.queue)
        limits = budget.limits.get(row.queue)
        if limits is None:
            return None
        pool = f"pool {row.queue!r}"
        if limits.max_parallelism == 0:
            return Why(row.id, row.state, PAUSED, f"{pool} is paused (max_parallelism 0)")
        for rule in budget.held_by.get(row.queue, []):
            if rule == "max_parallelism":
                running = budget.running.get(row.queue, 0)
                return Why(
                    row.id,
                    row.state,
                    POOL_FULL,
                    f"{pool} is full: {running} of {limits.max_parallelism} running",
                    details={"running": running, "max_parallelism": limits.max_parallelism},
                )
            if rule == "rate_limit" and budget.rate_retry_ms is not None:
                return Why(
                    row.id,
                    row.state,
                    RATE_LIMITED,
                    f"{pool} has started {limits.rate_limit} run(s) in its rate window; "
                    f"the window lets the next one start at {_at(budget.rate_retry_ms)}",
                    until=ms_to_datetime(budget.rate_retry_ms),
                )
            if rule in (GROUP_FULL, GROUP_RESERVED):
                return self._held_by_group(row, budget, pool)
        if row.key is not None:
            return self._held_by_key(row, budget, limits, pool)
        return None

    @staticmethod
    def _held_by_group(row: Any, budget: QueueBudget, pool: str) -> Why | None:
        """Why the run's pool group leaves it no slot now: the group's cap, or the
        other members' guarantees (the group's budget, as a claim counts it)."""
        group = budget.group_of(row.queue)
        if group is None:
            return None
        own = group.members.get(row.queue)
        details: dict[str, Any] = {
            "group": group.name,
            "running": group.running,
            "max_parallelism": group.cap,
            "pool_running": own.running if own else 0,
            "guaranteed": own.guaranteed if own else 0,
        }
        if group.held_by(row.queue) == GROUP_FULL:
            message = (
                f"group full ({group.running} of {group.cap} running): {pool} shares "
                f"group {group.name!r}'s cap, and runs {details['pool_running']} of it"
            )
            return Why(row.id, row.state, GROUP_FULL, message, details=details)
        others = group.reserved_by_others(row.queue)
        details["reserved"] = others
        shown = ", ".join(f"{q!r} {n}" for q, n in sorted(others.items()))
        message = (
            f"slots reserved for other pools' guarantees: group {group.name!r} has "
            f"{group.free} free slot(s), held for {shown}; {pool} runs "
            f"{details['pool_running']}, at least its guarantee of {details['guaranteed']}, "
            f"and borrows only slots the others leave idle"
        )
        return Why(row.id, row.state, GROUP_RESERVED, message, details=details)

    @staticmethod
    def _held_by_key(
        row: Any, budget: QueueBudget, limits: QueueLimits, pool: str
    ) -> Why | None:
        """Why the run's key leaves it no slot now (its own cap or max_per_key), if
        it does: the budget's own cap of the key and its running count."""
        cap = budget.key_cap(row.queue, row.key)
        running = budget.key_running.get((row.queue, row.key), 0)
        if cap is None or running < cap:
            return Explainer._held_by_key_rate(row, budget, limits, pool)
        key = f"key {row.key!r} of {pool}"
        details = {"running": running, "max_parallelism": cap}
        if budget.own_caps.get((row.queue, row.key)) is None:
            message = f"{key} runs {running} of max_per_key={limits.max_per_key} already"
            return Why(row.id, row.state, KEY_FULL, message, details=details)
        message = (
            f"{key} is paused by its own limit (max_parallelism 0)"
            if cap == 0
            else f"{key} runs {running} of its own limit of {cap} (set_key_limit) already"
        )
        return Why(row.id, row.state, KEY_LIMIT, message, details=details)

    @staticmethod
    def _held_by_key_rate(
        row: Any, budget: QueueBudget, limits: QueueLimits, pool: str
    ) -> Why | None:
        """Why the run's key may start nothing more in its rate window now, if so."""
        retry_before = budget.rate_retry_ms
        budget.rate_retry_ms = None
        if budget.key_rate_room(row.queue, row.key) or budget.rate_retry_ms is None:
            budget.rate_retry_ms = retry_before
            return None
        until = budget.rate_retry_ms
        return Why(
            row.id,
            row.state,
            KEY_RATE_LIMITED,
            f"key {row.key!r} of {pool} has started {limits.key_rate_limit} run(s) in its "
            f"rate window (rate_limit_per_key); the window lets the next one start at "
            f"{_at(until)}",
            until=ms_to_datetime(until),
        )

    def _ahead(self, conn: Connection, row: Any, now: int) -> int:
        """The due runs of its queue a claim takes before it, in the queue's claim
        order (`_claim_order`: with priority aging, the aged runs by due time, then
        the rest by priority, then due time; without, due time then priority; where
        keys take turns, those of its own key, in due order)."""
        in_due_order = or_(
            runs.c.due_ms < row.due_ms,
            and_(runs.c.due_ms == row.due_ms, runs.c.priority > row.priority),
        )
        settings = conn.execute(
            select(queues_t.c.priority_aging_ms, queues_t.c.round_robin).where(
                queues_t.c.name == row.queue
            )
        ).first()
        aging, turns = settings if settings is not None else (None, None)
        if turns:  # keys take turns: its own key's runs ahead of it, in due order
            same = runs.c.key.is_(None) if row.key is None else runs.c.key == row.key
            before = and_(same, in_due_order)
        elif not aging:
            before = in_due_order
        elif row.due_ms <= now - aging:  # aged: only older aged runs go first
            before = in_due_order
        else:
            by_priority = or_(
                runs.c.priority > row.priority,
                and_(runs.c.priority == row.priority, runs.c.due_ms < row.due_ms),
            )
            before = or_(runs.c.due_ms <= now - aging, by_priority)
        stmt = select(func.count()).where(
            in_state(PENDING), runs.c.queue == row.queue, runs.c.due_ms <= now, before
        )
        return int(conn.execute(stmt).scalar() or 0)


def _at(ms: int | None) -> str:
    return "?" if ms is None else ms_to_datetime(ms).isoformat(timespec="milliseconds")
