"""The app a `tiers worker` process runs in test_workflow_progress.py's process test.

`python -m retrier worker tests.progress_app:workflows` builds it on the database
named by TIERS_WF_TEST_DB.
"""

from __future__ import annotations

import os

from retrier import Retrier
from workflow import WorkflowContext, WorkflowManager
from workpool import Workpool


def build(url: str) -> WorkflowManager:
    retrier = Retrier(url)
    workflows = WorkflowManager(Workpool(retrier, "progress-steps", max_parallelism=4))

    @retrier.action(name="count")
    def count(n: int) -> int:
        return n + 1

    @workflows.define(name="reporting")
    async def reporting(ctx: WorkflowContext, steps: int) -> int:
        total = 0
        for i in range(steps):
            total = await ctx.step("count", count, {"n": total})
            ctx.log.info("step %d done", i)
            ctx.set_progress({"done": i + 1, "of": steps})
        await ctx.wait_for_event("release", "release")
        return total

    return workflows


workflows = build(os.environ["TIERS_WF_TEST_DB"]) if "TIERS_WF_TEST_DB" in os.environ else None
