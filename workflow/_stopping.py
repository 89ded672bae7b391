"""Ending a running workflow early, with what it leaves running: canceled (by a user
or the dashboard) or failed at its deadline. Its unfinished steps are canceled (a
running one best effort, as `Retrier.cancel` does), then its running children."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from retrier import RunNotFound
from retrier.engine import NewRun

from ._journal import Journal, Stopped

Completion = Callable[[Any], NewRun | None]
"""The run that delivers an ended workflow's on_complete (`Driver.completion`)."""


def cancel(
    journal: Journal,
    workflow_id: str,
    cancel_run: Callable[[str], Any],
    completion: Completion,
) -> bool:
    """Cancel a running workflow and, through `cancel_run`, its unfinished runs, then
    its running children; False if it had already ended. Raises `WorkflowNotFound`."""
    stopped = journal.cancel(workflow_id, completion)
    _cancel_rest(journal, stopped, cancel_run, completion)
    return stopped.ended


def expire(
    journal: Journal,
    workflow_id: str,
    cancel_run: Callable[[str], Any],
    completion: Completion,
) -> Stopped:
    """Fail a running workflow past its deadline, then cancel what it leaves running
    (as `cancel` does). Blocking."""
    stopped = journal.expire(workflow_id, completion)
    _cancel_rest(journal, stopped, cancel_run, completion)
    return stopped


def _cancel_rest(
    journal: Journal, stopped: Stopped, cancel_run: Callable[[str], Any], completion: Completion
) -> None:
    if not stopped.ended:
        return
    for run_id in stopped.run_ids:
        try:
            cancel_run(run_id)
        except RunNotFound:
            pass
    for child in stopped.children:
        cancel(journal, child, cancel_run, completion)
