"""What a work item is doing: `Pending`, `Running` or `Finished`, as in Convex's workpool."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from retrier.engine import PENDING, RUNNING, RunRow


@dataclass(frozen=True, slots=True)
class Pending:
    """Waiting for a slot, its due time, or its next retry's backoff.

    `previous_attempts` counts the attempts that already finished (and failed).
    """

    previous_attempts: int
    state: Literal["pending"] = "pending"


@dataclass(frozen=True, slots=True)
class Running:
    """An attempt is running now; `previous_attempts` finished before it."""

    previous_attempts: int
    state: Literal["running"] = "running"


@dataclass(frozen=True, slots=True)
class Finished:
    """Succeeded, failed for good or canceled; `Workpool.wait` gives the result."""

    state: Literal["finished"] = "finished"


WorkStatus = Pending | Running | Finished


def status_of(row: RunRow) -> WorkStatus:
    """The status a stored run row stands for."""
    if row.state == PENDING:
        return Pending(previous_attempts=row.attempts)
    if row.state == RUNNING:
        return Running(previous_attempts=max(row.attempts - 1, 0))
    return Finished()  # delivering, finishing or completed: its outcome is final
