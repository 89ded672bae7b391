"""durable-tiers, tier 3: durable multi-step workflows on the workpool and retrier.

>>> workflows = WorkflowManager(pool)
>>> @workflows.define
... async def process_order(ctx: WorkflowContext, order_id: str, amount: int) -> dict:
...     charge = await ctx.step("charge-customer", charge_card, {"amount": amount})
...     await ctx.sleep("wait-day", timedelta(days=1))
...     return {"charge": charge}
>>> wf_id = workflows.start(process_order, {"order_id": "o1", "amount": 100})

See docs/workflow.md for every option and the determinism rules.
"""

from __future__ import annotations

from retrier import Debounce

from ._check import CheckProblem, CheckReport
from ._context import WorkflowContext
from ._errors import (
    CannotRestart,
    InvalidEvent,
    InvalidWorkflow,
    StepFailed,
    StepNotFound,
    UnregisteredWorkflow,
    WorkflowDiverged,
    WorkflowNotFinished,
    WorkflowNotFound,
)
from ._listeners import WorkflowEvent
from ._manager import StepInfo, WorkflowInfo, WorkflowManager
from ._progress import LogLine, WorkflowLog
from ._watch import LogAdded, ProgressChanged, StatusChanged, StepChanged, WatchEvent

__all__ = [
    "CannotRestart",
    "CheckProblem",
    "CheckReport",
    "Debounce",
    "InvalidEvent",
    "InvalidWorkflow",
    "LogAdded",
    "LogLine",
    "ProgressChanged",
    "StatusChanged",
    "StepChanged",
    "StepFailed",
    "StepInfo",
    "StepNotFound",
    "UnregisteredWorkflow",
    "WatchEvent",
    "WorkflowContext",
    "WorkflowDiverged",
    "WorkflowEvent",
    "WorkflowInfo",
    "WorkflowLog",
    "WorkflowManager",
    "WorkflowNotFinished",
    "WorkflowNotFound",
]
