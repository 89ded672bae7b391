"""`watch`: a workflow's changes as they happen, until it ends.

Each change is read from the database, so a watcher in any process sees the changes
of every process. On PostgreSQL the watcher marks the workflow watched (for 30 s,
renewed) and reads when a notification for it arrives: the journal sends one in the
transaction of each change to a watched workflow, folded into the row lock it takes
anyway (a slow poll is the safety net). On SQLite it polls a cheap fingerprint of
the workflow (a few indexed counts).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import anyio
import anyio.from_thread
import anyio.lowlevel
from sqlalchemy import Connection, func, or_, select

from retrier.engine import ms_to_datetime

from ._errors import WorkflowNotFound
from ._journal import TOPIC, Journal
from ._models import FINISHED, logs_t, steps_t, workflows_t
from ._progress import LogLine, log_line


@dataclass(frozen=True, slots=True)
class StatusChanged:
    """The workflow's state: first as it is when watching starts, then each change.
    A finished state (`completed`, `failed`, `canceled`) is the last event."""

    workflow_id: str
    state: str
    result: Any = None  # as stored (JSON)
    error: str | None = None
    kind: Literal["status"] = "status"

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "workflow_id": self.workflow_id, "state": self.state,
                "result": self.result, "error": self.error}


@dataclass(frozen=True, slots=True)
class ProgressChanged:
    """A new value of `ctx.set_progress` (also the current one when watching starts)."""

    workflow_id: str
    progress: Any
    kind: Literal["progress"] = "progress"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "workflow_id": self.workflow_id, "progress": self.progress}


@dataclass(frozen=True, slots=True)
class StepChanged:
    """A journal entry appeared or changed state (every entry when watching starts).
    Its result is not carried: `steps()` has it."""

    workflow_id: str
    name: str
    step_kind: str  # step | sleep | event | invoke | send
    state: str  # running | waiting | completed | failed | canceled
    fn: str | None
    attempts: int
    error: str | None
    started: datetime
    finished: datetime | None
    kind: Literal["step"] = "step"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "workflow_id": self.workflow_id, "name": self.name,
            "step_kind": self.step_kind, "state": self.state, "fn": self.fn,
            "attempts": self.attempts, "error": self.error,
            "started": self.started.isoformat(),
            "finished": None if self.finished is None else self.finished.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class LogAdded:
    """A line of `ctx.log` (every stored line when watching starts)."""

    workflow_id: str
    line: LogLine
    kind: Literal["log"] = "log"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "workflow_id": self.workflow_id, **self.line.to_json()}


WatchEvent = StatusChanged | ProgressChanged | StepChanged | LogAdded

# The few values that change whenever anything the watcher reports does.
_FINGERPRINT = select(
    workflows_t.c.state,
    workflows_t.c.progress_seq,
    select(func.count()).where(steps_t.c.workflow_id == workflows_t.c.id).scalar_subquery(),
    select(func.count(steps_t.c.finished_ms))
    .where(steps_t.c.workflow_id == workflows_t.c.id)
    .scalar_subquery(),
    select(func.coalesce(func.max(logs_t.c.seq), 0))
    .where(logs_t.c.workflow_id == workflows_t.c.id)
    .scalar_subquery(),
)
_STEP_COLUMNS = (
    steps_t.c.id, steps_t.c.name, steps_t.c.kind, steps_t.c.state, steps_t.c.fn,
    steps_t.c.attempts, steps_t.c.error, steps_t.c.started_ms, steps_t.c.finished_ms,
)
_LOG_BATCH = 500
_WATCHED_MS = 30_000  # how long one request for notifications lasts (renewed)


@dataclass
class _Reader:
    """What the watcher has reported so far, and the reads that find what is new."""

    journal: Journal
    workflow_id: str
    seen: tuple[Any, ...] | None = None  # the fingerprint once all of it was reported
    state: str | None = None
    progress_seq: int = 0
    max_step_id: int = 0
    open_steps: dict[str, str] = field(default_factory=dict)  # name -> state
    log_seq: int = 0

    def read(self) -> list[WatchEvent]:
        """The events since the last read (a blocking read transaction)."""
        wf = self.workflow_id
        with self.journal.dialect.read() as conn:
            mark = conn.execute(_FINGERPRINT.where(workflows_t.c.id == wf)).first()
            if mark is None:
                raise WorkflowNotFound(wf)
            if tuple(mark) == self.seen:
                return []
            events = self._steps(conn) + self._logs(conn)
            row = conn.execute(
                select(workflows_t.c.state, workflows_t.c.result, workflows_t.c.error,
                       workflows_t.c.progress, workflows_t.c.progress_seq)
                .where(workflows_t.c.id == wf)
            ).one()
        if row.progress_seq != self.progress_seq:
            self.progress_seq = row.progress_seq
            events.append(ProgressChanged(wf, row.progress))
        logs_left = self.log_seq < mark[4]
        if row.state != self.state and not (row.state in FINISHED and logs_left):
            status = StatusChanged(wf, row.state, row.result, row.error)
            if self.state is None and row.state not in FINISHED:
                events.insert(0, status)
            else:
                events.append(status)
            self.state = row.state
        # More log lines than one batch: the next read goes on.
        self.seen = None if logs_left else tuple(mark)
        return events

    def _steps(self, conn: Connection) -> list[WatchEvent]:
        where = steps_t.c.id > self.max_step_id
        if self.open_steps:
            where = or_(where, steps_t.c.name.in_(list(self.open_steps)))
        rows = conn.execute(
            select(*_STEP_COLUMNS)
            .where(steps_t.c.workflow_id == self.workflow_id, where)
            .order_by(steps_t.c.position, steps_t.c.id)
        ).all()
        events: list[WatchEvent] = []
        for r in rows:
            self.max_step_id = max(self.max_step_id, r.id)
            if self.open_steps.get(r.name) == r.state:
                continue
            if r.finished_ms is None:
                self.open_steps[r.name] = r.state
            else:
                self.open_steps.pop(r.name, None)
            events.append(
                StepChanged(
                    self.workflow_id, r.name, r.kind, r.state, r.fn, r.attempts, r.error,
                    ms_to_datetime(r.started_ms),
                    None if r.finished_ms is None else ms_to_datetime(r.finished_ms),
                )
            )
        return events

    def _logs(self, conn: Connection) -> list[WatchEvent]:
        rows = conn.execute(
            select(logs_t)
            .where(logs_t.c.workflow_id == self.workflow_id, logs_t.c.seq > self.log_seq)
            .order_by(logs_t.c.seq)
            .limit(_LOG_BATCH)
        ).all()
        if rows:
            self.log_seq = rows[-1].seq
        return [LogAdded(self.workflow_id, log_line(r)) for r in rows]


async def watch_workflow(
    journal: Journal,
    workflow_id: str,
    *,
    poll_interval: float = 0.15,
    safety_interval: float = 2.0,
) -> AsyncIterator[WatchEvent]:
    """The events of one workflow until it ends (see `WorkflowManager.watch`)."""
    reader = _Reader(journal, workflow_id)
    dialect = journal.dialect
    wake = _Wake()
    subscription = None
    if dialect.topics_notify:
        token = anyio.lowlevel.current_token()

        def on_notify(payload: str) -> None:
            if payload in ("", workflow_id):
                try:
                    anyio.from_thread.run_sync(wake.set, token=token)
                except Exception:  # the loop is gone: nobody to tell
                    pass

        subscription = dialect.subscribe(TOPIC, on_notify)
    wait = safety_interval if subscription is not None else poll_interval
    renew_at = 0
    try:
        while True:
            wake.clear()  # before the read: a change during it wakes the next wait
            now = journal.clock.now_ms()
            if subscription is not None and now >= renew_at:
                # Ask for notifications (before the read, which sees what came before).
                await dialect.call(journal.watching, workflow_id, now + _WATCHED_MS)
                renew_at = now + _WATCHED_MS // 3
            events = await dialect.call(reader.read)
            for event in events:
                yield event
            if reader.state in FINISHED:
                return
            with anyio.move_on_after(wait):
                await wake.wait()
    finally:
        if subscription is not None:
            subscription.close()


class _Wake:
    """A resettable event, set from the listener's thread through the loop."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        if self._event.is_set():
            self._event = anyio.Event()

    async def wait(self) -> None:
        await self._event.wait()
