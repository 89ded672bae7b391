"""A small, realistic database for the dashboard's tests and screenshots: succeeded,
failed (with a traceback) and scheduled runs, a paused pool with waiting items, and
workflows (one finished, one waiting for an approval event)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from retrier import NonRetryableError, Retrier, testing
from workflow import WorkflowContext, WorkflowManager
from workpool import Workpool


@dataclass
class Demo:
    retrier: Retrier
    pool: Workpool
    workflows: WorkflowManager
    ids: dict[str, Any] = field(default_factory=dict)


def build(url: str, **options: Any) -> Demo:
    """The app: actions, a pool 'emails' and workflows in pool 'orders'."""
    options.setdefault("lease", timedelta(seconds=5))
    retrier = Retrier(url, **options)

    @retrier.action
    def charge_card(order_id: str, amount: int) -> dict[str, Any]:
        return {"charge": f"ch_{order_id}", "amount": amount}

    @retrier.action
    def call_webhook(url: str) -> None:
        raise NonRetryableError(f"{url} answered 410 Gone")

    @retrier.action
    def send_email(to: str, subject: str) -> str:
        time.sleep(0.05)
        return f"sent to {to}"

    @retrier.on_complete
    def log_outcome(run_id: str, result: Any, context: Any) -> None:
        pass

    pool = Workpool(retrier, "emails", max_parallelism=0, rate_limit=(100, 60), max_per_key=2)
    steps = Workpool(retrier, "orders", max_parallelism=4)
    workflows = WorkflowManager(steps)

    @workflows.define
    async def approve_order(ctx: WorkflowContext, order_id: str) -> str:
        await ctx.step("charge", charge_card, {"order_id": order_id, "amount": 120})
        ctx.log.info("charged order %s", order_id)
        ctx.set_progress({"stage": "awaiting approval"})
        approval = await ctx.wait_for_event("approval", "approved", match="order_id")
        await ctx.step("email", send_email, {"to": "ops@example.com", "subject": order_id})
        return f"approved by {(approval or {}).get('by', '?')}"

    demo = Demo(retrier, pool, workflows)
    demo.ids.update(
        charge_card=charge_card, call_webhook=call_webhook, send_email=send_email,
        approve_order=approve_order, log_outcome=log_outcome,
    )
    return demo


def populate(demo: Demo) -> dict[str, Any]:
    """Runs and workflows in every interesting state; returns their ids."""
    r, ids = demo.retrier, demo.ids
    out: dict[str, Any] = {}
    out["succeeded"] = [
        r.run(ids["charge_card"], {"order_id": f"o{i}", "amount": 10 * i}) for i in range(5)
    ]
    out["failed"] = r.run(
        ids["call_webhook"], {"url": "https://hooks.example.com/x"}, on_complete=ids["log_outcome"]
    )
    out["done_workflow"] = demo.workflows.start(ids["approve_order"], {"order_id": "o-100"})
    out["waiting_workflow"] = demo.workflows.start(ids["approve_order"], {"order_id": "o-200"})
    testing.drain(r)
    demo.workflows.send_event("approved", {"order_id": "o-100", "by": "ana"})
    testing.drain(r)
    out["scheduled"] = r.run_after(
        timedelta(hours=1), ids["send_email"], {"to": "later@example.com", "subject": "hi"}
    )
    out["pool_items"] = [
        demo.pool.enqueue(ids["send_email"], {"to": f"u{i}@example.com", "subject": "news"},
                          key=f"k{i % 2}")
        for i in range(4)
    ]
    return out
