"""An expense approval: wait for a manager's decision for a while, else escalate.

Run it as written (SQLite, one process):

    python examples/approval_workflow.py

Two requests are started. One is approved by an event; the other hears nothing
within its timeout (2 s here; hours in real life) and is escalated.
"""

from __future__ import annotations

import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retrier import Retrier
from workflow import WorkflowContext, WorkflowManager
from workpool import RetryBehavior, Workpool

retrier = Retrier(f"sqlite:///{Path(tempfile.mkdtemp()) / 'approvals.db'}")
pool = Workpool(
    retrier,
    "approvals",
    max_parallelism=5,
    retry_actions_by_default=True,
    default_retry_behavior=RetryBehavior(max_attempts=3, initial_backoff_ms=200, base=2),
)
workflows = WorkflowManager(pool)


@retrier.action
def notify_manager(request_id: str, amount: int) -> None:
    print(f"  [{request_id}] asked the manager to approve {amount} EUR")


@retrier.action
def pay_out(request_id: str, approver: str) -> str:
    print(f"  [{request_id}] paid, approved by {approver}")
    return f"payment-{request_id}"


@retrier.action
def escalate(request_id: str) -> None:
    print(f"  [{request_id}] no answer in time: escalated to finance")


@retrier.on_complete
def report(workflow_id: str, result: Any, context: Any) -> None:
    print(f"  [{context['request_id']}] workflow finished: {result}")


@workflows.define
async def expense_approval(ctx: WorkflowContext, request_id: str, amount: int) -> str:
    await ctx.step("notify-manager", notify_manager, {"request_id": request_id, "amount": amount})
    decision = await ctx.wait_for_event(
        "wait-for-decision",
        "expense/decided",
        match="request_id",  # only events whose data["request_id"] is ours
        timeout=timedelta(seconds=2),
    )
    if decision is None:
        await ctx.step("escalate", escalate, {"request_id": request_id})
        return "escalated"
    if not decision["approved"]:
        return "rejected"
    return str(
        await ctx.step("pay-out", pay_out, {"request_id": request_id, "approver": decision["by"]})
    )


def main() -> None:
    with retrier:  # an in-process worker; `tiers worker module:workflows` runs standalone ones
        ids = [
            workflows.start(
                expense_approval,
                {"request_id": rid, "amount": amount},
                on_complete=report,
                context={"request_id": rid},
                idempotency_key=f"expense-{rid}",  # starting twice returns the same workflow
            )
            for rid, amount in (("r1", 120), ("r2", 900))
        ]
        time.sleep(0.5)
        workflows.send_event("expense/decided", {"request_id": "r1", "approved": True, "by": "ann"})
        for wf_id in ids:
            print(f"{wf_id}: {workflows.wait(wf_id, timeout=30)}")
    retrier.close()


if __name__ == "__main__":
    main()
