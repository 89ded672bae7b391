"""Ending a running workflow early, with what it leaves running: canceled (by a user
or the dashboard) or failed at its deadline. Its unfinished steps are canceled (a
running one best effort, as `Retrier.cancel` does), then its running children."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from retrier import RunNotFound

from ._journal import Journal, Stopped, completion_run


def cancel(journal: Journal, workflow_id: str, cancel_run: Callable[[str], Any]) -> bool:
    """Cancel a running workflow and, through `cancel_run`, its unfinished runs, then
    its running children; False if it had already ended. Raises `WorkflowNotFound`."""
    stopped = journal.cancel(workflow_id, partial_completion(journal))
    _cancel_rest(journal, stopped, cancel_run)
    return stopped.ended


def expire(journal: Journal, workflow_id: str, cancel_run: Callable[[str], Any]) -> Stopped:
    """Fail a running workflow past its deadline, then cancel what it leaves running
    (as `cancel` does). Blocking."""
    stopped = journal.expire(workflow_id, partial_completion(journal))
    _cancel_rest(journal, stopped, cancel_run)
    return stopped


def partial_completion(journal: Journal) -> Callable[[Any], Any]:
    """The run that delivers an ended workflow's on_complete, stamped now."""
    clock = journal.clock
    return lambda row: completion_run(row, clock.now_ms())


def _cancel_rest(journal: Journal, stopped: Stopped, cancel_run: Callable[[str], Any]) -> None:
    if not stopped.ended:
        return
    for run_id in stopped.run_ids:
        try:
            cancel_run(run_id)
        except RunNotFound:
            pass
    for child in stopped.children:
        cancel(journal, child, cancel_run)
