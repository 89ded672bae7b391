"""A drip campaign: a welcome email now, tips later, a check-in after that.

    python examples/drip_campaign.py [--db URL]

Each email is a checkpointed step; the waits between them are durable sleeps that
hold no worker, thread or pool slot, and survive every process restarting (here
they last a fraction of a second; in real life, days: `timedelta(days=2)`).
"""

from __future__ import annotations

import time
from datetime import timedelta

from retrier import Retrier
from workflow import WorkflowContext, WorkflowManager
from workpool import Workpool

DAY = timedelta(milliseconds=300)  # a "day" of this demo


def main(db: str) -> None:
    retrier = Retrier(db)
    workflows = WorkflowManager(Workpool(retrier, "emails", max_parallelism=5))
    sent: list[tuple[float, str, str]] = []
    start = time.monotonic()

    @retrier.action
    def send_email(to: str, template: str) -> None:
        sent.append((time.monotonic() - start, to, template))

    @workflows.define
    async def drip(ctx: WorkflowContext, email: str, plan: str) -> int:
        await ctx.step("welcome", send_email, {"to": email, "template": "welcome"})
        await ctx.sleep("wait-for-tips", 2 * DAY)
        await ctx.step("tips", send_email, {"to": email, "template": f"tips-{plan}"})
        await ctx.sleep("wait-for-check-in", 3 * DAY)
        if plan == "trial":  # ordinary Python decides which steps run
            await ctx.step("upgrade", send_email, {"to": email, "template": "upgrade-offer"})
        return len(sent)

    with retrier:
        ids = [workflows.start(drip, {"email": e, "plan": p}, idempotency_key=f"drip-{e}")
               for e, p in [("ann@example.com", "trial"), ("bob@example.com", "pro")]]
        # Starting again with the same key returns the same workflow: no double campaign.
        assert workflows.start(drip, {"email": "ann@example.com", "plan": "trial"},
                               idempotency_key="drip-ann@example.com") == ids[0]
        for wf_id in ids:
            workflows.wait(wf_id, timeout=30)
    for at, to, template in sorted(sent):
        print(f"{at:5.2f} s  {to:16} {template}")
    retrier.close()


if __name__ == "__main__":
    from _run import run_with_db  # examples/_run.py, beside this file

    run_with_db(main, __doc__)
