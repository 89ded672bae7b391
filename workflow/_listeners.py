"""In-process listeners for workflow lifecycle events (`run:fail`, `step:fail`, ...)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from retrier import InvalidSettings

log = logging.getLogger("tiers.workflow")

EVENTS = ("run:complete", "run:fail", "step:fail")


@dataclass(frozen=True, slots=True)
class WorkflowEvent:
    """What a listener receives: which workflow, and what happened to it."""

    kind: str  # one of EVENTS
    workflow_id: str
    workflow: str
    step: str | None = None
    error: str | None = None
    result: Any = None


Listener = Callable[[WorkflowEvent], None]


class Listeners:
    """Handlers by event kind. They run in the process where the event happened, after
    its transaction committed; one that raises is logged and does not stop the others."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[Listener]] = {kind: [] for kind in EVENTS}
        self._lock = threading.Lock()

    def add(self, kind: str, handler: Listener) -> None:
        if kind not in self._handlers:
            raise InvalidSettings(f"unknown workflow event {kind!r}; use one of {EVENTS}")
        with self._lock:
            self._handlers[kind].append(handler)

    def emit(self, event: WorkflowEvent) -> None:
        for handler in list(self._handlers[event.kind]):
            try:
                handler(event)
            except Exception:
                log.exception("workflow listener for %s raised", event.kind)
