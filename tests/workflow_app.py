"""The app that `tiers worker` processes run in tests/test_workflow_processes.py.

`python -m retrier worker tests.workflow_app:workflows` builds it on the database
named by TIERS_WF_TEST_DB.
"""

from __future__ import annotations

import os
import time
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select
from sqlmodel import Session

from retrier import Retrier
from workflow import WorkflowContext, WorkflowManager
from workpool import RetryBehavior, Workpool

meta = MetaData()
side_effects = Table(
    "test_wf_side_effects",
    meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("label", String(40), nullable=False),
    Column("step", Integer, nullable=False),
    Column("kind", String(8), nullable=False),  # ok | fail
)
completions = Table(
    "test_wf_completions",
    meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("workflow_id", String(40), nullable=False),
    Column("outcome", String(16), nullable=False),
)


def injected_failure(label: str, step: int) -> bool:
    return (int(label[1:]) * 7 + step) % 4 == 0


def build(url: str) -> WorkflowManager:
    retrier = Retrier(url)
    retrier.add_tables([side_effects, completions])
    pool = Workpool(
        retrier,
        "proc-steps",
        max_parallelism=20,
        retry_actions_by_default=True,
        default_retry_behavior=RetryBehavior(max_attempts=8, initial_backoff_ms=20, base=2),
    )
    workflows = WorkflowManager(pool)

    @retrier.action(name="work")
    def work(label: str, step: int) -> int:
        with Session(retrier.engine) as s:
            if injected_failure(label, step):
                failed = s.execute(
                    select(side_effects.c.id).where(
                        side_effects.c.label == label,
                        side_effects.c.step == step,
                        side_effects.c.kind == "fail",
                    )
                ).first()
                if failed is None:
                    s.execute(insert(side_effects).values(label=label, step=step, kind="fail"))
                    s.commit()
                    raise RuntimeError(f"injected failure of {label} step {step}")
            s.execute(insert(side_effects).values(label=label, step=step, kind="ok"))
            s.commit()
        time.sleep(0.003)
        return step

    @retrier.on_complete(name="record_completion")
    def record_completion(run_id: str, result: Any, context: Any, session: Session) -> None:
        session.execute(insert(completions).values(workflow_id=run_id, outcome=result.kind))

    @workflows.define(name="five")
    async def five(ctx: WorkflowContext, label: str) -> int:
        total = 0
        for i in range(5):
            total += await ctx.step(f"s{i}", work, {"label": label, "step": i})
        return total

    return workflows


workflows = build(os.environ["TIERS_WF_TEST_DB"]) if "TIERS_WF_TEST_DB" in os.environ else None
