"""The app that `tiers worker` processes run in tests/test_timeouts_processes.py.

`python -m retrier worker tests.timeouts_app:workflows` builds it on the database
named by TIERS_TIMEOUTS_TEST_DB.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, insert
from sqlmodel import Session

from retrier import Retrier
from workflow import WorkflowContext, WorkflowManager
from workpool import Workpool

meta = MetaData()
completions = Table(
    "test_timeouts_completions",
    meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("workflow_id", String(40), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("error", String(400), nullable=True),
)


def build(url: str) -> WorkflowManager:
    retrier = Retrier(url, lease=timedelta(seconds=1))
    retrier.add_tables([completions])
    workflows = WorkflowManager(Workpool(retrier, "timeouts-steps"))

    @retrier.on_complete(name="record_end")
    def record_end(run_id: str, result: Any, context: Any, session: Session) -> None:
        session.execute(
            insert(completions).values(
                workflow_id=run_id, outcome=result.kind, error=getattr(result, "error", None)
            )
        )

    @workflows.define(name="sleeper")
    async def sleeper(ctx: WorkflowContext) -> str:
        await ctx.sleep("nap", timedelta(hours=1))
        return "woke"

    return workflows


workflows = (
    build(os.environ["TIERS_TIMEOUTS_TEST_DB"]) if "TIERS_TIMEOUTS_TEST_DB" in os.environ else None
)
