"""Acting on stored workflows with only their database (no definitions, no handlers):
cancel one, restart one, send an event. `WorkflowManager` and the dashboard share them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from retrier import RunNotFound
from retrier.engine import Store

from ._context import _check_event
from ._driver import completion_run
from ._journal import Journal, driver_name
from ._restart import Restarted
from ._restart import restart as reset_and_cancel


def cancel(journal: Journal, workflow_id: str, cancel_run: Callable[[str], Any]) -> bool:
    """Cancel a running workflow and, through `cancel_run`, its unfinished runs, then
    its running children; False if it had already ended. Raises `WorkflowNotFound`."""
    pool = journal.get(workflow_id).pool
    clock = journal.clock
    changed, children, run_ids = journal.cancel(
        workflow_id, lambda row: completion_run(row, clock.now_ms()), driver_name(pool)
    )
    if not changed:
        return False
    for run_id in run_ids:
        try:
            cancel_run(run_id)
        except RunNotFound:
            pass
    for child in children:
        cancel(journal, child, cancel_run)
    return True


def restart(
    journal: Journal, workflow_id: str, from_step: str, cancel_run: Callable[[str], Any]
) -> Restarted:
    """Restart a finished workflow from a journaled step (see `WorkflowManager.restart`)."""
    return reset_and_cancel(
        journal,
        workflow_id,
        from_step,
        cancel_run,
        lambda child: cancel(journal, child, cancel_run),
    )


def restart_stored(store: Store, workflow_id: str, from_step: str) -> Restarted:
    """`restart` from outside the app (the dashboard)."""
    return restart(Journal(store), workflow_id, from_step, store.cancel)


def cancel_stored(store: Store, workflow_id: str) -> bool:
    """`cancel` from outside the app (the dashboard): workers hear of it through the
    database (a notification, or their next poll)."""
    return cancel(Journal(store), workflow_id, store.cancel)


def send_event_stored(store: Store, name: str, data: dict[str, Any]) -> int:
    """Store an event and wake the workflows waiting for it; returns its id. Raises
    `InvalidEvent` for a bad name or data that is not a JSON object."""
    _check_event(name, data)
    return Journal(store).events.send_event_alone(name, data)
