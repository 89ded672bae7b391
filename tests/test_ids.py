"""Ids of runs and workflows are version 7 UUIDs: unique, and ordered by the time they
were made (the rows of a burst of work share index pages; see `retrier/_ids.py`)."""

from __future__ import annotations

import time
import uuid

from retrier import Retrier
from retrier.engine import new_id
from workflow import WorkflowContext, WorkflowManager
from workpool import Workpool


def _is_v7(value: str) -> bool:
    parsed = uuid.UUID(hex=value)
    return len(value) == 32 and parsed.version == 7 and parsed.variant == uuid.RFC_4122


def test_an_id_is_a_version_7_uuid_that_begins_with_its_time() -> None:
    before = time.time_ns() // 1_000_000
    made = new_id()
    after = time.time_ns() // 1_000_000
    assert _is_v7(made)
    assert before <= int(made[:12], 16) <= after


def test_ids_are_unique_and_sort_by_the_millisecond_they_were_made_in() -> None:
    burst = [new_id() for _ in range(10_000)]
    assert len(set(burst)) == len(burst)
    first = new_id()
    time.sleep(0.002)
    second = new_id()
    assert first < second


def test_runs_and_workflows_get_such_ids(make_retrier) -> None:  # type: ignore[no-untyped-def]
    retrier: Retrier = make_retrier()

    @retrier.action(name="noop")
    async def noop() -> None:
        return None

    workflows = WorkflowManager(Workpool(retrier, "ids"))

    @workflows.define(name="one")
    async def one(ctx: WorkflowContext) -> None:
        return None

    assert _is_v7(retrier.run(noop, {}))
    assert _is_v7(workflows.start(one))
