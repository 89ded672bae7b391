"""Outcomes and statuses of runs, as frozen value objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class Success:
    """The action returned `value` (decoded back to the action's return type)."""

    value: Any
    kind: Literal["success"] = "success"


@dataclass(frozen=True, slots=True)
class Failed:
    """The action failed for good: retries exhausted, or a non-retryable error."""

    error: str
    kind: Literal["failed"] = "failed"


@dataclass(frozen=True, slots=True)
class Canceled:
    """The run was canceled before it could finish."""

    kind: Literal["canceled"] = "canceled"


RunResult = Success | Failed | Canceled


@dataclass(frozen=True, slots=True)
class InProgress:
    """The run is pending, backing off between attempts, or running.

    `progress`: what a workflow last reported with `ctx.set_progress` (None for runs,
    and until then); not part of equality, so `status == InProgress()` still holds.
    """

    state: Literal["in_progress"] = "in_progress"
    progress: Any = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Completed:
    """The run has finished with `result`."""

    result: RunResult
    state: Literal["completed"] = "completed"


RunStatus = InProgress | Completed
