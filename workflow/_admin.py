"""Acting on stored workflows with only their database (no definitions, no handlers):
cancel one, send an event. `WorkflowManager.cancel` and the dashboard share `cancel`."""

from __future__ import annotations

from typing import Any

from retrier.engine import Store

from ._context import _check_event
from ._journal import Journal
from ._stopping import cancel

__all__ = ["cancel", "cancel_stored", "send_event_stored"]


def cancel_stored(store: Store, workflow_id: str) -> bool:
    """`cancel` from outside the app (the dashboard): workers hear of it through the
    database (a notification, or their next poll)."""
    return cancel(Journal(store), workflow_id, store.cancel)


def send_event_stored(store: Store, name: str, data: dict[str, Any]) -> int:
    """Store an event and wake the workflows waiting for it; returns its id. Raises
    `InvalidEvent` for a bad name or data that is not a JSON object."""
    _check_event(name, data)
    return Journal(store).events.send_event_alone(name, data)
