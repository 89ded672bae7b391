"""Restarting a finished workflow from one of its journaled steps.

In one transaction: the journal entries from the named step on (by position in call
order) are deleted, the workflow is running again with no result, error or end time,
the run that delivered its on_complete is deleted (so its next end delivers it again),
running children invoked from the deleted entries are detached from it, and a driver
run is due now. After the commit, those children are canceled and the unfinished runs
of the deleted steps are canceled (a run that still ends cannot settle the new entry
of the same name: a step's entry is settled only by its own run).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, delete, select, update

from retrier import RunNotFound
from retrier.engine import COMPLETED as RUN_COMPLETED
from retrier.engine import RUNNING as RUN_RUNNING

from ._errors import CannotRestart, StepNotFound, WorkflowNotFound
from ._journal import Journal, driver_name
from ._limits import drop_results
from ._models import INVOKE, PATCH, RUNNING, steps_t, workflows_t

_OCCURRENCE = re.compile(r"\[\d+\]$")
_DRIVER_PATIENCE_S = 5.0


class DriverStillRunning(CannotRestart):
    """A driver run of the workflow has not finished yet (its pass may still write)."""


@dataclass(slots=True)
class Restarted:
    """What a restart dropped: the journal entries deleted, the runs and children to cancel."""

    deleted: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)


def restart(
    journal: Journal,
    workflow_id: str,
    from_step: str,
    cancel_run: Callable[[str], Any],
    cancel_child: Callable[[str], Any],
) -> Restarted:
    """Restart a finished workflow from `from_step` (see the module docstring).

    A driver run that ended the workflow is recorded a moment after the workflow's
    end: while one of its drivers is still running, this waits for it, up to
    `_DRIVER_PATIENCE_S`, before refusing with `CannotRestart`.
    """
    deadline = time.monotonic() + _DRIVER_PATIENCE_S
    pause = 0.01
    while True:
        try:
            done = reset(journal, workflow_id, from_step)
            break
        except DriverStillRunning:
            if time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.25)
    for run_id in done.runs:
        try:
            cancel_run(run_id)
        except RunNotFound:
            pass
    for child in done.children:
        cancel_child(child)
    return done


def reset(journal: Journal, workflow_id: str, from_step: str) -> Restarted:
    """The transaction of `restart`. Raises `WorkflowNotFound`, `CannotRestart` or
    `StepNotFound` before writing anything."""
    if not isinstance(from_step, str) or not from_step:
        raise StepNotFound(workflow_id, repr(from_step), [])
    with journal.dialect.write() as conn:
        row = journal.lock(conn, workflow_id)
        if row is None:
            raise WorkflowNotFound(workflow_id)
        if row.state == RUNNING:
            raise CannotRestart(
                f"workflow {workflow_id!r} is running; cancel it (or wait for it to end) "
                f"before restarting it"
            )
        owned = journal.store.unfinished_of(conn, workflow_id)
        drive = driver_name(_pool_of(conn, workflow_id))
        if any(r.fn == drive and r.state == RUN_RUNNING for r in owned):
            raise DriverStillRunning(
                f"a driver of workflow {workflow_id!r} is still finishing its last pass; "
                f"try again in a moment"
            )
        entries = list(
            conn.execute(select(steps_t).where(steps_t.c.workflow_id == workflow_id)).mappings()
        )
        position = _position_of(workflow_id, from_step, entries)
        dropped = [e for e in entries if e["position"] >= position]
        if row.on_complete is not None:
            state = journal.store.delete_completed(conn, workflow_id)
            if state not in (None, RUN_COMPLETED):
                raise CannotRestart(
                    f"the on_complete of workflow {workflow_id!r}'s previous end is still "
                    f"being delivered; restart it once that is over"
                )
        done = Restarted(deleted=[e["name"] for e in dropped])
        done.children = _detach_children(conn, workflow_id, dropped)
        step_runs = {e["run_id"] for e in dropped if e["run_id"] is not None}
        done.runs = [r.id for r in owned if r.id in step_runs]
        conn.execute(
            delete(steps_t).where(
                steps_t.c.workflow_id == workflow_id, steps_t.c.position >= position
            )
        )
        deadline = None
        if row.deadline_ms is not None:  # a deadline as long as the first, from now
            deadline = journal.clock.now_ms() + (row.deadline_ms - row.created_ms)
            journal.arm_deadline(conn, workflow_id, row.pool, deadline)
        drop_results(conn, workflow_id, done.deleted)
        # The code runs again from its start: its progress and log lines are the new run's.
        journal.progress.forget(conn, workflow_id)
        conn.execute(
            update(workflows_t)
            .where(workflows_t.c.id == workflow_id)
            .values(
                state=RUNNING,
                result=None,
                error=None,
                finished_ms=None,
                unrunnable_since_ms=None,
                deadline_ms=deadline,
            )
        )
        journal.wake(conn, workflow_id)
    return done


def _pool_of(conn: Connection, workflow_id: str) -> str:
    return str(
        conn.execute(select(workflows_t.c.pool).where(workflows_t.c.id == workflow_id)).scalar()
    )


def _position_of(workflow_id: str, from_step: str, entries: list[Any]) -> int:
    """The position of the named step: `save` is `save[0]`; `save[2]` its third call."""
    full = from_step if _OCCURRENCE.search(from_step) else f"{from_step}[0]"
    for e in entries:
        if e["name"] == full and e["kind"] != PATCH:
            return int(e["position"])
    ordered = sorted(entries, key=lambda e: (e["position"], e["id"]))
    raise StepNotFound(workflow_id, from_step, [e["name"] for e in ordered if e["kind"] != PATCH])


def _detach_children(conn: Connection, workflow_id: str, dropped: list[Any]) -> list[str]:
    """Running children invoked from dropped entries no longer report to this workflow
    (a new invoke of the same name starts a new child); returns them, to cancel."""
    ids = [e["child_id"] for e in dropped if e["kind"] == INVOKE and e["child_id"]]
    if not ids:
        return []
    running = list(
        conn.execute(
            select(workflows_t.c.id).where(
                workflows_t.c.id.in_(ids), workflows_t.c.state == RUNNING
            )
        ).scalars()
    )
    if running:
        conn.execute(
            update(workflows_t).where(workflows_t.c.id.in_(running)).values(parent_step=None)
        )
    return running
