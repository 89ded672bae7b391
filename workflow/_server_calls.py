"""An inline step's start, and a workflow's end, on PostgreSQL as one server-side call
each (`tiers_step_v2` of migration workflow_0007, `tiers_finish_v1` of workflow_0005): one
round trip where the same transaction took nine from Python for a step (BEGIN, the
workflow's lock, the previous step's completion and its journal entry, the new entry,
the pool's lock and count, the new run, COMMIT), six for an end.

They take the plain case only, all or nothing: at most one earlier inline step's
success to store (`Previous`), kept in the journal itself; for a step, a plain run
without a key in a pool limited by `max_parallelism` and `max_per_worker` at most;
for an end, a workflow without a deadline, an on_complete or a parent. Anything else
(`NotSimple`) goes the general way (`Journal.start_step`, `Journal.finish`), which
writes nothing twice: the call that refused wrote nothing. A pool the step function
sent back for its limits is not tried again in this process.

Starts and ends that many workflows make at the same moment go together (`many`,
through `tiers_batch_v1` of workflow_0008, sent by `_batched_calls`): one call and one
commit, each answered as if it had been made alone.
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

_STEP = (
    "SELECT tiers_step_v2(%(wf)s::text, %(now)s::bigint, %(channel)s::text,"
    " %(worker)s::text, %(lease_ms)s::bigint, %(prev_run)s::text,"
    " %(prev_fence)s::integer, %(prev_result)s::json, %(prev_started)s::bigint,"
    " %(prev_step)s::text, %(name)s::text, %(position)s::integer, %(fn)s::text,"
    " %(started)s::bigint, %(run)s::json)"
)
_FINISH = (
    "SELECT tiers_finish_v1(%(wf)s::text, %(now)s::bigint, %(channel)s::text,"
    " %(worker)s::text, %(prev_run)s::text, %(prev_fence)s::integer,"
    " %(prev_result)s::json, %(prev_started)s::bigint, %(prev_step)s::text,"
    " %(state)s::text, %(result)s::json, %(error)s::text)"
)
# At most this many items per `tiers_batch_v1` call: each is a subtransaction, and a
# backend keeps 64 of them in shared memory (see migration workflow_0008).
MOST_PER_CALL = 32
_BATCH = "SELECT tiers_batch_v1(%(channel)s::text, %(items)s::json)"
_NOT_SIMPLE = "TS001"  # the previous outcome cannot simply complete
_NOT_RUNNING = "TS002"
_GENERAL = "TS003"  # limits of the pool, or ways of the workflow, left to the general path


class NotSimple(Exception):
    """The general path must start this step (nothing was written)."""


class TryAlone(Exception):
    """An item failed in a batch with an error of its own (nothing of it was written):
    made alone (`one`), it raises that error for its own workflow only."""


@dataclass(frozen=True, slots=True)
class Previous:
    """An earlier inline step's success, stored by the start of the next step."""

    run_id: str
    fence: int
    result: Any
    started_ms: int
    step: str  # its journal entry's name


@dataclass(frozen=True, slots=True)
class SimpleSettle:
    """A workflow's unsettled inline outcomes, where a server-side call may store them:
    `previous` (None: no outcome is waiting), and what to call once it did
    (`Worker.recorded_elsewhere`)."""

    previous: Previous | None
    stored: Callable[[], None]
    worker: str  # the worker holding their runs


