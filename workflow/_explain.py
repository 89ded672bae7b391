"""Why is this workflow not done? What it waits for, from its journal: a sleep, an
event, a child workflow, a step (then why that step's run waits, from the engine's
`explain`), or its driver (likewise)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from retrier import RunNotFound
from retrier.engine import RUNNING as RUN_RUNNING
from retrier.engine import Why, ms_to_datetime

from ._journal import Journal, driver_name
from ._models import CANCELED, EVENT, FINISHED, INVOKE, RUNNING, SLEEP, STEP, WAITING

# Reasons of the workflow tier (the engine's reasons apply to a step's or driver's run).
FINISHED_ = "finished"
CANCELED_ = "canceled"
SLEEPING = "sleeping"
WAITING_FOR_EVENT = "waiting_for_event"
WAITING_FOR_CHILD = "waiting_for_child"


def explain_workflow(journal: Journal, wf_id: str) -> Why:
    row = journal.get(wf_id)  # WorkflowNotFound for unknown ids
    drive_name = driver_name(row.pool)

    def why(reason: str, message: str, **more: Any) -> Why:
        return Why(wf_id, row.state, reason, message, **more)

    if row.state in FINISHED:
        if row.state == CANCELED:
            return why(CANCELED_, "canceled")
        return why(FINISHED_, f"finished: {row.state}")
    open_entries = [e for e in journal.steps(wf_id) if e["state"] in (WAITING, RUNNING)]
    for e in open_entries:
        name, until = e["name"], e["wake_ms"]
        if e["kind"] == SLEEP:
            at = ms_to_datetime(until) if until is not None else None
            text = f"sleeping in {name!r} until {at.isoformat() if at else '?'}"
            return why(SLEEPING, text, until=at)
        if e["kind"] == EVENT:
            timeout = "" if until is None else (
                f" (gives up at {ms_to_datetime(until).isoformat()})"
            )
            return why(
                WAITING_FOR_EVENT,
                f"waiting in {name!r} for event {e['event_name']!r}{timeout}",
                until=None if until is None else ms_to_datetime(until),
                details={"event": e["event_name"]},
            )
        if e["kind"] == INVOKE:
            return why(
                WAITING_FOR_CHILD,
                f"waiting in {name!r} for child workflow {e['child_id']}",
                details={"child": e["child_id"]},
            )
        if e["kind"] == STEP and e["run_id"]:
            return _of_run(journal, e["run_id"], f"step {name!r}: ", wf_id, row.state)
    runs = journal.unfinished_runs(wf_id)
    drivers = [r for r in runs if r.fn == drive_name]
    if drivers:
        running = [r for r in drivers if r.state == RUN_RUNNING]
        driver = (running or drivers)[0]
        return _of_run(journal, driver.id, "its driver: ", wf_id, row.state)
    return why(
        "unknown",
        "running, with no open journal entry and no driver run: a driver is made "
        "when the next worker's reaper or a wake-up finds it",
    )


def _of_run(journal: Journal, run_id: str, prefix: str, wf_id: str, state: str) -> Why:
    try:
        run = journal.store.explain(run_id)
    except RunNotFound:
        return Why(wf_id, state, "unknown", f"{prefix}its run {run_id} is gone")
    return replace(
        run,
        run_id=wf_id,
        state=state,
        message=prefix + run.message,
        details={**run.details, "run_id": run_id},
    )
