"""An inline step's start on PostgreSQL as one server-side call (`tiers_step_v1`,
created by migration workflow_0005): one round trip where the same transaction took
nine from Python (BEGIN, the workflow's lock, the previous step's completion and its
journal entry, the new entry, the pool's lock and count, the new run, COMMIT).

It takes the plain case only, all or nothing: at most one earlier inline step's
success to store (`Previous`), kept in the journal itself, a plain run without a key,
a pool limited by `max_parallelism` and `max_per_worker` at most. Anything else
(`NotSimple`) goes the general way (`Journal.start_step`), which writes nothing
twice: the call that refused wrote nothing. A pool the function sent back for its
limits is not tried again in this process.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DBAPIError, IntegrityError

from retrier.engine import (
    Claimed,
    NewRun,
    Store,
    claimed_inline,
    on_cursor,
    running_values,
)

from ._journal_signals import Conflict, NotRunning
from ._limits import result_columns

_CALL = (
    "SELECT tiers_step_v1(%(wf)s::text, %(now)s::bigint, %(channel)s::text,"
    " %(worker)s::text, %(lease_ms)s::bigint, %(prev_run)s::text,"
    " %(prev_fence)s::integer, %(prev_result)s::json, %(prev_started)s::bigint,"
    " %(prev_step)s::text, %(name)s::text, %(position)s::integer, %(fn)s::text,"
    " %(started)s::bigint, %(run)s::json)"
)
_NOT_SIMPLE = "TS001"  # the previous outcome cannot simply complete
_NOT_RUNNING = "TS002"
_POOL_LIMITS = "TS003"  # the pool has limits the function leaves to the general path


class NotSimple(Exception):
    """The general path must start this step (nothing was written)."""


@dataclass(frozen=True, slots=True)
class Previous:
    """An earlier inline step's success, stored by the start of the next step."""

    run_id: str
    fence: int
    result: Any
    started_ms: int
    step: str  # its journal entry's name


@dataclass(frozen=True, slots=True)
class SimpleStart:
    """A start the server-side call may do: `previous` to store first (None: no
    outcome is waiting), and what to call once it did (`Worker.recorded_elsewhere`)."""

    previous: Previous | None
    stored: Callable[[], None]


class ServerStep:
    """Starts steps through `tiers_step_v1` for one store (PostgreSQL only)."""

    def __init__(self, store: Store, channel: str) -> None:
        self.store = store
        self.channel = channel
        self._general_pools: set[str] = set()

    def start(
        self,
        workflow_id: str,
        entry: dict[str, Any],
        new: NewRun,
        worker: str,
        lease_ms: int,
        previous: Previous | None,
    ) -> Claimed | None:
        """`Journal.start_step` in one call: the new run, held by `worker` if the pool
        had room (the caller runs it inline), else None (pending in the pool).
        `NotSimple` if the general path must do it; `NotRunning`, `Conflict` as there."""
        if not new.plain or new.key is not None or new.queue in self._general_pools:
            raise NotSimple
        prev_result = None
        if previous is not None:
            columns = result_columns(previous.result, f"the result of step {previous.step!r}")
            if columns["result_size"] is not None:
                raise NotSimple  # kept in the side table: the general path writes it
            prev_result = json.dumps(previous.result)
        now = self.store.clock.now_ms()
        row = self.store.pending_row(new, now)
        params = {
            "wf": workflow_id,
            "now": now,
            "channel": self.channel,
            "worker": worker,
            "lease_ms": lease_ms,
            "prev_run": None if previous is None else previous.run_id,
            "prev_fence": None if previous is None else previous.fence,
            "prev_result": prev_result,
            "prev_started": None if previous is None else previous.started_ms,
            "prev_step": None if previous is None else previous.step,
            "name": entry["name"],
            "position": entry["position"],
            "fn": entry.get("fn"),
            "started": entry["started_ms"],
            "run": json.dumps(row),
        }
        took = self._call(workflow_id, new.queue, params)
        if not took:
            return None
        row.update(running_values(worker, lease_ms, now))
        return claimed_inline(new, row)

    def _call(self, workflow_id: str, pool: str, params: dict[str, Any]) -> bool:
        engine = self.store.engine
        try:
            with self.store.dialect.write_internal_one() as conn:
                _, rows = on_cursor(conn, _CALL, [params], engine.dialect, fetch=True)
        except IntegrityError as exc:
            raise Conflict(str(exc)) from None
        except DBAPIError as exc:
            code = getattr(exc.orig, "sqlstate", None)
            if code == _NOT_RUNNING:
                raise NotRunning(workflow_id) from None
            if code == _POOL_LIMITS:
                self._general_pools.add(pool)
            if code in (_NOT_SIMPLE, _POOL_LIMITS):
                raise NotSimple from None
            raise
        return bool(rows[0][0])