class ServerCalls:
    """Starts steps and ends workflows through the server-side functions, for one
    store (PostgreSQL only)."""

    def __init__(self, store: Store, channel: str) -> None:
        self.store = store
        self.channel = channel
        self._general_pools: set[str] = set()

    def prepare(
        self,
        workflow_id: str,
        entry: dict[str, Any],
        new: NewRun,
        worker: str,
        lease_ms: int,
        previous: Previous | None,
    ) -> StepStart:
        """A step's start (`Journal.start_step`'s plain case), for `start_one` or
        `many`: its new run, held by `worker` if the pool has room (the caller runs it
        inline), else pending in the pool. `NotSimple` if the general path must make
        it; `NotRunning` and `Conflict` as there, once made."""
        if not new.plain or new.key is not None or new.queue in self._general_pools:
            raise NotSimple
        now = self.store.clock.now_ms()
        params = self._common(workflow_id, now, worker, previous)
        row = self.store.pending_row(new, now)
        params |= {
            "lease_ms": lease_ms,
            "name": entry["name"],
            "position": entry["position"],
            "fn": entry.get("fn"),
            "started": entry["started_ms"],
            "run": row,
        }
        return StepStart(new, row, params)

    def start_one(self, start: StepStart) -> Claimed | None:
        """One prepared start, through `tiers_step_v2`."""
        params = start.params | {
            "run": json.dumps(start.row),
            "prev_result": _json_text(start.params),
        }
        try:
            took = self._call(_STEP, params, internal=True)
        except _General:
            self._general_pools.add(start.new.queue)
            raise NotSimple from None
        return start.claimed() if took else None

    def prepare_end(
        self,
        workflow_id: str,
        state: str,
        result: Any,
        error: str | None,
        worker: str,
        previous: Previous | None,
    ) -> WorkflowEnd:
        """A workflow's end (`Journal.finish`'s plain case: no deadline, on_complete or
        parent), for `end_one` or `many`: True once written, False if it had ended
        already (nothing written). `NotSimple` if the general path must make it."""
        params = self._common(workflow_id, self.store.clock.now_ms(), worker, previous)
        params |= {"end": True, "state": state, "result": result, "error": error}
        return WorkflowEnd(params)

    def end_one(self, end: WorkflowEnd) -> bool:
        """One prepared end, through `tiers_finish_v1`."""
        params = end.params | {
            "prev_result": _json_text(end.params),
            "result": json.dumps(end.params["result"]),
        }
        try:
            return self._call(_FINISH, params, internal=False)
        except _General:
            raise NotSimple from None

    # -- many at once ------------------------------------------------------------------

    def one(self, item: StepStart | WorkflowEnd) -> Claimed | bool | None:
        """`start_one` or `end_one`, as `item` is."""
        if isinstance(item, StepStart):
            return self.start_one(item)
        return self.end_one(item)

    def many(self, items: list[StepStart | WorkflowEnd]) -> str:
        """Prepared starts and ends (of any workflows, at most `MOST_PER_CALL`) in one
        call of `tiers_batch_v1` that commits once: one answer each, for `answered`.
        With an end among them it commits as an end does (the user's durability)."""
        text = json.dumps([item.params for item in items])
        dialect = self.store.dialect
        ends = any(isinstance(item, WorkflowEnd) for item in items)
        with dialect.write_one() if ends else dialect.write_internal_one() as conn:
            _, rows = on_cursor(
                conn, _BATCH, [{"channel": self.channel, "items": text}],
                self.store.engine.dialect, fetch=True,
            )
        answers = str(rows[0][0])
        assert len(answers) == len(items), answers
        return answers

    def answered(self, item: StepStart | WorkflowEnd, answer: str) -> Claimed | bool | None:
        """What `one(item)` would have returned or raised, from its answer in `many`;
        `TryAlone` if only `one` can tell (an error of its own)."""
        if answer == "r" and isinstance(item, StepStart):
            return item.claimed()
        if answer == "p":
            return None
        if answer in ("t", "f"):
            return answer == "t"
        if answer == "2":
            raise NotRunning(item.params["wf"])
        if answer == "c":
            raise Conflict(f"step {item.params.get('name')!r} is journaled already")
        if answer == "e":
            raise TryAlone
        if answer == "3" and isinstance(item, StepStart):
            self._general_pools.add(item.new.queue)
        raise NotSimple  # "1" (the previous outcome), "3" (the pool's or workflow's ways)

    def _common(
        self, workflow_id: str, now: int, worker: str, previous: Previous | None
    ) -> dict[str, Any]:
        """The parameters both functions take: the workflow, the time, its watchers'
        channel, the worker, and the previous inline step's success, if any (its
        result as a value: `_json_text` makes it a parameter of its own)."""
        prev_result = None
        if previous is not None:
            columns = result_columns(previous.result, f"the result of step {previous.step!r}")
            if columns["result_size"] is not None:
                raise NotSimple  # kept in the side table: the general path writes it
            prev_result = previous.result
        return {
            "wf": workflow_id,
            "now": now,
            "channel": self.channel,
            "worker": worker,
            "prev_run": None if previous is None else previous.run_id,
            "prev_fence": None if previous is None else previous.fence,
            "prev_result": prev_result,
            "prev_started": None if previous is None else previous.started_ms,
            "prev_step": None if previous is None else previous.step,
        }

    def _call(self, sql: str, params: dict[str, Any], *, internal: bool) -> bool:
        """One function call that commits alone (the engine's own durability for a
        step's start, the user's for a workflow's end); its boolean answer."""
        dialect = self.store.dialect
        try:
            with dialect.write_internal_one() if internal else dialect.write_one() as conn:
                _, rows = on_cursor(conn, sql, [params], self.store.engine.dialect, fetch=True)
        except IntegrityError as exc:
            raise Conflict(str(exc)) from None
        except DBAPIError as exc:
            code = getattr(exc.orig, "sqlstate", None)
            if code == _NOT_RUNNING:
                raise NotRunning(params["wf"]) from None
            if code == _GENERAL:
                raise _General from None
            if code == _NOT_SIMPLE:
                raise NotSimple from None
            raise
        return bool(rows[0][0])


class _General(Exception):
    """The function left this case to the general path (`TS003`)."""


@dataclass(frozen=True, slots=True)
class StepStart:
    """A step's start, prepared (`ServerCalls.prepare`): its new run, the run's row,
    and the parameters of `tiers_step_v2` (the row and the previous result as values,
    which a batch's JSON array takes as they are)."""

    new: NewRun
    row: dict[str, Any]
    params: dict[str, Any]

    def claimed(self) -> Claimed:
        """The new run, held by the worker that started it."""
        p = self.params
        self.row.update(running_values(p["worker"], p["lease_ms"], p["now"]))
        return claimed_inline(self.new, self.row)


@dataclass(frozen=True, slots=True)
class WorkflowEnd:
    """A workflow's end, prepared (`ServerCalls.prepare_end`): the parameters of
    `tiers_finish_v1`, its result and the previous result as values."""

    params: dict[str, Any]


def _json_text(params: dict[str, Any]) -> str | None:
    """The previous result as a json parameter: NULL without a previous step."""
    return None if params["prev_run"] is None else json.dumps(params["prev_result"])
