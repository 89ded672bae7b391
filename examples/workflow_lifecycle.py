"""Deploying changed workflow code: restart a failed workflow from a step after a fix,
branch with `ctx.patched`, and gate a deploy with `workflows.check()`.

Run it as written (SQLite, one process):

    python examples/workflow_lifecycle.py

A module-level CODE_VERSION stands for the code a deploy would bring.
"""

from __future__ import annotations

import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retrier import Retrier
from workflow import WorkflowContext, WorkflowManager
from workpool import Workpool

retrier = Retrier(f"sqlite:///{Path(tempfile.mkdtemp()) / 'lifecycle.db'}")
workflows = WorkflowManager(Workpool(retrier, "orders", max_parallelism=5))
CODE_VERSION = 1


@retrier.action
def charge(order_id: str) -> str:
    print(f"  charged {order_id}")
    return f"ch_{order_id}"


@retrier.action
def email(order_id: str) -> None:
    print(f"  emailed the receipt of {order_id}")


@retrier.action
def save_order(order_id: str, charge_id: str) -> str:
    if CODE_VERSION == 1:
        raise RuntimeError("column 'charge_id' does not exist")  # the bug
    print(f"  saved {order_id} with {charge_id}")
    return f"saved {order_id}"


@retrier.action
def survey(order_id: str) -> None:
    print(f"  asked {order_id}'s customer for feedback")


@workflows.define
async def process_order(ctx: WorkflowContext, order_id: str) -> str:
    charge_id = await ctx.step("charge", charge, {"order_id": order_id})
    await ctx.step("email", email, {"order_id": order_id})
    return await ctx.step("save-order", save_order, {"order_id": order_id, "charge_id": charge_id})


@workflows.define
async def follow_up(ctx: WorkflowContext, order_id: str) -> None:
    await ctx.step("email", email, {"order_id": order_id})
    if CODE_VERSION == 2 and ctx.patched("add-survey"):  # a patched change
        await ctx.step("survey", survey, {"order_id": order_id})
    if CODE_VERSION == 3:  # the same change, unpatched
        await ctx.step("survey", survey, {"order_id": order_id})
    await ctx.sleep("wait-a-week", timedelta(days=7))


def main() -> None:
    global CODE_VERSION
    with retrier:  # workers in this process
        print("1. save-order fails for good:")
        wf_id = workflows.start(process_order, {"order_id": "o1"})
        print(f"  -> {workflows.wait(wf_id, timeout=30).result}")

        print("2. the fix is deployed; restart from save-order (no second charge or email):")
        CODE_VERSION = 2
        workflows.restart(wf_id, from_step="save-order")
        print(f"  -> {workflows.wait(wf_id, timeout=30).result}")

        print("3. a follow-up started on the old code sleeps for a week:")
        CODE_VERSION = 1
        sleeper = workflows.start(follow_up, {"order_id": "o1"})
        while len(workflows.steps(sleeper)) < 2:
            time.sleep(0.02)
        CODE_VERSION = 2
        print(f"  check with the patched change: ok={workflows.check().ok}")
        CODE_VERSION = 3
        for p in workflows.check().problems:
            print(f"  check with the unpatched change: {p.kind} at {p.step}: {p.found}")


if __name__ == "__main__":
    main()
